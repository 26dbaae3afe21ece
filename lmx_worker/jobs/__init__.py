"""One-shot commands run each in a process of its own (`python -m
lmx_worker.jobs.<command>`): quantizing a model and converting a GGUF to an
MLX directory, so a crash or kill there never touches a server process."""
