"""The HTTP edge every route shares: reading and validating bodies (size,
depth, content type), server-sent events, error bodies in each dialect's
shape, request ids and records, client disconnects, load shedding and log
setup. Who may call which route is `lmx_gateway.access`."""
