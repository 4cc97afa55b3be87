"""Training: loss, optimizer, data pipeline, train step, checkpoints, metrics and the trainer."""
