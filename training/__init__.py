"""The method: datasets, networks, losses, augmentation, training loop, samplers."""
