"""Models as things on disk: finding and resolving them (hub cache,
inventory, layout, GGUF header), downloading them, the bundled default
model, which are encoders, where a model came from (lineage), and how each
fared on each backend version (compatibility)."""
