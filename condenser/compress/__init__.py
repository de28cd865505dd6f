"""Compression of the deliverables (sparsity, quantization) and the metrics contract they report in."""
