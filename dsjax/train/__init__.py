"""Training: optimizer and schedules, train state, steps, the loop, checkpoints, metrics."""
