"""Paged KV cache: the block pool, per-request block tables and the cache tensors."""
