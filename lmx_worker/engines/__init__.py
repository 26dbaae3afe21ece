"""Text-generation engines and what drives them: the contract between the
step loop and a backend (engine), the two backends (llama.cpp for GGUF, MLX
for model directories), the stall-free prompt budget both share, and the
loader that builds the engine a WorkerSpec asks for."""
