"""The node agent (`lmx node --join`): runs on a host other than the
gateway's, joins the supervisor over CURVE-secured ZeroMQ tcp, and starts
the workers the supervisor places there. It serves no HTTP and loads no
model itself; it imports nothing above lmx_worker."""
