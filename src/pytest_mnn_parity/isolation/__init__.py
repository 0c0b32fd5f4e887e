"""Running checks in worker processes, so a crash or a hang costs one item: policy, engine, protocol."""
