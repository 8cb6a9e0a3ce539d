"""Tests of torch_utils/ambient_diffusion.py and torch_utils/motion_blur.py (masks and forward operators)."""

import json
import math

import numpy as np
import pytest
import scipy.ndimage
import torch

from torch_utils import ambient_diffusion as ad
from torch_utils.motion_blur import random_motion_kernel, random_motion_kernels


def gen(seed):
    return torch.Generator().manual_seed(seed)


def assert_rate(observed_fraction, expected, count):
    """Binomial check: |rate - expected| within 5 standard errors of `count` Bernoulli draws."""
    se = math.sqrt(expected * (1 - expected) / count)
    assert abs(observed_fraction - expected) < 5 * se, (observed_fraction, expected, se)


def zero_bbox(plane):
    """(top, left, height, width, count) of the zeros (or ones, with plane = 1 - plane) of a 2-D 0/1 array."""
    rows, cols = np.nonzero(plane == 0)
    if rows.size == 0:
        return None
    return rows.min(), cols.min(), rows.max() - rows.min() + 1, cols.max() - cols.min() + 1, rows.size


PATTERN_ARGS = [('dust', 0.6, 0.3), ('box', 0.5, 0.25), ('fixed_box', 0.5, 0.25), ('keep_patch', 0.4, 0.5)]

#----------------------------------------------------------------------------
# Masks: type, rates, ordering, randomness.

@pytest.mark.parametrize('pattern,p,delta', PATTERN_ARGS)
@pytest.mark.parametrize('full_rgb', [False, True])
def test_masks_binary_float32_shape_device(pattern, p, delta, full_rgb):
    corruption = ad.MaskCorruption(pattern, p, delta, full_rgb)
    for kwargs in [dict(generator=gen(0)), dict(generator=None, device='cpu'), dict(generator=gen(1), device='cpu')]:
        A = corruption.sample_mask([3, 2, 16, 12], **kwargs)
        A_hat = corruption.sample_hat_mask(A, generator=kwargs['generator'])
        for m in (A, A_hat):
            assert m.shape == (3, 2, 16, 12) and m.dtype == torch.float32 and m.device.type == 'cpu'
            assert set(m.unique().tolist()) <= {0.0, 1.0}
        assert bool((A_hat <= A).all())
        if pattern != 'dust' or full_rgb:
            assert torch.equal(A[:, 0], A[:, 1]) and torch.equal(A_hat[:, 0], A_hat[:, 1])


@pytest.mark.parametrize('full_rgb', [False, True])
def test_dust_rates(full_rgb):
    p, delta = 0.3, 0.4
    corruption = ad.MaskCorruption('dust', p, delta, full_rgb)
    A = corruption.sample_mask((32, 3, 32, 32), generator=gen(5))
    A_hat = corruption.sample_hat_mask(A, generator=gen(6))
    S = corruption.sample_sampling_mask((32, 3, 32, 32), generator=gen(7))
    count = A.numel() // (3 if full_rgb else 1)
    assert_rate(1 - A.mean().item(), p, count)
    assert_rate(A_hat.mean().item(), (1 - p) * (1 - delta), count)
    assert_rate(S.mean().item(), corruption.survival_probability, count)
    assert corruption.survival_probability == pytest.approx((1 - p) * (1 - delta))
    # B removes each pixel surviving A with probability δ.
    assert_rate(1 - A_hat.sum().item() / A.sum().item(), delta, int(A.sum().item()) // (3 if full_rgb else 1))
    if full_rgb:
        assert all(torch.equal(A[:, 0], A[:, c]) and torch.equal(A_hat[:, 0], A_hat[:, c]) for c in (1, 2))
    else:
        assert not torch.equal(A[:, 0], A[:, 1])


def test_dust_full_rgb_any_channel_count():
    A = ad.dust_mask((2, 5, 8, 8), 0.5, mask_full_rgb=True, generator=gen(0))
    assert A.shape == (2, 5, 8, 8) and bool((A == A[:, :1]).all())


def test_survival_probability_only_for_dust():
    assert ad.MaskCorruption('dust', 0.2, 0.5).survival_probability == pytest.approx(0.4)
    for pattern in ('box', 'fixed_box', 'keep_patch'):
        assert ad.MaskCorruption(pattern, 0.2, 0.5).survival_probability is None


@pytest.mark.parametrize('pattern,p,delta', PATTERN_ARGS)
def test_masks_deterministic_per_seed(pattern, p, delta):
    corruption = ad.MaskCorruption(pattern, p, delta, mask_full_rgb=True)
    a = corruption.sample_sampling_mask((4, 3, 16, 16), generator=gen(3))
    b = corruption.sample_sampling_mask((4, 3, 16, 16), generator=gen(3))
    c = corruption.sample_sampling_mask((4, 3, 16, 16), generator=gen(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize('pattern,p,delta', PATTERN_ARGS)
def test_masks_batch_independent_with_generator_list(pattern, p, delta):
    corruption = ad.MaskCorruption(pattern, p, delta)
    seeds = [11, 12, 13, 14]
    batch = corruption.sample_sampling_mask((4, 3, 16, 16), generator=[gen(s) for s in seeds])
    A = corruption.sample_mask((4, 3, 16, 16), generator=[gen(s) for s in seeds])
    for i, s in enumerate(seeds):
        assert torch.equal(batch[i], corruption.sample_sampling_mask((1, 3, 16, 16), generator=gen(s))[0])
        assert torch.equal(A[i], corruption.sample_mask((1, 3, 16, 16), generator=gen(s))[0])


def test_functional_hat_masks_match_corruption():
    A = ad.dust_mask((2, 3, 8, 8), 0.5, generator=gen(0))
    assert torch.equal(ad.hat_dust_mask(A, 0.5, generator=gen(1)),
                       ad.MaskCorruption('dust', 0.5, 0.5).sample_hat_mask(A, generator=gen(1)))
    for fn, pattern in [(ad.hat_box_mask, 'box'), (ad.hat_fixed_box_mask, 'fixed_box'),
                        (ad.hat_keep_patch_mask, 'keep_patch')]:
        corruption = ad.MaskCorruption(pattern, 0.5, 0.5)
        A = corruption.sample_mask((2, 3, 8, 8), generator=gen(0))
        assert torch.equal(fn(A, 0.5, generator=gen(1)), corruption.sample_hat_mask(A, generator=gen(1)))

#----------------------------------------------------------------------------
# Box geometry.

def test_box_contiguous_exact_side_and_clipped():
    H, W, p = 16, 12, 0.3
    side_h, side_w = math.ceil(p * H), math.ceil(p * W)
    masks = ad.box_mask((400, 1, H, W), p, generator=gen(0)).numpy()[:, 0]
    clipped = 0
    for plane in masks:
        top, left, h, w, count = zero_bbox(plane)
        assert count == h * w                                     # a solid rectangle
        assert h == min(side_h, H - top) and w == min(side_w, W - left)
        clipped += (h < side_h) or (w < side_w)
    assert 0 < clipped < len(masks)


def test_fixed_box_fully_inside_all_starts():
    H, W, p = 8, 10, 0.5
    side_h, side_w = int(p * H), int(p * W)
    masks = ad.fixed_box_mask((600, 1, H, W), p, generator=gen(1)).numpy()[:, 0]
    tops, lefts = set(), set()
    for plane in masks:
        top, left, h, w, count = zero_bbox(plane)
        assert (h, w, count) == (side_h, side_w, side_h * side_w)
        tops.add(top), lefts.add(left)
    assert tops == set(range(H - side_h + 1)) and lefts == set(range(W - side_w + 1))   # incl. last row/col


def test_keep_patch_area_and_hat_inside():
    H, p, delta = 12, 0.5, 0.5
    s = int((1 - p) * H)
    s_hat = max(1, int((1 - delta) * s))
    corruption = ad.MaskCorruption('keep_patch', p, delta)
    A = corruption.sample_mask((500, 2, H, H), generator=gen(2))
    A_hat = corruption.sample_hat_mask(A, generator=gen(3))
    starts, offsets = set(), set()
    for a, a_hat in zip(A.numpy()[:, 0], A_hat.numpy()[:, 0]):
        top, left, h, w, count = zero_bbox(1 - a)
        assert (h, w, count) == (s, s, s * s)
        hat_top, hat_left, hh, hw, hat_count = zero_bbox(1 - a_hat)
        assert (hh, hw, hat_count) == (s_hat, s_hat, s_hat ** 2)
        assert top <= hat_top and hat_top + s_hat <= top + s and left <= hat_left and hat_left + s_hat <= left + s
        starts.add(top), offsets.add(hat_top - top)
    assert starts == set(range(H - s + 1)) and offsets == set(range(s - s_hat + 1))


def test_hat_boxes_have_side_delta():
    H, W, delta = 16, 12, 0.25
    ones = torch.ones(300, 1, H, W)
    for plane in ad.hat_box_mask(ones, delta, generator=gen(0)).numpy()[:, 0]:
        top, left, h, w, count = zero_bbox(plane)
        assert (h, w, count) == (min(math.ceil(delta * H), H - top), min(math.ceil(delta * W), W - left), h * w)
    for plane in ad.hat_fixed_box_mask(ones, delta, generator=gen(1)).numpy()[:, 0]:
        assert zero_bbox(plane)[2:] == (int(delta * H), int(delta * W), int(delta * H) * int(delta * W))


@pytest.mark.parametrize('pattern', ad.MASK_PATTERNS)
def test_delta_zero_keeps_mask(pattern):
    corruption = ad.MaskCorruption(pattern, 0.5, 0.0)
    A = corruption.sample_mask((8, 3, 16, 16), generator=gen(0))
    assert torch.equal(corruption.sample_hat_mask(A, generator=gen(1)), A)


def test_edge_cases_that_crashed_upstream():
    assert bool((ad.MaskCorruption('keep_patch', 0.0, 0.0).sample_mask((2, 3, 8, 8), gen(0)) == 1).all())
    assert bool((ad.MaskCorruption('fixed_box', 0.0, 0.0).sample_mask((2, 3, 8, 8), gen(0)) == 1).all())
    A = ad.MaskCorruption('keep_patch', 0.9, 0.9).sample_sampling_mask((2, 1, 10, 10), gen(0))
    assert A.sum(dim=(1, 2, 3)).tolist() == [1.0, 1.0]            # s = 1, s' = max(1, 0) = 1


def test_sides_tolerate_float_error():
    # (1 - 0.8) * 10 = 1.9999999999999996 and 0.3 * 10 = 3.0000000000000004 in floating point.
    assert zero_bbox(1 - ad.keep_patch_mask((1, 1, 10, 10), 1 - 0.8, gen(0))[0, 0].numpy())[2:] == (2, 2, 4)
    assert zero_bbox(ad.fixed_box_mask((1, 1, 10, 10), 0.7, gen(0))[0, 0].numpy())[2:] == (7, 7, 49)
    boxes = ad.box_mask((50, 1, 10, 10), 0.3, gen(0)).numpy()[:, 0]
    assert max(zero_bbox(b)[2] for b in boxes) == 3
    A = ad.MaskCorruption('keep_patch', 0.0, 0.7).sample_sampling_mask((1, 1, 10, 10), gen(0))
    assert A.sum().item() == 9                                     # int((1 - 0.7) * 10) = 3


def test_mask_corruption_json_round_trip():
    corruption = ad.MaskCorruption('fixed_box', 0.4, 0.2, True)
    restored = ad.MaskCorruption.from_dict(json.loads(json.dumps(corruption.to_dict())))
    assert restored == corruption and restored.to_dict() == corruption.to_dict()
    assert ad.get_mask_corruption('fixed_box', 0.4, 0.2, True) == corruption

#----------------------------------------------------------------------------
# Validation.

@pytest.mark.parametrize('value', [-0.1, 1.0, 1.5, float('nan'), True, '0.5'])
def test_probability_errors(value):
    with pytest.raises(ValueError, match=r'corruption_probability=.*\[0, 1\)'):
        ad.MaskCorruption('dust', corruption_probability=value)
    with pytest.raises(ValueError, match=r'delta_probability=.*\[0, 1\)'):
        ad.MaskCorruption('box', delta_probability=value)
    with pytest.raises(ValueError, match='corruption_probability='):
        ad.dust_mask((1, 1, 4, 4), value)
    with pytest.raises(ValueError, match='size_fraction='):
        ad.box_mask((1, 1, 4, 4), value)


def test_other_validation_errors():
    with pytest.raises(ValueError, match="pattern='stripes'.*dust, box, fixed_box, keep_patch"):
        ad.MaskCorruption('stripes')
    with pytest.raises(ValueError, match=r'shape=\(3, 8, 8\).*\[N, C, H, W\]'):
        ad.dust_mask((3, 8, 8), 0.5)
    with pytest.raises(ValueError, match='corruption_probability=0.95.*0x0 patch'):
        ad.MaskCorruption('keep_patch', 0.95).sample_mask((1, 1, 8, 8))
    with pytest.raises(ValueError, match='size_fraction=0.1 keeps a 0x0 patch'):
        ad.keep_patch_mask((1, 1, 8, 8), 0.1)
    with pytest.raises(ValueError, match=r'size_fraction=0 .*\(0, 1\]'):
        ad.keep_patch_mask((1, 1, 8, 8), 0)
    with pytest.raises(ValueError, match='no observed pixel'):
        ad.hat_keep_patch_mask(torch.zeros(1, 1, 4, 4), 0.5)
    with pytest.raises(ValueError, match='list of 2 items for a batch of 3'):
        ad.dust_mask((3, 1, 4, 4), 0.5, generator=[gen(0), gen(1)])
    with pytest.raises(ValueError, match="unknown MaskCorruption keys \\['seed'\\]"):
        ad.MaskCorruption.from_dict(dict(pattern='dust', seed=0))
    for m in (1, 0, 2.5):
        with pytest.raises(ValueError, match=f'num_measurements={m}.*>= 2'):
            ad.CompressedSensing(m)
    with pytest.raises(ValueError, match='num_measurements=49 exceeds.*C·H·W = 48'):
        ad.CompressedSensing(49).sample_params((1, 3, 4, 4))
    for k in (0, -1, 4, 3.0):
        with pytest.raises(ValueError, match=f'kernel_size={k}.*odd integer'):
            ad.GaussianBlur(kernel_size=k)
        with pytest.raises(ValueError, match=f'kernel_size={k}.*odd integer'):
            ad.MotionBlur(kernel_size=k)
    for std in (0, -1.0, float('inf')):
        with pytest.raises(ValueError, match=f'kernel_std={std}.*> 0'):
            ad.GaussianBlur(kernel_std=std)
    for intensity in (-0.1, 1.5, 3):
        with pytest.raises(ValueError, match=rf'intensity={intensity}.*\[0, 1\]'):
            ad.MotionBlur(intensity=intensity)
        with pytest.raises(ValueError, match=rf'intensity={intensity}.*\[0, 1\]'):
            random_motion_kernel(9, intensity, gen(0))
    with pytest.raises(ValueError, match='kernel_size=9 is too large for 4x4'):
        ad.GaussianBlur(9, 1.0).corrupt(torch.zeros(1, 1, 4, 4))
    for f in (0, -2, 1.5):
        with pytest.raises(ValueError, match=f'downsampling_factor={f}.*integer >= 1'):
            ad.Averaging(f)
    with pytest.raises(ValueError, match='downsampling_factor=3 does not divide.*16x16'):
        ad.Averaging(3).corrupt(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r'corruption_probability=1.5.*\[0, 1\]'):
        ad.Averaging(2, 1.5)

#----------------------------------------------------------------------------
# Forward operators.

def test_averaging_idempotent_and_block_mean():
    f = 4
    x = torch.randn(3, 2, 16, 8, dtype=torch.float64, generator=gen(0))
    op = ad.Averaging(f)
    y, flags = op.corrupt(x, generator=gen(1))
    assert flags.shape == (3, 1, 1, 1) and bool((flags == 1).all())      # p defaults to 1
    assert torch.allclose(op.apply(y, flags), y, atol=1e-12)
    blocks = x.numpy().reshape(3, 2, 16 // f, f, 8 // f, f).mean(axis=(3, 5))
    expected = np.repeat(np.repeat(blocks, f, axis=2), f, axis=3)
    np.testing.assert_allclose(y.numpy(), expected, atol=1e-12)
    assert torch.equal(op.naive_inverse(y, flags), y)


def test_averaging_flags_and_hat():
    op = ad.Averaging(2, corruption_probability=0.5)
    flags = op.sample_params((4000, 1, 2, 2), generator=gen(0))
    assert_rate(flags.mean().item(), 0.5, 4000)
    x = torch.randn(8, 3, 4, 4, generator=gen(1))
    y, flags = op.corrupt(x, generator=gen(2))
    kept = flags.flatten() == 0
    assert 0 < kept.sum() < 8 and torch.equal(y[kept], x[kept])
    y_hat, hat_flags = op.hat_corrupt(x, flags)
    assert bool((hat_flags == 1).all()) and torch.allclose(y_hat, ad.Averaging(2).corrupt(x)[0])


def test_compressed_sensing_scale_and_matmul():
    m = 16
    op = ad.CompressedSensing(m)
    phi = op.sample_params((512, 1, 4, 4), generator=gen(0))
    assert phi.shape == (512, m, 1, 4, 4) and phi.dtype == torch.float32
    n = phi.numel()
    assert abs(phi.var().item() - 1 / m) < 5 * (1 / m) * math.sqrt(2 / n)
    x = torch.randn(1, 1, 4, 4, generator=gen(1)).expand(512, 1, 4, 4)
    ratio = op.apply(x, phi).pow(2).sum(1) / x.flatten(1).pow(2).sum(1)           # chi2_m / m per sample
    assert abs(ratio.mean().item() - 1) < 5 * math.sqrt(2 / m / 512)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=gen(2))
    y, phi = op.corrupt(x, generator=gen(3))
    expected = np.einsum('nmd,nd->nm', phi.double().flatten(2).numpy(), x.flatten(1).numpy())
    assert y.shape == (3, m) and y.dtype == torch.float64 and not op.measurement_is_image
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_compressed_sensing_hat_and_naive_inverse():
    m = 6
    op = ad.CompressedSensing(m)
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64, generator=gen(0))
    y, phi = op.corrupt(x, generator=gen(1))
    y_hat, phi_hat = op.hat_corrupt(x, phi, generator=gen(2))
    assert phi_hat.shape == phi.shape and y_hat.shape == (4, m)
    for i in range(4):
        old_rows = [r for r in phi[i].flatten(1)]
        kept = phi_hat[i, :m - 1].flatten(1)
        matches = [next(j for j, r in enumerate(old_rows) if torch.equal(r, k)) for k in kept]
        assert len(set(matches)) == m - 1 and matches == sorted(matches)           # m-1 rows of Φ, in order
        assert not any(torch.equal(phi_hat[i, -1].flatten(), r) for r in old_rows)
    assert torch.allclose(y_hat, op.apply(x, phi_hat))
    many = op.sample_params((300, 1, 2, 4), generator=gen(4))                     # the dropped row is uniform
    many_hat = op.sample_hat_params(many, generator=gen(5))
    unchanged = (many_hat[:, :m - 1] == many[:, :m - 1]).flatten(2).all(2)         # [N, m-1]
    dropped = torch.where(unchanged.all(1), m - 1, (~unchanged).int().argmax(1))
    counts = torch.bincount(dropped, minlength=m).double()
    assert abs(counts / 300 - 1 / m).max() < 5 * math.sqrt((1 / m) * (1 - 1 / m) / 300)
    y_hat, phi_hat = op.hat_corrupt(x, generator=gen(3))                           # params=None works
    assert y_hat.shape == (4, m) and phi_hat.shape == (4, m, 3, 4, 4)
    x_hat = op.naive_inverse(y, phi)
    assert x_hat.shape == x.shape and torch.allclose(op.apply(x_hat, phi), y, atol=1e-10)
    phi_np = phi.double().flatten(2).numpy()
    for i in range(4):                                                             # minimum-norm solution
        ref = np.linalg.lstsq(phi_np[i], y[i].numpy(), rcond=None)[0]
        np.testing.assert_allclose(x_hat[i].flatten().numpy(), ref, atol=1e-10)


def test_gaussian_kernel_matches_scipy():
    sigma, k = 1.0, 9
    assert int(4 * sigma + 0.5) == k // 2
    delta = np.zeros((k, k))
    delta[k // 2, k // 2] = 1
    ref = scipy.ndimage.gaussian_filter(delta, sigma)
    np.testing.assert_allclose(ad.gaussian_kernel(k, sigma).double().numpy(), ref, atol=1e-7)
    op = ad.GaussianBlur(k, sigma)
    x = torch.randn(2, 3, 12, 10, dtype=torch.float64, generator=gen(0))
    y, params = op.corrupt(x)
    assert params.shape == (2, 1, k, k) and y.dtype == torch.float64
    for n in range(2):
        for c in range(3):
            expected = scipy.ndimage.correlate(x[n, c].numpy(), params[n, 0].double().numpy(), mode='mirror')
            np.testing.assert_allclose(y[n, c].numpy(), expected, atol=1e-12)


@pytest.mark.parametrize('op', [ad.GaussianBlur(5, 2.0), ad.MotionBlur(7, 0.8)], ids=['gaussian', 'motion'])
def test_blur_constant_linear_and_hat(op):
    params = op.sample_params((2, 3, 16, 16), generator=gen(0))
    const = torch.full((2, 3, 16, 16), 0.7)
    assert torch.allclose(op.apply(const, params), const, atol=1e-6)
    x, z = torch.randn(2, 2, 3, 16, 16, dtype=torch.float64, generator=gen(1))
    assert torch.allclose(op.apply(2 * x - 3 * z, params), 2 * op.apply(x, params) - 3 * op.apply(z, params),
                          atol=1e-12)
    y_hat, hat_params = op.hat_corrupt(x, params)
    assert torch.allclose(y_hat, op.apply(op.apply(x, params), params), atol=1e-12)   # Ãx = blur(Ax)
    assert torch.equal(op.naive_inverse(x, params), x)


def test_motion_kernels():
    for intensity in (0.0, 0.3, 1.0):
        kernels = random_motion_kernels(32, 9, intensity, gen(0))
        assert kernels.shape == (32, 9, 9) and kernels.dtype == torch.float32
        assert bool((kernels >= 0).all()) and torch.allclose(kernels.sum((1, 2)), torch.ones(32), atol=1e-6)
    assert torch.equal(random_motion_kernel(9, 0.5, gen(1)), random_motion_kernel(9, 0.5, gen(1)))
    assert not torch.equal(random_motion_kernel(9, 0.5, gen(1)), random_motion_kernel(9, 0.5, gen(2)))
    assert torch.equal(random_motion_kernel(1, 0.7, gen(0)), torch.ones(1, 1))
    # Intensity 0 is close to a delta; higher intensity spreads the kernel further from its centre.
    grid = torch.stack(torch.meshgrid(torch.arange(15.0), torch.arange(15.0), indexing='ij'))     # [2, k, k]
    def spread(kernels):
        mean = (kernels[:, None] * grid).sum((2, 3))
        return ((kernels[:, None] * (grid - mean[:, :, None, None]) ** 2).sum((1, 2, 3))).mean().item()
    spreads = [spread(random_motion_kernels(64, 15, i, gen(3))) for i in (0.0, 0.5, 1.0)]
    assert spreads[0] < 1.0 and spreads[0] < spreads[1] < spreads[2]
    near_delta = random_motion_kernels(64, 9, 0.0, gen(4))
    assert torch.allclose(near_delta[:, 3:6, 3:6].sum((1, 2)), torch.ones(64), atol=1e-6)    # within 1 px


@pytest.mark.parametrize('make', [lambda: ad.RandomInpainting(0.5, 0.3), lambda: ad.BoxInpainting(0.4, 0.3),
                                  lambda: ad.Averaging(2, 0.5), lambda: ad.CompressedSensing(5),
                                  lambda: ad.MotionBlur(5, 0.5)],
                         ids=['dust', 'box', 'averaging', 'cs', 'motion'])
def test_operators_batch_independent_with_generator_list(make):
    op = make()
    seeds = [21, 22, 23]
    x = torch.randn(3, 2, 8, 8, generator=gen(0))
    y, params = op.corrupt(x, generator=[gen(s) for s in seeds])
    y_hat, hat_params = op.hat_corrupt(x, generator=[gen(s) for s in seeds])
    for i, s in enumerate(seeds):
        y_i, params_i = op.corrupt(x[i:i + 1], generator=gen(s))
        assert torch.equal(params[i], params_i[0]) and torch.allclose(y[i], y_i[0], atol=1e-6)
        y_hat_i, hat_params_i = op.hat_corrupt(x[i:i + 1], generator=gen(s))
        assert torch.equal(hat_params[i], hat_params_i[0])


def test_get_operator_names():
    assert isinstance(ad.get_operator('dust', 0.3), ad.RandomInpainting)
    op = ad.get_operator('random_inpainting', 0.3, 0.1, mask_full_rgb=False)
    assert op.corruption.to_dict() == dict(pattern='dust', corruption_probability=0.3, delta_probability=0.1,
                                           mask_full_rgb=False)
    assert ad.get_operator('box_masking', 0.4).corruption.pattern == 'box'
    averaging = ad.get_operator('averaging', downsampling_factor=4)
    assert isinstance(averaging, ad.Averaging) and averaging.corruption_probability == 1.0
    assert averaging.downsampling_factor == 4
    assert ad.get_operator('averaging', 0.4).corruption_probability == 0.4
    assert ad.get_operator('compressed_sensing', num_measurements=7).num_measurements == 7
    gaussian = ad.get_operator('blurring', kernel_size=5, kernel_std=1.5)
    assert isinstance(gaussian, ad.GaussianBlur) and torch.equal(gaussian.kernel, ad.gaussian_kernel(5, 1.5))
    motion = ad.get_operator('blurring', blur_type='motion', kernel_size=7, kernel_std=3.0, intensity=0.2)
    assert isinstance(motion, ad.MotionBlur) and (motion.kernel_size, motion.intensity) == (7, 0.2)
    with pytest.raises(ValueError, match="name='inpaint'.*dust, random_inpainting, box_masking, averaging"):
        ad.get_operator('inpaint')
    with pytest.raises(ValueError, match="blur_type='box'.*gaussian, motion"):
        ad.get_operator('blurring', blur_type='box')


ALL_OPERATORS = [ad.RandomInpainting(0.5, 0.2), ad.BoxInpainting(0.3, 0.2), ad.Averaging(4),
                 ad.CompressedSensing(8), ad.GaussianBlur(5, 1.0), ad.MotionBlur(5, 0.5)]


@pytest.mark.parametrize('op', ALL_OPERATORS, ids=lambda op: type(op).__name__)
def test_operators_float64_and_differentiable(op):
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=gen(0), requires_grad=True)
    y, params = op.corrupt(x, generator=gen(1))
    y_hat, _ = op.hat_corrupt(x, params, generator=gen(2))
    x_naive = op.naive_inverse(y.detach(), params)
    assert y.dtype == y_hat.dtype == x_naive.dtype == torch.float64 and x_naive.shape == x.shape
    assert (y.shape == x.shape) == op.measurement_is_image
    target = torch.randn(y.shape, dtype=torch.float64, generator=gen(3))
    (grad,) = torch.autograd.grad((y - target).pow(2).sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    if isinstance(op, (ad.RandomInpainting, ad.BoxInpainting)):
        hidden = params == 0
        assert hidden.any() and bool((grad[hidden] == 0).all())                   # hidden pixels get no gradient


@pytest.mark.gpu
def test_cuda_devices():
    cuda = torch.device('cuda')
    corruption = ad.MaskCorruption('dust', 0.5, 0.5, True)
    on_cpu = corruption.sample_sampling_mask((2, 3, 8, 8), generator=gen(0))
    moved = corruption.sample_sampling_mask((2, 3, 8, 8), generator=gen(0), device=cuda)
    assert moved.device.type == 'cuda' and torch.equal(moved.cpu(), on_cpu)        # drawn on the CPU generator
    cuda_gen = torch.Generator(device=cuda).manual_seed(0)
    for pattern in ad.MASK_PATTERNS:
        A = ad.MaskCorruption(pattern, 0.5, 0.5).sample_sampling_mask((2, 3, 8, 8), generator=cuda_gen)
        assert A.device.type == 'cuda'
    x = torch.randn(2, 3, 8, 8, device=cuda)
    for op in ALL_OPERATORS:
        y, params = op.corrupt(x, generator=torch.Generator(device=cuda).manual_seed(1))
        y_hat, _ = op.hat_corrupt(x, params, generator=torch.Generator(device=cuda).manual_seed(2))
        assert y.device.type == y_hat.device.type == op.naive_inverse(y, params).device.type == 'cuda'
        y_cpu, _ = op.corrupt(x.cpu(), params.cpu())
        assert torch.allclose(y.cpu(), y_cpu, atol=1e-5)
    kernel = random_motion_kernel(9, 0.5, torch.Generator(device=cuda).manual_seed(0))
    assert kernel.device.type == 'cuda' and abs(kernel.sum().item() - 1) < 1e-5
