"""Worker nodes: other hosts whose agents join the supervisor over
CURVE-secured ZeroMQ tcp (keys), the registry of joined nodes and their
heartbeats (service), and the Placement that starts a model's worker on
one of them (remote)."""
