"""Sparsity: unstructured (prune & fine-tune, lottery ticket, MEST, HASS) and structured (filter) pruning."""
