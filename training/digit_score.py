"""Sample quality on small labelled datasets (the built-in digits): a classifier-feature Fréchet distance.

Inception features mean little on 16x16 grayscale digits, so the quality yardstick of the demo and of
`bench/bench_science.py` is a small CNN trained on the clean training split (`train_classifier`, cached by
`load_or_train_classifier`). `score_images` reports, for a set of generated images against clean reference
images:
- `fd`: Fréchet distance (`training.metrics.calculate_fid`) between the classifier's penultimate features;
- `fd_pixel`: the same distance computed on raw pixels in [-1, 1];
- `confidence`: mean max-softmax probability (recognisable digits score near 1);
- `classes`: how many classes take at least 2% of the predictions (mode coverage; 10 for all digits).
"""

import os

import numpy as np
import torch
import torch.nn.functional as F

import dnnlib
from training import metrics

FORMAT = 'ambient-diffusion-digit-classifier'


class DigitClassifier(torch.nn.Module):
    """Three conv blocks, global average pooling, a 64-d feature layer and the class logits."""

    def __init__(self, in_channels=1, num_classes=10, width=32, feature_dim=64):
        super().__init__()
        self.config = dict(in_channels=in_channels, num_classes=num_classes, width=width, feature_dim=feature_dim)
        c = width
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(in_channels, c, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.SiLU(), torch.nn.AvgPool2d(2),
            torch.nn.Conv2d(c, 2 * c, 3, padding=1), torch.nn.SiLU(), torch.nn.AvgPool2d(2),
            torch.nn.Conv2d(2 * c, 2 * c, 3, padding=1), torch.nn.SiLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
            torch.nn.Linear(2 * c, feature_dim), torch.nn.SiLU())
        self.head = torch.nn.Linear(feature_dim, num_classes)

    def forward(self, x, return_features=False):  # x: [N, C, H, W] in [-1, 1]
        features = self.body(x)  # [N, feature_dim]
        return features if return_features else self.head(features)


def to_float(images):
    """uint8 [N, C, H, W] -> float32 in [-1, 1] (float input is returned as float32)."""
    images = torch.as_tensor(images)
    if images.dtype == torch.uint8:
        return images.to(torch.float32) / 127.5 - 1
    return images.to(torch.float32)


def train_classifier(images, labels, epochs=30, batch=128, lr=2e-3, seed=0):
    """Train a `DigitClassifier` on (images [N, C, H, W], int labels [N]) with ±1-pixel shifts; CPU, seconds."""
    x, y = to_float(images), torch.as_tensor(labels, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = DigitClassifier(in_channels=x.shape[1], num_classes=int(y.max()) + 1)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for start in range(0, x.shape[0], batch):
            idx = order[start:start + batch]
            dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
            xb = torch.roll(x[idx], shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval().requires_grad_(False)


def accuracy(net, images, labels):
    with torch.no_grad():
        return float((net(to_float(images)).argmax(1) == torch.as_tensor(labels)).float().mean())


def load_or_train_classifier(path, images, labels, **train_kwargs):
    """The classifier cached at `path` (a weights-only .pt), trained on (images, labels) if it is not there."""
    if os.path.isfile(path):
        data = torch.load(path, map_location='cpu', weights_only=True)
        if not isinstance(data, dict) or data.get('format') != FORMAT:
            raise ValueError(f'{path} is not a digit classifier of this codebase; delete it to retrain')
        net = DigitClassifier(**data['config'])
        net.load_state_dict(data['state'])
        return net.eval().requires_grad_(False)
    net = train_classifier(images, labels, **train_kwargs)
    with dnnlib.util.atomic_write(path, 'wb') as f:
        torch.save(dict(format=FORMAT, config=net.config, state=net.state_dict()), f)
    return net


def features(net, images, batch=512):
    """Penultimate features [N, D] and softmax probabilities [N, K] of images (uint8 or [-1, 1] floats)."""
    x = to_float(images)
    feats, probs = [], []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch):
            f = net(x[start:start + batch], return_features=True)
            feats.append(f)
            probs.append(net.head(f).softmax(1))
    return torch.cat(feats), torch.cat(probs)


def frechet(a, b):
    """Fréchet distance between Gaussians fitted to the rows of a and b (float64)."""
    return metrics.calculate_fid(*metrics.feature_mean_cov(a), *metrics.feature_mean_cov(b))


def score_images(net, images, reference):
    """Scores of `images` against clean `reference` images (both [N, C, H, W], uint8 or [-1, 1])."""
    f, p = features(net, images)
    f_ref, _ = features(net, reference)
    counts = np.bincount(p.argmax(1).numpy(), minlength=p.shape[1])
    return dict(fd=frechet(f, f_ref), fd_pixel=frechet(to_float(images).flatten(1), to_float(reference).flatten(1)),
        confidence=float(p.max(1).values.mean()), classes=int((counts >= 0.02 * p.shape[0]).sum()),
        class_counts=counts.tolist())
