"""Data: LAION metadata -> filtered subsets -> WebDataset shards -> training batches."""
