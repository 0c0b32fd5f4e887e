"""Per-layer work: recording the reference op by op, judging the target op by op, tensors for pictures."""
