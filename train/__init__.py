"""Training: the loop, the objective, optimiser, EMA, checkpointing and parallelism wrappers."""
