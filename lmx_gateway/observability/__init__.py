"""What watches the gateway: Prometheus metrics, the event bus, per-request
records, lifecycle observers, and the probe and metrics routes.
"""
