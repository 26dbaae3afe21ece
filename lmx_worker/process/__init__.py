"""The worker process itself: its spec (what the supervisor tells it to
be), the step loop that serves it, the heartbeat that proves it alive, the
exit codes it uses on purpose, and the faults a test can inject into it."""
