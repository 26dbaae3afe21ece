"""Embedding and rerank: the encoder contract and the loop's handling of
Embed and Rerank frames, the llama.cpp and MLX encoder backends, the BERT
model they run on MLX, and the sentence-transformers pooling config. An
encoder worker never generates text, so none of this touches the step loop's
text engines."""
