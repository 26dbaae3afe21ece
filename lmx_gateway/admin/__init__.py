"""The operator's plane under `/admin`: loading and unloading models, models as
files (inventory, downloads, delete), runtime control (config reload,
presets, benchmark), memory, compatibility records, the dashboard, and
discovery.
"""
