"""Tests for noisy and low-quality data (SPEC §3): the Tweedie losses of training/loss.py, the noise annotations and
synthetic noise of training/dataset.py, the σ-first sampler of training/sigma_first.py, and their use by train.py.

The math is checked in float64 against independent references: the pseudo-target form of the loss, EDMLoss, and
the closed forms of E[x_n | x_t] under a Gaussian prior (joint Gaussian conditioning, VE and VP).
"""

import glob
import itertools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import train
from training.dataset import KIND_CODES, DatasetError, ImageFolderDataset, parse_annotations
from training.loss import (EDMLoss, NoisyAmbientLoss, NoisyAmbientVPLoss, pseudo_target, tweedie_to_lower_noise,
                           tweedie_to_lower_noise_vp)
from training.sigma_first import (NoAdmissibleImage, SigmaFirstSampler, admissibility_buffer, admissible, check_coverage,
                                  uncovered_interval)
from conftest import REPO, assert_one_line_error, random_images, steps, train_options, write_edm_dataset

NOISY, CORRUPTED = KIND_CODES['noisy'], KIND_CODES['corrupted']
INF = math.inf


def gens(n, offset=0):
    return [torch.Generator().manual_seed(offset + i) for i in range(n)]


def image_name(idx):
    """The file name write_edm_dataset (dataset_tool.py's layout) gives image `idx`."""
    return f'{idx:08d}'[:5] + f'/img{idx:08d}.png'


# ---------------------------------------------------------------------------------------------
# The loss, against independent float64 references.

class TinyDenoiser:
    """A fixed, deterministic, σ-dependent stand-in for D_θ (float64); remembers its inputs."""

    def __init__(self, channels=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(channels, channels, 3, 3, generator=g, dtype=torch.float64) / 9
        self.calls = []

    def __call__(self, x, sigma, labels=None, augment_labels=None):
        self.calls.append(dict(x=x.clone(), sigma=sigma.clone()))
        return x / (1 + sigma ** 2) + 0.3 * sigma * torch.tanh(F.conv2d(x, self.weight, padding=1))


# (σ_t, σ_min, σ_max, kind, the σ_tn SPEC §3 prescribes)
ROWS = [
    (0.7, 0.0, INF, 0, 0.0),            # clean
    (1.5, 0.4, 0.0, NOISY, 0.4),        # noisy, high-noise branch
    (0.9, 0.5, 0.05, CORRUPTED, 0.5),   # corrupted, high-noise branch
    (0.2, 0.6, INF, NOISY, 0.0),        # noisy, low-noise branch (σ_min ≥ σ_t)
    (0.1, 0.3, 0.2, CORRUPTED, 0.0),    # corrupted, low-noise branch
    (3.0, 2.9, 0.0, NOISY, 2.9),        # σ_tn close to σ_t: a large ambient factor
]


def noisy_batch(rows=ROWS, seed=0, resolution=4):
    """images, fixed noise (non-zero for every image, to show where it is ignored) and noise_info, float64."""
    g = torch.Generator().manual_seed(seed)
    n = len(rows)
    images = torch.rand(n, 3, resolution, resolution, generator=g, dtype=torch.float64) * 2 - 1
    fixed_noise = torch.randn(n, 3, resolution, resolution, generator=g, dtype=torch.float64)
    noise_info = torch.tensor([row[:4] for row in rows], dtype=torch.float64)
    return images, fixed_noise, noise_info


def reference_x_t(images, fixed_noise, rows, seeds):
    """x_tn and x_t rebuilt from SPEC §3 with the per-sample generators' first draw as the noise."""
    sigma = torch.tensor([r[0] for r in rows], dtype=torch.float64).reshape(-1, 1, 1, 1)
    sigma_tn = torch.tensor([r[4] for r in rows], dtype=torch.float64).reshape(-1, 1, 1, 1)
    corrupted = torch.tensor([r[3] == CORRUPTED for r in rows], dtype=torch.float64).reshape(-1, 1, 1, 1)
    x_tn = images + corrupted * sigma_tn * fixed_noise
    z = torch.cat([torch.randn(1, *images.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
    x_t = x_tn + (sigma ** 2 - sigma_tn ** 2).sqrt() * z.double()
    return sigma, sigma_tn, x_tn, x_t


def test_noisy_loss_is_edm_weighted_error_against_the_pseudo_target():
    """loss = λ_EDM(σ_t)·(D − y)², y = (σ_t² x_tn − σ_tn² x_t)/(σ_t² − σ_tn²), for every kind and branch."""
    images, fixed_noise, noise_info = noisy_batch()
    net = TinyDenoiser()
    loss, diagnostics = NoisyAmbientLoss()(net, images, noise_info, fixed_noise, generator=gens(len(ROWS), 10))
    sigma, sigma_tn, x_tn, x_t = reference_x_t(images, fixed_noise, ROWS, range(10, 10 + len(ROWS)))
    torch.testing.assert_close(net.calls[0]['x'], x_t, rtol=0, atol=1e-12)
    D = net(x_t, sigma)
    y = (sigma ** 2 * x_tn - sigma_tn ** 2 * x_t) / (sigma ** 2 - sigma_tn ** 2)
    lam = (sigma ** 2 + 0.5 ** 2) / (sigma * 0.5) ** 2
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, lam * (D - y) ** 2, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(pseudo_target(x_tn, x_t, sigma, sigma_tn), y, rtol=1e-12, atol=1e-12)
    assert diagnostics['clean_target_share'].tolist() == [float(r[4] == 0) for r in ROWS]


def test_ambient_factor_false_is_edm_weighted_error_at_the_lower_level():
    """--ambient_factor=False: λ_EDM(σ_t)·‖x̂_tn − x_tn‖², x̂_tn = (1 − σ_tn²/σ_t²)·D + (σ_tn²/σ_t²)·x_t; with the
    factor the loss is a = σ_t⁴/(σ_t² − σ_tn²)² times that."""
    images, fixed_noise, noise_info = noisy_batch()
    net = TinyDenoiser()
    loss, _ = NoisyAmbientLoss(ambient_factor=False)(net, images, noise_info, fixed_noise, generator=gens(len(ROWS)))
    with_factor, _ = NoisyAmbientLoss()(net, images, noise_info, fixed_noise, generator=gens(len(ROWS)))
    sigma, sigma_tn, x_tn, x_t = reference_x_t(images, fixed_noise, ROWS, range(len(ROWS)))
    r = sigma_tn ** 2 / sigma ** 2
    x_hat_tn = (1 - r) * net(x_t, sigma) + r * x_t
    lam = (sigma ** 2 + 0.25) / (sigma ** 2 * 0.25)
    torch.testing.assert_close(loss, lam * (x_hat_tn - x_tn) ** 2, rtol=1e-9, atol=1e-12)
    a = sigma ** 4 / (sigma ** 2 - sigma_tn ** 2) ** 2
    torch.testing.assert_close(with_factor, a * loss, rtol=1e-9, atol=1e-12)
    assert a.max() > 100  # not vacuous: the factor is far from 1 for the last row


@pytest.mark.parametrize('rows', [
    [(s, 0.0, INF, 0, 0.0) for s in (0.002, 0.3, 1.0, 7.0, 80.0)],                 # every image clean
    [(0.2, 0.6, INF, NOISY, 0.0), (0.1, 0.3, 0.2, CORRUPTED, 0.0), (0.5, 0.5, INF, NOISY, 0.0)],  # σ_min ≥ σ_t
])
def test_sigma_tn_zero_is_edm_loss_draw_for_draw(rows):
    """σ_tn = 0 (clean images, or the low-noise branch σ_min ≥ σ_t) gives EDMLoss at the same σ exactly, with the
    same draws from the same per-sample generators (and no others)."""
    images, fixed_noise, noise_info = noisy_batch(rows, seed=1, resolution=8)
    net = TinyDenoiser()
    g_noisy, g_edm = gens(len(rows), 3), gens(len(rows), 3)
    loss, diagnostics = NoisyAmbientLoss()(net, images, noise_info, fixed_noise, generator=g_noisy)
    sigma = noise_info[:, 0].reshape(-1, 1, 1, 1)
    expected, _ = EDMLoss()(net, images, generator=g_edm, sigma=sigma)
    torch.testing.assert_close(loss, expected, rtol=1e-13, atol=0)  # sqrt(σ² − 0) may differ from σ by an ulp
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(g_noisy, g_edm))
    assert (diagnostics['clean_target_share'] == 1).all()


def test_corrupted_images_get_fixed_noise_and_noisy_images_are_used_as_they_are():
    """x_t = image + σ_tn·n_fixed + sqrt(σ_t² − σ_tn²)·z for kind 'corrupted', image + sqrt(σ_t² − σ_tn²)·z for kind
    'noisy' (its own noise is the σ_tn part); the fixed noise is ignored for 'noisy' even when non-zero."""
    rows = [(1.0, 0.4, 0.0, NOISY, 0.4), (1.0, 0.4, 0.0, CORRUPTED, 0.4)]
    images, fixed_noise, noise_info = noisy_batch(rows, seed=2)
    images[1], fixed_noise[1] = images[0], fixed_noise[0]  # the same image and fixed noise, only the kind differs
    net = TinyDenoiser()
    same_draws = [torch.Generator().manual_seed(7) for _ in range(2)]
    NoisyAmbientLoss()(net, images, noise_info, fixed_noise, generator=same_draws)
    z = torch.randn(1, *images.shape[1:], generator=torch.Generator().manual_seed(7)).double()[0]
    x_t = net.calls[0]['x']
    torch.testing.assert_close(x_t[0], images[0] + math.sqrt(1 - 0.16) * z, rtol=0, atol=1e-12)
    torch.testing.assert_close(x_t[1], images[0] + 0.4 * fixed_noise[0] + math.sqrt(1 - 0.16) * z, rtol=0, atol=1e-12)


def test_noisy_loss_needs_the_sampler_sigma():
    images, fixed_noise, noise_info = noisy_batch()
    noise_info[2, 0] = math.nan
    with pytest.raises(ValueError, match='σ-first sampler'):
        NoisyAmbientLoss()(TinyDenoiser(), images, noise_info, fixed_noise)


def test_tweedie_to_lower_noise_is_the_gaussian_posterior_mean():
    """x0 ~ N(μ, s²), x_n = x0 + σ_n ε, x_t = x_n + sqrt(σ_t² − σ_n²) z: E[x_n | x_t] = μ + (s² + σ_n²)/(s² + σ_t²)·(x_t − μ)
    (joint Gaussian conditioning), from the exact x̂0 = E[x0 | x_t]; the pseudo-target of it is x̂0 again."""
    mu, s = 0.3, 0.7
    x_t = torch.linspace(-4, 4, 17, dtype=torch.float64)
    for sigma_t, sigma_n in [(0.5, 0.0), (0.5, 0.2), (0.5, 0.45), (2.0, 1.3), (40.0, 0.02)]:
        x0_hat = mu + s ** 2 / (s ** 2 + sigma_t ** 2) * (x_t - mu)
        expected = mu + (s ** 2 + sigma_n ** 2) / (s ** 2 + sigma_t ** 2) * (x_t - mu)
        x_n_hat = tweedie_to_lower_noise(x0_hat, x_t, sigma_t, sigma_n)
        torch.testing.assert_close(x_n_hat, expected, rtol=1e-12, atol=1e-12)
        if sigma_n > 0:
            torch.testing.assert_close(pseudo_target(x_n_hat, x_t, sigma_t, sigma_n), x0_hat, rtol=1e-10, atol=1e-12)
    # Per-sample levels [N] broadcast over [N, C, H, W].
    x_t = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma_t = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    sigma_n = torch.tensor([0.1, 0.0, 2.0], dtype=torch.float64)
    st, sn = sigma_t.reshape(-1, 1, 1, 1), sigma_n.reshape(-1, 1, 1, 1)
    x0_hat = mu + s ** 2 / (s ** 2 + st ** 2) * (x_t - mu)
    torch.testing.assert_close(tweedie_to_lower_noise(x0_hat, x_t, sigma_t, sigma_n),
                               mu + (s ** 2 + sn ** 2) / (s ** 2 + st ** 2) * (x_t - mu), rtol=1e-12, atol=1e-12)


def test_tweedie_to_lower_noise_vp_is_the_gaussian_posterior_mean():
    """VP: x = sqrt(1 − s²)·x0 + s·ε, x_t = α x_n + β z (α = a_t/a_n, β² = s_t² − α² s_n²). With x0 ~ N(μ, v):
    E[x_n | x_t] = a_n μ + α(a_n² v + s_n²)/(a_t² v + s_t²)·(x_t − a_t μ), from x̂0 = μ + a_t v/(a_t² v + s_t²)·(x_t − a_t μ)."""
    mu, v = -0.2, 0.45
    x_t = torch.linspace(-3, 3, 13, dtype=torch.float64)
    for s_t, s_n in [(0.6, 0.0), (0.6, 0.3), (0.6, 0.59), (0.95, 0.55), (0.999, 0.9)]:
        a_t, a_n = math.sqrt(1 - s_t ** 2), math.sqrt(1 - s_n ** 2)
        alpha = a_t / a_n
        x0_hat = mu + a_t * v / (a_t ** 2 * v + s_t ** 2) * (x_t - a_t * mu)
        expected = a_n * mu + alpha * (a_n ** 2 * v + s_n ** 2) / (a_t ** 2 * v + s_t ** 2) * (x_t - a_t * mu)
        torch.testing.assert_close(tweedie_to_lower_noise_vp(x0_hat, x_t, s_t, s_n), expected, rtol=1e-10, atol=1e-12)
    for s_t, s_n in [(0.3, 0.5), (1.0, 0.5), (0.5, -0.1)]:  # swapped levels, s_t = 1, a negative level
        with pytest.raises(ValueError, match='vp_sigma_n <= vp_sigma_t < 1'):
            tweedie_to_lower_noise_vp(x_t, x_t, s_t, s_n)


# ---------------------------------------------------------------------------------------------
# The dataset: annotations and synthetic noise.

N_IMAGES = 16


@pytest.fixture(scope='module')
def images():
    return random_images(N_IMAGES, channels=3, resolution=16, seed=4)


@pytest.fixture(scope='module')
def data_zip(tmp_path_factory, images):
    return write_edm_dataset(tmp_path_factory.mktemp('noisy') / 'data.zip', images)


def annotated_dataset(root, images, annotations):
    """A folder dataset whose dataset.json holds `annotations` (any JSON value)."""
    write_edm_dataset(root, images)
    with open(os.path.join(root, 'dataset.json'), 'w') as f:
        json.dump({'labels': None, 'annotations': annotations}, f)
    return str(root)


def as_float(images):
    """uint8 [N, H, W, C] -> the dataset's float32 [N, C, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1


N0, N1 = image_name(0), image_name(1)


@pytest.mark.parametrize('entries,needles', [
    ([['00000/missing.png', 0.1, None, 'noisy']], ['00000/missing.png', 'not an image']),
    ([[N0, -0.1, None, 'noisy']], [N0, 'sigma_min', '-0.1']),
    ([[N0, 0.1, -2, 'corrupted']], [N0, 'sigma_max', '-2']),
    ([[N0, math.nan, None, 'noisy']], [N0, 'sigma_min', 'nan']),
    ([[N0, 0.1, math.nan, 'noisy']], [N0, 'sigma_max', 'nan']),
    ([[N0, 'inf', None, 'noisy']], [N0, 'sigma_min', 'inf']),
    ([[N0, 'abc', None, 'noisy']], [N0, 'sigma_min', 'abc']),
    ([[N0, 0.1, None]], [N0, 'kind']),
    ([[N0, 0.1, None, 'blurry']], [N0, "'blurry'", 'kind']),
    ([[N0, 0.1, None, None]], [N0, 'kind']),
    ([[N0, 0.1, 0, 'noisy'], [N1, 0.1, 0, 'noisy'], [N0, 0.2, 0, 'noisy']], [N0, 'twice']),
    ([[N0, 0.1, 0.5, 'noisy']], [N0, 'noisy', 'never a clean target']),
    ([[N0, 0.1, None, 'noisy']], [N0, 'noisy', 'never a clean target']),
    ({N0: [0.1, None, 'noisy']}, ['must be a list']),
])
def test_bad_annotations_are_named(entries, needles):
    names = [image_name(i) for i in range(4)]
    with pytest.raises(DatasetError) as info:
        parse_annotations(entries, names, 'dataset.json in data')
    message = str(info.value)
    assert '\n' not in message and message.startswith('dataset.json in data')
    for needle in needles:
        assert needle in message, (needle, message)


def test_bad_annotations_fail_when_the_dataset_opens(tmp_path, images):
    path = annotated_dataset(tmp_path / 'data', images[:4], [[N1, -0.5, None, 'noisy']])
    with pytest.raises(DatasetError, match=f'sigma_min of {N1} is -0.5'):
        ImageFolderDataset(path)


def test_annotations_read_from_dataset_json(tmp_path, images):
    """σ_max null/"inf" -> ∞; images without an entry are clean (0, ∞); items carry (σ_t, σ_min, σ_max, kind) and the
    fixed noise of corrupted images (zeros otherwise); the images themselves are returned as stored."""
    names = [image_name(i) for i in range(8)]
    entries = [[names[1], 0.2, 0, 'noisy'], [names[2], 0.3, 'inf', 'corrupted'], [names[4], 0.1, 0.5, 'corrupted'],
               [names[6], 0.25, 'Infinity', 'corrupted']]
    path = annotated_dataset(tmp_path / 'data', images[:8], entries)
    ds = ImageFolderDataset(path, noise_items=True)
    expected = {1: (0.2, 0.0, 'noisy'), 2: (0.3, INF, 'corrupted'), 4: (0.1, 0.5, 'corrupted'), 6: (0.25, INF, 'corrupted')}
    for i in range(8):
        assert ds.annotation(i) == expected.get(i, (0.0, INF, 'clean'))
    np.testing.assert_array_equal(ds.noise_levels(), [expected.get(i, (0.0, INF))[:2] for i in range(8)])
    assert ds.has_annotations
    assert ds.noise_config() == dict(noise_sigma=None, clean_fraction=0.0, num_noisy=1, num_corrupted=3)
    clean = as_float(images[:8])
    for i in range(8):
        image, _, _, _, info, fixed = ds[i]
        assert torch.equal(image, clean[i])  # annotated images are used as stored
        level = expected.get(i, (0.0, INF, 'clean'))
        assert math.isnan(info[0]) and info[1:].tolist() == [pytest.approx(level[0]), level[1], KIND_CODES[level[2]]]
        if level[2] == 'corrupted':
            assert fixed.std() > 0.5 and torch.equal(fixed, ds[i][5])
        else:
            assert torch.equal(fixed, torch.zeros_like(fixed))
    assert ds[(4, 17, 0.75)][4][0] == pytest.approx(0.75)  # σ_t travels with a (index, position, σ) key
    assert not torch.equal(ds[2][5], ds[4][5])  # one fixed noise per image
    # Without annotations every image is clean.
    plain = ImageFolderDataset(write_edm_dataset(tmp_path / 'plain', images[:4]), noise_items=True)
    assert not plain.has_annotations and plain.noise_levels().tolist() == [[0.0, INF]] * 4


@pytest.mark.parametrize('clean_fraction,num_noisy', [(0.25, 12), (0.33, 11), (0.0, 16), (1.0, 0), (0.1, 14)])
def test_synthetic_noise_makes_the_noisy_share(data_zip, images, clean_fraction, num_noisy):
    """round((1 − F)·N) images carry noise_sigma·n (annotated (σ, 0), kind noisy); the others are returned clean."""
    sigma = 0.3
    ds = ImageFolderDataset(data_zip, noise_sigma=sigma, clean_fraction=clean_fraction)
    assert num_noisy == round((1 - clean_fraction) * N_IMAGES)
    clean = as_float(images)
    noise = torch.stack([ds[i][0] for i in range(N_IMAGES)]) - clean
    noisy = [i for i in range(N_IMAGES) if noise[i].abs().max() > 0]
    assert len(noisy) == num_noisy and noisy == ds.synthetic_noisy_indices().tolist()
    for i in range(N_IMAGES):
        assert ds.annotation(i) == ((sigma, 0.0, 'noisy') if i in noisy else (0.0, INF, 'clean'))
    assert ds.noise_config()['num_noisy'] == num_noisy and ds.has_annotations == (num_noisy > 0)
    if num_noisy:
        n = noise[noisy].double() / sigma  # standard normal, not clipped to the image range
        assert abs(n.mean()) < 5 / math.sqrt(n.numel()) and abs(n.std() - 1) < 5 / math.sqrt(2 * n.numel())
        assert (noise[noisy] + clean[noisy]).abs().max() > 1


@pytest.mark.slow
def test_synthetic_noise_is_fixed_per_image(data_zip):
    """The same noise on every read, in DataLoader workers and in a fresh Dataset object; it is part of the dataset
    (keyed by corruption_seed, not by the training seed hat_seed)."""
    kwargs = dict(noise_sigma=0.3, clean_fraction=0.25, noise_items=True)
    ds = ImageFolderDataset(data_zip, **kwargs)
    first = torch.stack([ds[i][0] for i in range(N_IMAGES)])
    assert torch.equal(first, torch.stack([ds[(i, 100 + i)][0] for i in range(N_IMAGES)]))
    fresh = ImageFolderDataset(data_zip, hat_seed=7, **kwargs)
    assert torch.equal(first, torch.stack([fresh[i][0] for i in range(N_IMAGES)]))
    loader = torch.utils.data.DataLoader(ImageFolderDataset(data_zip, **kwargs), batch_size=4, num_workers=2)
    assert torch.equal(first, torch.cat([batch[0] for batch in loader]))
    other = ImageFolderDataset(data_zip, corruption_seed=1, **kwargs)
    assert not torch.equal(first, torch.stack([other[i][0] for i in range(N_IMAGES)]))


def test_flipped_copies_carry_the_mirrored_noise(tmp_path, data_zip, images):
    ds = ImageFolderDataset(data_zip, noise_sigma=0.3, clean_fraction=0.25, xflip=True, noise_items=True)
    assert len(ds) == 2 * N_IMAGES
    np.testing.assert_array_equal(ds.noise_levels()[N_IMAGES:], ds.noise_levels()[:N_IMAGES])
    for i in range(N_IMAGES):
        assert torch.equal(ds[i + N_IMAGES][0], ds[i][0].flip(-1))
    names = [image_name(i) for i in range(4)]
    path = annotated_dataset(tmp_path / 'data', images[:4], [[names[1], 0.3, None, 'corrupted']])
    ds = ImageFolderDataset(path, xflip=True, noise_items=True)
    assert ds[5][5].abs().max() > 0 and torch.equal(ds[5][5], ds[1][5].flip(-1))
    torch.testing.assert_close(ds[5][4], ds[1][4], rtol=0, atol=0, equal_nan=True)


def test_clean_mode_yields_the_clean_images(data_zip, images):
    ds = ImageFolderDataset(data_zip, noise_sigma=0.3, clean_fraction=0.25, mode='clean')
    assert torch.equal(torch.stack([ds[i][0] for i in range(N_IMAGES)]), as_float(images))
    corrupted = ImageFolderDataset(data_zip, noise_sigma=0.3, clean_fraction=0.25, with_clean=True)
    assert all(torch.equal(corrupted[i][-1], ds[i][0]) for i in range(N_IMAGES))
    assert not all(torch.equal(corrupted[i][0], ds[i][0]) for i in range(N_IMAGES))


def test_annotations_and_synthetic_noise_are_exclusive(tmp_path, images):
    path = annotated_dataset(tmp_path / 'data', images[:4], [[N0, 0.2, 0, 'noisy']])
    with pytest.raises(DatasetError, match='annotations.*noise_sigma.*use one of them'):
        ImageFolderDataset(path, noise_sigma=0.3)


# ---------------------------------------------------------------------------------------------
# The σ-first sampler.

def edm_draw(loss=NoisyAmbientLoss()):
    """σ of the loss's training distribution, drawn as the training loop draws it."""
    dummy = torch.zeros([1, 1, 1, 1], dtype=torch.float64)
    return lambda generator: loss.sample_sigma(dummy, generator).item()


def mostly_noisy(n_noisy=13, n_clean=3, sigma_min=1.0):
    return np.array([[sigma_min, 0.0]] * n_noisy + [[0.0, INF]] * n_clean)


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_sigma_marginal_is_the_training_distribution():
    """σ is drawn before the image and never redrawn: ln σ ~ N(P_mean, P_std²) although most images (13 of 16,
    σ_min = 1) refuse σ < 1, which EDM draws 84% of the time; those go to the 3 clean images."""
    levels = mostly_noisy()
    items = take(SigmaFirstSampler(levels, edm_draw(), seed=1), 3000)
    log_sigma = np.log([sigma for _, _, sigma in items])
    assert scipy.stats.kstest(log_sigma, 'norm', args=(-1.2, 1.2)).pvalue > 1e-3
    assert [position for _, position, _ in items] == list(range(3000))
    low = [index for index, _, sigma in items if sigma <= 1.0]
    assert len(low) > 2000 and set(low) == {13, 14, 15}


@pytest.mark.parametrize('s_max', [None, 2.0])
def test_sampler_yields_only_admissible_pairs(s_max):
    """Every (index, σ): σ > σ_min·b or σ < σ_max, b = sqrt(1 + 1/(s_max − 1)); through the high-noise branch the
    ambient factor σ⁴/(σ² − σ_min²)² stays below s_max². Images of every kind are used."""
    b = 1.0 if s_max is None else math.sqrt(1 + 1 / (s_max - 1))
    assert admissibility_buffer(s_max) == pytest.approx(b, rel=1e-15)
    levels = np.array([[0.5, 0.0]] * 6 + [[0.2, 0.08]] * 4 + [[1.5, 0.3]] * 3 + [[0.0, INF]] * 3)
    items = take(SigmaFirstSampler(levels, edm_draw(), seed=2, s_max=s_max), 2000)
    in_buffer = 0
    for index, _, sigma in items:
        sigma_min, sigma_max = levels[index]
        assert sigma > sigma_min * b or sigma < sigma_max, (index, sigma)
        assert admissible(sigma, sigma_min, sigma_max, b)
        if sigma >= sigma_max and s_max is not None:
            assert sigma ** 4 / (sigma ** 2 - sigma_min ** 2) ** 2 < s_max ** 2
        in_buffer += sigma_min > 0 and sigma_min < sigma <= sigma_min * math.sqrt(2) and sigma >= sigma_max
    assert len({index for index, _, _ in items}) == len(levels)
    assert (in_buffer > 0) == (s_max is None)  # without s_max, images are used just above their σ_min


def test_uncovered_sigma_range_fails_at_construction():
    """All images noisy (σ_min = 0.3): EDM's σ < 0.3 has no admissible image -> one line naming the interval.
    VP cannot draw σ below σ(ε_t) ≈ 1e-3, so images noisy at 5e-4 cover it."""
    levels = np.array([[0.3, 0.0]] * 4 + [[0.5, 0.1]] * 2)
    assert uncovered_interval(levels) == (0.1, 0.3) and uncovered_interval(levels, support=(0.2, 5)) == (0.2, 0.3)
    assert uncovered_interval(np.concatenate([levels, [[0.0, INF]]])) is None
    for sigma, expected in ((0.2, [False] * 6), (0.05, [False] * 4 + [True] * 2), (0.4, [True] * 4 + [False] * 2)):
        assert admissible(sigma, levels[:, 0], levels[:, 1]).tolist() == expected
    with pytest.raises(NoAdmissibleImage) as info:
        SigmaFirstSampler(levels, edm_draw(), support=(0.0, INF))
    assert '\n' not in str(info.value) and '(0.1, 0.3)' in str(info.value)
    with pytest.raises(NoAdmissibleImage, match=r'\(0, 0.6\)'):  # the buffer widens the gap: 0.3·2 with s_max = 4/3
        check_coverage(np.array([[0.3, 0.0]] * 4), admissibility_buffer(4 / 3), (0.0, INF))
    vp = NoisyAmbientVPLoss()
    SigmaFirstSampler(np.array([[5e-4, 0.0]] * 4), edm_draw(vp), support=vp.sigma_support())
    with pytest.raises(NoAdmissibleImage):
        SigmaFirstSampler(np.array([[5e-3, 0.0]] * 4), edm_draw(vp), support=vp.sigma_support())


def test_two_ranks_interleave_to_the_one_rank_stream():
    levels = mostly_noisy(10, 6, sigma_min=0.5)
    one = take(SigmaFirstSampler(levels, edm_draw(), seed=3), 400)
    ranks = [take(SigmaFirstSampler(levels, edm_draw(), seed=3, rank=r, num_replicas=2), 200) for r in range(2)]
    assert [item for pair in zip(*ranks) for item in pair] == one
    assert all(position % 2 == r for r in range(2) for _, position, _ in ranks[r])


@pytest.mark.slow
@pytest.mark.parametrize('walked,saved', [(1100, 1100), (1100, 1150), (1100, 1090), (1100, 1000), (300, 2100)])
def test_sampler_state_continues_identically(walked, saved):
    """state_dict(position) at the walk's position, ahead of it, behind it (and behind the last remembered state),
    loaded into a fresh sampler, continues the stream exactly; the walked sampler itself is undisturbed."""
    levels = mostly_noisy(12, 4, sigma_min=0.4)
    reference = take(SigmaFirstSampler(levels, edm_draw(), seed=4), max(walked, saved) + 300)
    sampler = SigmaFirstSampler(levels, edm_draw(), seed=4)
    stream = iter(sampler)
    assert list(itertools.islice(stream, walked)) == reference[:walked]
    state = json.loads(json.dumps(sampler.state_dict(position=saved)))  # plain data, as in a training state
    assert state['position'] == saved and sampler.position == walked
    assert list(itertools.islice(stream, 50)) == reference[walked:walked + 50]
    fresh = SigmaFirstSampler(levels, edm_draw(), seed=4)
    fresh.load_state_dict(state)
    assert take(fresh, 300) == reference[saved:saved + 300]
    with pytest.raises(ValueError, match='seed'):
        SigmaFirstSampler(levels, edm_draw(), seed=5).load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# train.py: options, and whole training runs.

TINY = ['--cbase=16', '--cres=1,2', '--num_blocks=1', '--attn=8', '--batch=4', '--lr=1e-3', '--lr_rampup=0',
        '--workers=0', '--augment=0', '--dropout=0', '--ema=0.001']
NOISY_RUN = ['--precond=ambient_noisy', '--noise_sigma=0.3', '--clean_fraction=0.25']


def invoke(args):
    return CliRunner().invoke(train.main, [str(a) for a in args])


@pytest.mark.parametrize('args,needles', [
    (['--precond=ambient', '--noise_sigma=0.3'], ['--noise_sigma', '--precond=ambient']),
    (['--precond=ambient_vp', '--noise_sigma=0.3'], ['--noise_sigma']),
    (['--precond=edm', '--clean_fraction=0.5'], ['--clean_fraction', '--noise_sigma']),
    (['--precond=ambient_noisy', '--clean_fraction=0.5'], ['--clean_fraction', '--noise_sigma']),
    (['--precond=edm', '--s_max=2'], ['--s_max']),
    (['--precond=edm', '--ambient_factor=False'], ['--ambient_factor']),
    (['--precond=ambient', '--s_max=2'], ['--s_max']),
    (['--precond=ambient_noisy', '--corruption_probability=0.5'], ['--corruption_probability']),
    (['--precond=ambient_noisy', '--noise_sigma=0.3'], ['no training image', '(0, 0.3)']),  # all noisy: σ < 0.3 uncovered
])
def test_noisy_option_errors_are_one_line_and_write_nothing(tmp_path, data_zip, args, needles):
    out = tmp_path / 'runs'
    result = invoke(['--outdir', out, '--data', data_zip, steps(1), *TINY, *args])
    assert_one_line_error(result, *needles)
    assert not out.exists()


def test_uncovered_annotated_dataset_fails_before_the_run_directory(tmp_path, images):
    path = annotated_dataset(tmp_path / 'data', images[:4], [[image_name(i), 0.2, 0.05, 'corrupted'] for i in range(4)])
    out = tmp_path / 'runs'
    result = invoke(['--outdir', out, '--data', path, steps(1), *TINY, '--precond=ambient_noisy'])
    assert_one_line_error(result, 'no training image', str(path), '(0.05, 0.2)')
    assert not out.exists()


def training_options(output):
    """The config JSON printed under 'Training options:'."""
    text = output[output.index('Training options:'):]
    return json.JSONDecoder().raw_decode(text[text.index('{'):])[0]


def test_dry_run_shows_the_noisy_config(tmp_path, data_zip):
    out = tmp_path / 'runs'
    result = invoke(['--outdir', out, '--data', data_zip, '--dry-run', *TINY, *NOISY_RUN, '--s_max=2',
                     '--ambient_factor=False'])
    assert result.exit_code == 0, result.output
    c = training_options(result.output)
    assert c['loss_kwargs'] == dict(class_name='training.loss.NoisyAmbientLoss', s_max=2.0, ambient_factor=False)
    assert c['network_kwargs']['class_name'] == 'training.networks.EDMPrecond'
    assert not c['network_kwargs'].get('ambient', False)
    d = c['dataset_kwargs']
    assert (d['noise_sigma'], d['clean_fraction'], d['noise_items'], d['corruption_probability']) == (0.3, 0.25, True, 0.0)
    assert 'Synthetic noise:' in result.output and not out.exists()
    # VP: σ(ε_t) ≈ 1e-3 > 5e-4, so an all-noisy dataset at 5e-4 is covered.
    result = invoke(['--outdir', out, '--data', data_zip, '--dry-run', *TINY, '--precond=ambient_noisy_vp',
                     '--noise_sigma=0.0005'])
    assert result.exit_code == 0, result.output
    assert training_options(result.output)['loss_kwargs']['class_name'] == 'training.loss.NoisyAmbientVPLoss'
    # The clean-data baseline on the same noisy images: plain EDM, told what it ignores.
    result = invoke(['--outdir', out, '--data', data_zip, '--dry-run', *TINY, '--precond=edm', '--noise_sigma=0.3',
                     '--clean_fraction=0.25', '--corruption_probability=0'])
    assert result.exit_code == 0 and 'as if they were clean' in result.output, result.output
    c = training_options(result.output)
    assert c['loss_kwargs'] == dict(class_name='training.loss.EDMLoss') and 'noise_items' not in c['dataset_kwargs']
    assert not out.exists()


def final_state(run_dir):
    path = sorted(glob.glob(os.path.join(run_dir, 'training-state-*.pt')))[-1]
    return torch.load(path, weights_only=True)


@pytest.fixture
def restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.slow  # two training runs and a resume (4 s; with a worker +8 s)
@pytest.mark.parametrize('workers', [0, 1])
def test_noisy_training_resumes_bitwise(tmp_path, data_zip, restore_determinism, workers):
    """4 steps straight = 2 steps, stop, resume to 4 (weights, EMA and the σ-first sampler's position). With a
    worker the DataLoader prefetches, so the state is saved at a position behind the sampler's walk."""
    common = ['--data', data_zip, '--seed=3', '--deterministic=True', '--nosubdir', '--tick=0.008', '--snap=1',
              '--dump=1', *TINY, '--batch-gpu=2', f'--workers={workers}', *NOISY_RUN]
    for out, n in (('straight', 4), ('split', 2), ('split', 4)):
        resume = ['--resume', tmp_path / out] if (out, n) == ('split', 4) else []
        result = invoke(['--outdir', tmp_path / out, steps(n), *common, *resume])
        assert result.exit_code == 0, result.output
    a, b = final_state(tmp_path / 'straight'), final_state(tmp_path / 'split')
    assert a['sampler'] == b['sampler'] and a['sampler']['kind'] == 'sigma_first' and a['sampler']['position'] == 16
    for key in ('net', 'ema'):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    rows = [json.loads(line) for line in open(tmp_path / 'split' / 'stats.jsonl')]
    assert 0 < rows[-1]['Loss/clean_target_share']['mean'] < 1  # noisy images were trained at their σ_tn
    result = invoke(['--outdir', tmp_path / 'split', steps(6), *common[:-1], '--clean_fraction=0.5', '--resume',
                     tmp_path / 'split'])
    assert_one_line_error(result, 'clean_fraction')


@pytest.mark.slow  # two torchrun launches, about 20 s on 2 CPU cores
def test_noisy_training_two_processes_match_one(tmp_path, data_zip):
    """2 gloo processes and the same global batch give the weights of one process: the σ-first stream is sharded."""
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone']
    args = ['train.py', '--data', data_zip, '--seed=5', '--nosubdir', steps(3), *TINY, '--ema=0', *NOISY_RUN]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    for nproc, out in ((1, 'one'), (2, 'two')):
        subprocess.run(command + [f'--nproc_per_node={nproc}'] + args + ['--outdir', str(tmp_path / out)],
                       cwd=REPO, env=env, check=True, capture_output=True)
    a, b = final_state(tmp_path / 'one'), final_state(tmp_path / 'two')
    assert a['sampler'] == b['sampler']
    for name in a['ema']:
        # Adam's first steps, g/(sqrt(v) + ε), magnify the all-reduce's rounding in gradients near ε.
        torch.testing.assert_close(a['ema'][name], b['ema'][name], rtol=1e-4, atol=1e-4)
    la = [json.loads(line)['Loss/loss']['mean'] for line in open(tmp_path / 'one' / 'stats.jsonl')]
    lb = [json.loads(line)['Loss/loss']['mean'] for line in open(tmp_path / 'two' / 'stats.jsonl')]
    assert la == pytest.approx(lb, rel=1e-4)


def test_noisy_data_defaults_and_augmentation():
    base = ['--outdir=unused', '--data=unused', '--noise_sigma=0.2']
    # The clean-loss baseline on noisy data trains on whole images unless masks are asked for.
    assert train.build_config(train_options(base + ['--precond=edm'])).dataset_kwargs.corruption_probability == 0
    assert train.build_config(train_options(base + ['--precond=edm', '--corruption_probability=0.3'])
                              ).dataset_kwargs.corruption_probability == 0.3
    # The noisy losses keep the noise white: exact flips and shifts only.
    c = train.build_config(train_options(base + ['--precond=ambient_noisy', '--augment=0.2']))
    assert 'scale' not in c.augment_kwargs and c.augment_kwargs.get('rotate_int') == 1
    with pytest.raises(train.ConfigError, match='augment_set=blit'):
        train.build_config(train_options(base + ['--precond=ambient_noisy', '--augment=0.2', '--augment_set=edm']))
