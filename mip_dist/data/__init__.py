"""Dataset layouts, synthetic generator, shard writing and streaming PK batches."""
