"""fsr.bench: what pruning buys (time to first token, KV cache, memory), measured against the
device's roofline, and the FocusScanRefine op on its own. CLI: ``fsr-bench`` (see README.md)."""
