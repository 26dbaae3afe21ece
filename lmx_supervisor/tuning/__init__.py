"""Finding out and changing what a model costs on this host: the probe
(answered from its files alone), autotune and the performance profile it
stores, and quantize jobs that make a smaller copy of a model."""
