"""How the supervisor reaches its workers, wherever they run: the handle a
model holds for its worker and the placement that starts one, the local
worker OS process, a sharded group of ranks as one handle, the settings
baked in at spawn, and the single ZeroMQ ROUTER socket every worker
connects to."""
