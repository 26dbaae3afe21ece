"""One model's life: the state machine and the ManagedModel that walks it,
admission of requests, restarts (policy, rolling restarts and their
progress), exit causes, poison requests, and what outlives the process
(runtime state, lifecycle records) so the next start knows what ran."""
