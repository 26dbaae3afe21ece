"""The `lmx` client commands (status, models, chat, bench, events, config,
presets, convert): they talk to a running server over HTTP only and import
nothing of the server side.
"""
