"""Ollama's API (`/api/...`) translated onto LMX's own paths: chat and
generate onto the chat/completions generation, embed onto the encoders,
tags/show/ps onto the supervisor and the inventory, pull/delete onto the
model files."""
