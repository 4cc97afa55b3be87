"""Training pieces: the loss (this issue); train step, optimizer, data, checkpoints follow."""
