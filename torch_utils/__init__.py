"""PyTorch plumbing: corruption operators, distributed set-up, samplers of data, statistics."""
