"""Memory: what a model will need (the estimate, MLX's own), what the OS
says is used, whether a model fits now (fit plan), and the guard that
admits, evicts and caps workers by it."""
