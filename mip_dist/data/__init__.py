"""Dataset readers, shard writing and index reading, and the stream of cross-modality PK batches."""
