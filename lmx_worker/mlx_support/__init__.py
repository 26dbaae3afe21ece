"""MLX model support beside the engine loop: how an MLX worker holds its
weights on each device, the float32 CPU layout, routing CPU matmuls to the
system OpenBLAS, and turning a GGUF file (weights and tokenizer) into an MLX
model directory."""
