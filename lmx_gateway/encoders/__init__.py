"""Embeddings (`/v1/embeddings`) and reranking (`/v1/rerank`), served by encoder workers."""
