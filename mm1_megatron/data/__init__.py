"""Data pipeline: tokenizer, shards, DALI images, packing, mixture."""
