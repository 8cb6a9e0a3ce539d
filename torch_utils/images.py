"""Image tensors to PNG files: single images and grids (row-major, unlike the original's transposed collages)."""

import math
import os

import numpy as np
import PIL.Image
import torch

from dnnlib.util import atomic_write


def to_uint8(images, drange=(-1, 1)):
    """[N, C, H, W] (or [C, H, W]) float in `drange` -> uint8 numpy [N, H, W, C]; uint8 input passes through."""
    images = torch.as_tensor(images)
    if images.ndim == 3:
        images = images[None]
    if images.dtype != torch.uint8:
        lo, hi = drange
        images = (images.detach().to(torch.float32).cpu() - lo) * (255 / (hi - lo))
        images = images.round().clamp(0, 255).to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def _pil(image_hwc):
    return PIL.Image.fromarray(image_hwc[:, :, 0] if image_hwc.shape[2] == 1 else image_hwc)


def save_png(image_hwc, path):
    """Write one uint8 [H, W, C] image as PNG, atomically (creating its folder)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, 'wb') as f:
        _pil(image_hwc).save(f, format='png')


def make_grid(images, grid_w=None, drange=(-1, 1), pad=0, pad_value=255, scale=1):
    """Tile images row by row into one uint8 [H', W', C] array; grid_w defaults to ceil(sqrt(N)).

    `scale` enlarges every image by pixel repetition (small images stay crisp in a viewer).
    """
    images = to_uint8(images, drange)
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = images.shape
    grid_w = grid_w or max(1, math.ceil(math.sqrt(n)))
    grid_h = math.ceil(n / grid_w)
    grid = np.full((grid_h * (h + pad) - pad, grid_w * (w + pad) - pad, c), pad_value, dtype=np.uint8)
    for i, image in enumerate(images):
        row, col = divmod(i, grid_w)
        grid[row * (h + pad): row * (h + pad) + h, col * (w + pad): col * (w + pad) + w] = image
    return grid


def save_image_grid(images, path, grid_w=None, drange=(-1, 1), pad=0, scale=1):
    """Tile images [N, C, H, W] into a grid and write it as PNG; returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_png(make_grid(images, grid_w=grid_w, drange=drange, pad=pad, scale=scale), path)
    return path
