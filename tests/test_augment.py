"""Tests for training/augment.py: EDM's AugmentPipe with masks carried along (no leak of hidden pixels)."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.augment import (SYM6_LOWPASS, AugmentPipe, _downsample2x_crop, _upsample2x, geometric_warp,
                              rotate2d, scale2d, translate2d)

EDM_GEOMETRIC = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
ALL_OPS = dict(xflip=1, yflip=1, rotate_int=1, translate_int=1, scale=1, rotate_frac=1, aniso=1,
               translate_frac=1, brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def box_masks(n, channels, size, box, seed):
    """A: one random box (side `box`, clipped at the border) hidden per sample; Ã = A ⊙ (another box)."""
    g = gen(seed)
    A = torch.ones(n, channels, size, size)
    B = torch.ones(n, channels, size, size)
    for i in range(n):
        for m in (A, B):
            r, c = torch.randint(0, size, (2,), generator=g).tolist()
            m[i, :, r:r + box, c:c + box] = 0
    return A, A * B


def smooth_image(H, W, dtype=torch.float64):
    """A band-limited test function f(x, y) sampled on the pixel grid (x = column, y = row)."""
    def f(x, y):
        return (torch.sin(2 * math.pi * (1.5 * x / W + 0.7 * y / H) + 0.3)
                + torch.cos(2 * math.pi * (0.5 * x / W - 1.2 * y / H)))
    yy, xx = torch.meshgrid(torch.arange(H, dtype=dtype), torch.arange(W, dtype=dtype), indexing='ij')
    return f, xx, yy

#----------------------------------------------------------------------------
# The resampling filter.

def test_sym6_lowpass_is_orthonormal_with_six_vanishing_moments():
    h = np.asarray(SYM6_LOWPASS, dtype=np.float64)
    assert len(h) == 12
    assert abs(h.sum() - math.sqrt(2)) < 1e-12
    assert abs((h ** 2).sum() - 1) < 1e-11
    for shift in range(1, 6):  # Orthogonal to its even shifts: perfect reconstruction.
        assert abs((h[:-2 * shift] * h[2 * shift:]).sum()) < 1e-11
    g = h[::-1] * (-1.0) ** np.arange(12)  # Quadrature-mirror high-pass.
    k = np.arange(12, dtype=np.float64)
    for m in range(6):
        assert abs((g * k ** m).sum()) < 1e-6 * max(1.0, (np.abs(g) * k ** m).sum())
    assert abs((g * k ** 6).sum()) > 1  # Exactly six vanishing moments.


def test_filter_helpers_match_torch_conv_reference():
    """Synthesis = conv_transpose (stride 2), analysis = strided conv; the warp's helpers must agree."""
    x = torch.randn(2, 3, 5, 9, generator=gen(0), dtype=torch.float64)
    w = torch.tensor(SYM6_LOWPASS, dtype=torch.float64)
    flat = x.reshape(-1, 1, 9)
    ref = F.conv_transpose1d(flat, w.reshape(1, 1, -1), stride=2, padding=5).reshape(2, 3, 5, 18)
    assert torch.allclose(_upsample2x(x, 3, SYM6_LOWPASS, 0), ref, atol=1e-12)
    y = torch.randn(2, 3, 5, 2 * (7 + 6), generator=gen(1), dtype=torch.float64)
    ref = F.conv1d(y.reshape(-1, 1, y.shape[-1]), w.reshape(1, 1, -1), stride=2, padding=5)[..., 3:-3]
    assert torch.allclose(_downsample2x_crop(y, 3, SYM6_LOWPASS, 7), ref.reshape(2, 3, 5, 7), atol=1e-12)

#----------------------------------------------------------------------------
# The geometric warp against independent references.

def test_warp_identity_and_integer_translation_are_exact():
    x = torch.randn(2, 3, 16, 12, generator=gen(0), dtype=torch.float64)
    out, _ = geometric_warp(x, torch.eye(3, dtype=torch.float64).expand(2, 3, 3))
    assert torch.allclose(out, x, atol=1e-9)  # sym6 analysis(synthesis(x)) = x.
    # G_inv maps output to input coordinates: translate2d(-3, -2) moves the content by (+3, +2).
    out, _ = geometric_warp(x, translate2d(torch.tensor([-3., 1.]), torch.tensor([-2., 0.]), dtype=torch.float64))
    assert torch.allclose(out[0, :, 2:, 3:], x[0, :, :-2, :-3], atol=1e-9)
    assert torch.allclose(out[1, :, :, :-1], x[1, :, :, 1:], atol=1e-9)


def test_warp_matches_the_transformed_function():
    H = W = 32
    f, xx, yy = smooth_image(H, W)
    x = f(xx, yy)[None, None]
    t = (0.3, -0.7)
    out, _ = geometric_warp(x, translate2d(-t[0], -t[1], dtype=torch.float64))
    err = (out[0, 0] - f(xx - t[0], yy - t[1])).abs()[4:-4, 4:-4]
    assert err.max() < 1e-2  # Bilinear interpolation on the 2x grid.

    # Rotation about the image centre; check where the source point lies well inside the image.
    theta = math.pi / 6
    out, _ = geometric_warp(x, rotate2d(theta, dtype=torch.float64))
    cx, cy = (W - 1) / 2, (H - 1) / 2
    xs = math.cos(theta) * (xx - cx) - math.sin(theta) * (yy - cy) + cx
    ys = math.sin(theta) * (xx - cx) + math.cos(theta) * (yy - cy) + cy
    inside = (xs > 3) & (xs < W - 4) & (ys > 3) & (ys < H - 4)
    assert (out[0, 0] - f(xs, ys)).abs()[inside].max() < 1e-2

    # Quarter turns land on the pixel grid: compare with rot90 (sym6 is only nearly symmetric: interior).
    for k in (1, 2, 3):
        out, _ = geometric_warp(x, rotate2d(k * math.pi / 2, dtype=torch.float64))
        assert (out - torch.rot90(x, k, dims=(2, 3))).abs()[..., 6:-6, 6:-6].max() < 5e-3


def test_warp_mask_dilation_is_bounded():
    """A hidden box stays hidden after an integer translation and only a bounded rim is lost around it."""
    H = W = 32
    A = torch.ones(1, 1, H, W)
    A[..., 10:16, 12:20] = 0
    x = torch.randn(1, 3, H, W, generator=gen(0))
    _, (A_aug,) = geometric_warp(x, translate2d(-2., -1.), [A])
    hidden = torch.roll(1 - A, shifts=(1, 2), dims=(2, 3))[0, 0].bool()
    assert (A_aug[0, 0][hidden] == 0).all()
    rows, cols = torch.meshgrid(torch.arange(H), torch.arange(W), indexing='ij')
    dist_r = torch.maximum(11 - rows, rows - 16).clamp(min=0)  # Shifted box rows 11..16, cols 14..21.
    dist_c = torch.maximum(14 - cols, cols - 21).clamp(min=0)
    far = torch.maximum(dist_r, dist_c) > 7
    assert (A_aug[0, 0][far] == 1).all()
    assert A_aug.mean() > 0.5

#----------------------------------------------------------------------------
# AugmentPipe: identity, labels, blits, determinism.

def test_p0_is_identity():
    x = torch.randn(4, 3, 16, 16, generator=gen(0))
    A, A_hat = box_masks(4, 3, 16, 6, seed=1)
    x = x * A  # An observation: hidden pixels are zero.
    pipe = AugmentPipe(p=0, **ALL_OPS)
    y, labels, (A_aug, A_hat_aug) = pipe(x, (A, A_hat), generator=gen(2))
    assert torch.equal(y, x) and torch.equal(A_aug, A) and torch.equal(A_hat_aug, A_hat)
    assert labels.shape == (4, 19) and labels.dtype == torch.float32 and (labels == 0).all()
    y, labels, masks = pipe(x, generator=gen(2))
    assert torch.equal(y, x) and masks == ()


def test_untouched_samples_pass_through_exactly():
    """Samples that draw no transformation skip the resampling round trip (EDM filters them too)."""
    N = 32
    x = torch.randn(N, 3, 16, 16, generator=gen(0))
    A, A_hat = box_masks(N, 1, 16, 5, seed=1)
    x = x * A
    pipe = AugmentPipe(p=0.4, scale=1, rotate_frac=1, hue=1)
    y, labels, (A_aug, A_hat_aug) = pipe(x, (A, A_hat), generator=gen(2))
    untouched = (labels == 0).all(dim=1)
    assert 0 < untouched.sum() < N
    assert torch.equal(y[untouched], x[untouched]) and torch.equal(A_aug[untouched], A[untouched])
    assert torch.equal(A_hat_aug[untouched], A_hat[untouched])
    assert not torch.equal(y[~untouched], x[~untouched])


def test_label_layout():
    pipe = AugmentPipe(p=0.5, **EDM_GEOMETRIC)
    assert pipe.label_dim == 9
    assert pipe.label_names == ['xflip', 'yflip', 'scale', 'rotate_frac_cos', 'rotate_frac_sin', 'aniso_cos',
                                'aniso_sin', 'translate_frac_x', 'translate_frac_y']
    assert AugmentPipe(**ALL_OPS).label_dim == 19
    assert AugmentPipe().label_dim == 0
    assert AugmentPipe(hue=1, xflip=1).label_names == ['xflip', 'hue_cos', 'hue_sin']
    x = torch.randn(5, 3, 16, 16, generator=gen(0))
    for config in (EDM_GEOMETRIC, ALL_OPS, dict(hue=1, xflip=1), {}):
        pipe = AugmentPipe(p=1, **config)
        _, labels, _ = pipe(x, generator=gen(1))
        assert labels.shape == (5, pipe.label_dim)
    # Rotation labels are (cos θ - 1, sin θ): on the unit circle shifted by (-1, 0).
    _, labels, _ = AugmentPipe(p=1, rotate_frac=1)(x, generator=gen(3))
    assert torch.allclose((labels[:, 0] + 1) ** 2 + labels[:, 1] ** 2, torch.ones(5), atol=1e-6)


def test_flips_permute_images_and_masks_exactly():
    x = torch.randn(16, 3, 8, 12, generator=gen(0))
    A = (torch.rand(16, 3, 8, 12, generator=gen(1)) > 0.3).float()
    x = x * A
    y, labels, (A_aug,) = AugmentPipe(p=1, xflip=1e8, yflip=1e8)(x, (A,), generator=gen(2))
    assert set(labels.unique().tolist()) == {0.0, 1.0} and labels.shape == (16, 2)
    for i in range(16):
        dims = [d for d, flag in zip((3, 2), labels[i].tolist()) if flag]
        ref_x = x[i:i + 1].flip(dims) if dims else x[i:i + 1]
        ref_A = A[i:i + 1].flip(dims) if dims else A[i:i + 1]
        assert torch.equal(y[i:i + 1], ref_x) and torch.equal(A_aug[i:i + 1], ref_A)


def test_rotate_int_and_translate_int_are_exact():
    N, H = 24, 16
    x = torch.randn(N, 3, H, H, generator=gen(0))
    A = (torch.rand(N, 1, H, H, generator=gen(1)) > 0.3).float()
    x = x * A
    y, labels, (A_aug,) = AugmentPipe(p=1, rotate_int=1)(x, (A,), generator=gen(2))
    quarter_turns = {(0, 0): 0, (1, 0): 1, (1, 1): 2, (0, 1): 3}
    seen = set()
    for i in range(N):
        k = quarter_turns[tuple(int(v) for v in labels[i])]
        seen.add(k)
        assert np.array_equal(y[i].numpy(), np.rot90(x[i].numpy(), k, axes=(1, 2)))
        assert np.array_equal(A_aug[i].numpy(), np.rot90(A[i].numpy(), k, axes=(1, 2)))
    assert seen == {0, 1, 2, 3}

    pipe = AugmentPipe(p=1, translate_int=1, translate_int_max=0.25)
    y, labels, (A_aug,) = pipe(x, (A,), generator=gen(3))
    pad = int(H * 0.25)
    for i in range(N):
        tx, ty = [round(v * H * 0.25) for v in labels[i].tolist()]
        for src, out in ((x[i], y[i]), (A[i], A_aug[i])):
            padded = np.pad(src.numpy(), ((0, 0), (pad, pad), (pad, pad)), mode='reflect')
            ref = padded[:, pad - ty:pad - ty + H, pad - tx:pad - tx + H]  # out[y, x] = in[y - ty, x - tx].
            assert np.array_equal(out.numpy(), ref)
    assert (labels != 0).any()


def test_same_generator_same_output_and_global_rng_untouched():
    x = torch.randn(6, 3, 16, 16, generator=gen(0))
    A, A_hat = box_masks(6, 1, 16, 5, seed=1)
    pipe = AugmentPipe(p=0.7, **ALL_OPS)
    state = torch.get_rng_state()
    first = pipe(x, (A, A_hat), generator=gen(5))
    second = pipe(x, (A, A_hat), generator=gen(5))
    other = pipe(x, (A, A_hat), generator=gen(6))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert all(torch.equal(a, b) for a, b in zip(first[2], second[2]))
    assert not torch.equal(first[1], other[1])
    # The draws do not depend on the masks: replaying the generator gives the same labels without them.
    assert torch.equal(pipe(x, generator=gen(5))[1], first[1])
    # generator=None draws from torch's default generator (as torch.rand does).
    torch.manual_seed(3)
    a = pipe(x)
    torch.manual_seed(3)
    b = pipe(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

#----------------------------------------------------------------------------
# Colour.

@pytest.mark.parametrize('op', ['brightness', 'contrast', 'lumaflip', 'hue', 'saturation'])
def test_colour_ops_on_gray_images(op):
    N = 32
    g = torch.rand(N, 1, 1, 1, generator=gen(0)) * 2 - 1
    x = g.expand(N, 3, 8, 8).contiguous()
    pipe = AugmentPipe(p=1, **{op: 1})
    y, labels, _ = pipe(x, generator=gen(1))
    assert torch.allclose(y, y[:, :1].expand_as(y), atol=1e-6)  # Gray stays gray.
    w = labels[:, 0].reshape(N, 1, 1, 1)
    expected = {
        'brightness': g + w * pipe.brightness_std,
        'contrast': g * torch.exp2(w * pipe.contrast_std),
        'lumaflip': g * (1 - 2 * w),
        'hue': g,  # Rotation about the luma axis leaves gray fixed.
        'saturation': g,
    }[op]
    assert torch.allclose(y, expected.expand_as(y), atol=1e-5)
    assert (labels != 0).any()
    # Grayscale images: EDM averages the colour matrix rows.
    y1, _, _ = pipe(x[:, :1], generator=gen(1))
    assert torch.allclose(y1, expected, atol=1e-5)


def test_colour_masks_follow_channel_mixing():
    N = 16
    x = torch.randn(N, 3, 8, 8, generator=gen(0))
    A = (torch.rand(N, 3, 8, 8, generator=gen(1)) > 0.3).float()
    x = x * A
    pipe = AugmentPipe(p=1, brightness=1, contrast=1)
    y, _, (A_aug,) = pipe(x, (A,), generator=gen(2))
    assert torch.equal(A_aug, A)  # Diagonal colour matrices keep channels apart.
    # A NaN in a hidden channel must not reach the observed channels of the same pixel (0 * NaN = NaN).
    y_nan, _, _ = pipe(torch.where(A.bool(), x, torch.full_like(x, float('nan'))), (A,), generator=gen(2))
    assert torch.equal(y_nan, y)
    _, labels, (A_aug,) = AugmentPipe(p=1, lumaflip=1)(x, (A,), generator=gen(3))
    all_channels = A.amin(dim=1, keepdim=True).expand_as(A)
    for i in range(N):
        assert torch.equal(A_aug[i], all_channels[i] if labels[i, 0] == 1 else A[i])
    # Hue mixes all channels: no leak from hidden channels, Ã_aug <= A_aug, shared masks unchanged.
    A_hat = A * (torch.rand(N, 3, 8, 8, generator=gen(4)) > 0.3).float()
    pipe = AugmentPipe(p=1, hue=1, saturation=1)
    y, _, (A_aug, A_hat_aug) = pipe(x, (A, A_hat), generator=gen(5))
    y2, _, _ = pipe(x + (1 - A) * 100, (A, A_hat), generator=gen(5))
    assert torch.equal(y, y2) and torch.equal(y, y * A_aug) and (A_hat_aug <= A_aug).all()
    shared = A[:, :1]
    _, _, (shared_aug,) = pipe(x * shared, (shared,), generator=gen(5))
    assert torch.equal(shared_aug, shared)

#----------------------------------------------------------------------------
# The key property: warps never leak hidden pixels and masks say exactly what is faithful.

@pytest.mark.parametrize('mask_channels,seed', [(1, 0), (3, 1), (3, 2)])
def test_random_warps_do_not_leak_hidden_pixels(mask_channels, seed):
    N, C, H = 24, 3, 32
    x = torch.randn(N, C, H, H, generator=gen(100 + seed))
    A, A_hat = box_masks(N, mask_channels, H, 8, seed=200 + seed)
    pipe = AugmentPipe(p=1, **EDM_GEOMETRIC)
    y, labels, (A_aug, A_hat_aug) = pipe(x, (A, A_hat), generator=gen(seed))
    assert (labels[:, [2, 4, 7, 8]] != 0).all()  # Scale, rotation and translation drawn for every sample.

    # (a) Hidden pixels of the output are zero.
    assert torch.equal(y, y * A_aug)
    # (b) No leak: arbitrary values at hidden pixels change nothing.
    hidden_noise = torch.randn(N, C, H, H, generator=gen(300 + seed)) * 1e4
    y2, labels2, (A_aug2, A_hat_aug2) = pipe(x + (1 - A) * hidden_noise, (A, A_hat), generator=gen(seed))
    assert torch.equal(y2, y) and torch.equal(labels2, labels) and torch.equal(A_aug2, A_aug)
    y_nan, _, _ = pipe(torch.where(A.bool(), x, torch.full_like(x, float('nan'))), (A, A_hat), generator=gen(seed))
    assert torch.equal(y_nan, y)
    # ... and the mask is right: where A_aug = 1 the output equals the warp of the full (unmasked) image,
    # even though the hidden values are huge, so no hidden pixel has any weight there.
    y_full, _, _ = pipe(x + (1 - A) * hidden_noise, generator=gen(seed))
    observed = A_aug.expand_as(y).bool()
    assert torch.equal(y_full[observed], y[observed])
    # Gradient w.r.t. hidden pixels is exactly zero.
    x_req = x.clone().requires_grad_(True)
    y3, _, (A3, _) = pipe(x_req, (A, A_hat), generator=gen(seed))
    (A3 * y3).sum().backward()
    assert (x_req.grad[~A.expand_as(x).bool()] == 0).all()
    assert x_req.grad.abs().sum() > 0
    # (c) Ã_aug <= A_aug, and both are binary.
    assert (A_hat_aug <= A_aug).all()
    assert set(A_aug.unique().tolist()) <= {0.0, 1.0} and set(A_hat_aug.unique().tolist()) <= {0.0, 1.0}
    # The conservative rule still keeps most of what a box mask observes.
    assert A_aug.mean() > 0.4 * A.mean()


def test_all_ones_mask_small_translation_keeps_coverage():
    N, H = 8, 32
    x = torch.randn(N, 3, H, H, generator=gen(0))
    ones = torch.ones(N, 1, H, H)
    pipe = AugmentPipe(p=1, translate_frac=1, translate_frac_std=0.05)
    y, labels, (A_aug,) = pipe(x, (ones,), generator=gen(1))
    y_plain, _, _ = pipe(x, generator=gen(1))
    assert (labels != 0).all()
    assert A_aug.mean() > 0.99
    observed = A_aug.expand_as(y).bool()
    assert torch.equal(y[observed], y_plain[observed])


def test_off_canvas_samples_count_as_missing():
    """Strong shrinking samples outside the padded canvas; there the warp of a constant is not constant."""
    N, H = 8, 16
    x = torch.ones(N, 3, H, H)
    ones = torch.ones(N, 1, H, H)
    pipe = AugmentPipe(p=1, scale=1, scale_std=3)
    y, labels, (A_aug,) = pipe(x, (ones,), generator=gen(0))
    y_plain, _, _ = pipe(x, generator=gen(0))
    faithful = (y_plain - 1).abs() < 1e-4
    assert ((A_aug == 1).expand_as(y) <= faithful).all()  # Observed => equals the true warp of 1.
    assert (A_aug == 0).any() and (A_aug == 1).any()

def test_warp_marks_filter_extension_beyond_the_canvas_missing():
    """Shrinking beyond the reflect-padding limit: observed outputs of a constant image must stay exact."""
    x = torch.ones(1, 1, 16, 16, dtype=torch.float64)
    for G_inv in (scale2d(4., 4., dtype=torch.float64), scale2d(3., 5., dtype=torch.float64),
                  scale2d(2.5, 2.5, dtype=torch.float64) @ rotate2d(0.3, dtype=torch.float64)):
        y, (A_aug,) = geometric_warp(x, G_inv, [torch.ones_like(x)])
        assert 0 < A_aug.mean() < 1
        assert (y - 1).abs()[A_aug == 1].max() < 1e-9
    # Random large warps of a batch: the padding is clamped, samples fall off the canvas.
    n, g = 64, gen(0)
    t = (torch.rand(2, n, generator=g, dtype=torch.float64) * 2 - 1) * 24
    s = torch.exp2(torch.randn(n, generator=g, dtype=torch.float64))
    theta = torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi
    G_inv = translate2d(t[0], t[1], dtype=torch.float64) @ scale2d(s, s, dtype=torch.float64) \
        @ rotate2d(theta, dtype=torch.float64)
    x = torch.ones(n, 1, 16, 16, dtype=torch.float64)
    y, (A_aug,) = geometric_warp(x, G_inv, [torch.ones_like(x)])
    assert 0.2 < A_aug.mean() < 0.9
    assert (y - 1).abs()[A_aug == 1].max() < 1e-9

#----------------------------------------------------------------------------
# Configuration, dtypes, validation, devices.

def test_config_round_trip_and_repr():
    pipe = AugmentPipe(p=0.12, scale_std=0.3, **EDM_GEOMETRIC)
    config = json.loads(json.dumps(pipe.to_dict()))
    clone = AugmentPipe.from_dict(config)
    assert clone.to_dict() == pipe.to_dict()
    assert repr(clone) == repr(pipe)
    assert repr(pipe).startswith('AugmentPipe(p=0.12, xflip=1e+08, yflip=1, scale=1,')
    assert 'scale_std=0.3' in repr(pipe) and 'aniso_std' not in repr(pipe)
    x = torch.randn(3, 3, 16, 16, generator=gen(0))
    assert torch.equal(pipe(x, generator=gen(1))[0], clone(x, generator=gen(1))[0])
    with pytest.raises(ValueError, match='masking_prob'):
        AugmentPipe.from_dict(dict(config, masking_prob=0.0))
    with pytest.raises(ValueError, match='p=-1'):
        AugmentPipe(p=-1)
    with pytest.raises(ValueError, match='aniso_rotate_prob'):
        AugmentPipe(aniso_rotate_prob=2)


def test_input_validation():
    x = torch.randn(2, 3, 16, 8)
    with pytest.raises(ValueError, match='masks\\[0\\]'):
        AugmentPipe(xflip=1)(x, (torch.ones(2, 2, 16, 8),))
    with pytest.raises(ValueError, match='square'):
        AugmentPipe(rotate_int=1)(x)
    with pytest.raises(ValueError, match='1 or 3 channels'):
        AugmentPipe(hue=1)(torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match='generator'):
        AugmentPipe(xflip=1)(x, generator=0)


@pytest.mark.parametrize('dtype', [torch.float64, torch.bfloat16])
def test_dtypes_are_kept(dtype):
    x = torch.randn(4, 3, 16, 16, generator=gen(0)).to(dtype)
    A, A_hat = box_masks(4, 3, 16, 5, seed=1)
    y, labels, (A_aug, A_hat_aug) = AugmentPipe(p=1, **ALL_OPS)(x, (A, A_hat.bool()), generator=gen(2))
    assert y.dtype == dtype and labels.dtype == torch.float32
    assert A_aug.dtype == torch.float32 and A_hat_aug.dtype == torch.bool
    assert torch.equal(y, y * A_aug.to(dtype)) and (A_hat_aug <= A_aug.bool()).all()


@pytest.mark.gpu
def test_cuda_matches_cpu():
    x = torch.randn(8, 3, 32, 32, generator=gen(0))
    A, A_hat = box_masks(8, 3, 32, 8, seed=1)
    pipe = AugmentPipe(p=1, **ALL_OPS)
    y, labels, masks = pipe(x, (A, A_hat), generator=gen(2))
    y_cuda, labels_cuda, masks_cuda = pipe(x.cuda(), (A.cuda(), A_hat.cuda()), generator=gen(2))
    assert y_cuda.is_cuda and masks_cuda[0].is_cuda
    assert torch.allclose(labels_cuda.cpu(), labels, atol=1e-6)
    assert torch.allclose(y_cuda.cpu(), y, atol=1e-4)
    for m, m_cuda in zip(masks, masks_cuda):
        assert (m_cuda.cpu() != m).float().mean() < 1e-3  # Only coordinates rounded differently may differ.
