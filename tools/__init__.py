"""User commands: convert checkpoints, precompute, sample, evaluate."""
