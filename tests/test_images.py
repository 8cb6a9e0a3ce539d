"""Tests for torch_utils/images.py: uint8 conversion and grid layout."""

import numpy as np
import PIL.Image
import torch

from torch_utils.images import make_grid, save_image_grid, to_uint8


def test_to_uint8_range_and_layout():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 1, 4)
    out = to_uint8(x)
    assert out.shape == (1, 1, 4, 1) and out.dtype == np.uint8
    assert out.flatten().tolist() == [0, 128, 255, 255]
    assert to_uint8(torch.tensor([[[[0.5]]]]), drange=(0, 1)).item() == 128


def test_grid_is_row_major_with_padding_and_scale():
    images = torch.stack([torch.full((3, 2, 2), v) for v in (-1.0, -0.5, 0.0, 0.5, 1.0)])
    grid = make_grid(images, grid_w=3, pad=1, pad_value=7, scale=2)
    assert grid.shape == (2 * 4 + 1, 3 * 4 + 2, 3)
    expected = to_uint8(images)[:, 0, 0, 0]
    for i, value in enumerate(expected):
        row, col = divmod(i, 3)
        tile = grid[row * 5: row * 5 + 4, col * 5: col * 5 + 4]
        assert (tile == value).all()
    assert (grid[4, :, :] == 7).all()  # padding row
    assert (grid[5:, 10:] == 7).all()  # the missing 6th image stays padding


def test_save_image_grid_grayscale(tmp_path):
    images = torch.rand(4, 1, 3, 3) * 2 - 1
    path = save_image_grid(images, tmp_path / 'sub' / 'g.png')
    img = np.array(PIL.Image.open(path))
    assert img.shape == (6, 6)
    np.testing.assert_array_equal(img[:3, 3:], to_uint8(images)[1, :, :, 0])
