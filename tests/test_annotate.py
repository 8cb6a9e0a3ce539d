"""annotate.py and training/annotate.py: corruptions, the annotation rule, the noise-conditioned classifier, the
command end to end (tiny, CPU, seeded)."""

import json
import math
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import annotate as annotate_cmd
import dataset_tool
from conftest import random_images, write_edm_dataset
from training import annotate as an
from training.dataset import KINDS, ImageFolderDataset, parse_annotations


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
    """200 built-in digits at 16x16 (dataset_tool.py's builtin:digits): (zip path, uint8 images, labels)."""
    path = str(tmp_path_factory.mktemp('digits') / 'digits.zip')
    dataset_tool.convert_dataset('builtin:digits', path, max_images=200, resolution=(16, 16), progress=False)
    images, labels = an.load_images(path, '--data', progress=False)
    return path, images, labels


def run(args):
    """annotate.py in-process: (exit code, output)."""
    result = CliRunner().invoke(annotate_cmd.main, [str(a) for a in args])
    return result.exit_code, result.output


def high_frequency_energy(x):  # x [N, C, H, W] -> [N]: energy of the discrete Laplacian
    lap = 4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]
    return lap.square().flatten(1).sum(1)

# ----------------------------------------------------------------------------
# Corruptions.


@pytest.mark.parametrize('kind, level', [('noise', 0.3), ('blur', 1.0), ('mask', 0.4), ('jpeg', 10)])
def test_corruptions_are_deterministic_per_image_seed(kind, level):
    x = torch.from_numpy(random_images(4, channels=3, resolution=16)).permute(0, 3, 1, 2).float() / 127.5 - 1
    seeds = [3, 5, 7, 11]
    y = an.corrupt_images(x, kind, level, seeds)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert torch.equal(y, an.corrupt_images(x, kind, level, seeds))
    single = torch.cat([an.corrupt_images(x[i:i + 1], kind, level, seeds[i:i + 1]) for i in range(4)])
    assert torch.equal(y, single)  # an image's corruption does not depend on its batch
    if kind in ('noise', 'mask'):
        assert not torch.equal(y, an.corrupt_images(x, kind, level, [s + 1 for s in seeds]))


def test_noise_has_the_given_std():
    x = torch.zeros(2, 3, 64, 64)
    y = an.corrupt_images(x, 'noise', 0.3, [0, 1])
    assert abs(y.std().item() - 0.3) < 0.01 and abs(y.mean().item()) < 0.01


def test_blur_lowers_high_frequency_energy_and_keeps_the_mean():
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for std, most in ((0.7, 0.5), (2.0, 0.02)):
        y = an.corrupt_images(x, 'blur', std, [0, 1, 2])
        assert (high_frequency_energy(y) < most * high_frequency_energy(x)).all()
        assert torch.allclose(y.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=0.02)
    assert an.blur_kernel_size(1.0, 16, 16) == 9 and an.blur_kernel_size(20.0, 16, 16) == 31


def test_mask_zeros_the_given_fraction_of_pixels():
    x = torch.full((4, 3, 64, 64), 0.5)
    y = an.corrupt_images(x, 'mask', 0.3, [0, 1, 2, 3])
    zero = y == 0
    assert torch.equal(zero, zero[:, :1].expand_as(zero))  # a pixel is hidden in all channels
    assert abs(zero.float().mean().item() - 0.3) < 0.02
    assert torch.equal(y[~zero], x[~zero])


def test_jpeg_changes_the_image_more_at_low_quality():
    x = torch.from_numpy(random_images(2, channels=3, resolution=32)).permute(0, 3, 1, 2).float() / 127.5 - 1
    x = x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))  # texture JPEG must discard
    x = an.as_float(an.quantize(x))
    errors = [(an.corrupt_images(x, 'jpeg', q, [0, 1]) - x).abs().mean().item() for q in (5, 50, 95)]
    assert errors[0] > errors[1] > errors[2] > 0
    gray = an.corrupt_images(x[:, :1], 'jpeg', 10, [0, 1])
    assert gray.shape == x[:, :1].shape and not torch.equal(gray, x[:, :1])


def test_parse_corruption_and_level_ranges():
    assert an.parse_corruption('blur:1.5') == ('blur', 1.5)
    assert an.parse_corruption('jpeg:10') == ('jpeg', 10) and isinstance(an.parse_corruption('jpeg:10')[1], int)
    for spec in ('blur', 'blur:', 'foo:1', 'blur:x', 'noise:0', 'noise:-1', 'mask:1', 'mask:0', 'jpeg:0',
                 'jpeg:2.5', 'jpeg:101', 'blur:inf', 'noise:nan'):
        with pytest.raises(ValueError):
            an.parse_corruption(spec)

# ----------------------------------------------------------------------------
# The annotation rule and accuracy.


def test_first_confusion_on_closed_form_trajectories():
    """P(σ) = 0.5 + 0.5·exp(-σ/s): |P - 0.5| ≤ ε from σ* = s·ln(0.5/ε) on, so σ_min = the first grid σ ≥ σ*."""
    sigmas = an.sigma_grid((0.01, 100), 25)
    eps = 0.05
    scales = np.array([0.003, 0.05, 0.4, 2.0, 7.0])
    p = 0.5 + 0.5 * np.exp(-sigmas[None, :] / scales[:, None])
    expected = [sigmas[np.searchsorted(sigmas, s * math.log(0.5 / eps))] for s in scales]
    np.testing.assert_allclose(an.first_confusion(p, sigmas, eps), expected)
    assert an.first_confusion(p[2], sigmas, eps) == expected[2]
    never = np.full(25, 0.9)
    confident_clean = np.full(25, 0.1)  # far from chance on the other side: not trusted either
    dip = np.where(np.arange(25) == 5, 0.52, 0.9)  # the first crossing counts
    np.testing.assert_allclose(an.first_confusion(np.stack([never, confident_clean, dip]), sigmas, eps),
                               [sigmas[-1], sigmas[-1], sigmas[5]])
    edge = np.full(25, 0.9)
    edge[7] = 0.5 + eps  # exactly ε away counts as within
    assert an.first_confusion(edge, sigmas, eps) == sigmas[7]


def test_accuracy_vs_sigma():
    p_clean = torch.tensor([[0.1, 0.6], [0.2, 0.4]])
    p_corrupted = torch.tensor([[0.9, 0.5], [0.8, 0.3], [0.7, 0.2]])
    acc = an.accuracy_vs_sigma(p_clean, p_corrupted)
    assert acc['clean'] == [1.0, 0.5] and acc['corrupted'] == pytest.approx([1.0, 1 / 3])
    assert acc['balanced'] == pytest.approx([1.0, (0.5 + 1 / 3) / 2])

# ----------------------------------------------------------------------------
# The classifier.


def test_trajectories_do_not_depend_on_the_batch_and_global_rng_is_untouched():
    state = torch.get_rng_state()
    net = an.NoiseConditionedClassifier(1, width=8, generator=torch.Generator().manual_seed(1)).eval()
    assert torch.equal(torch.get_rng_state(), state)
    x = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    sigmas = an.sigma_grid((0.1, 10), 3)
    a = an.classifier_trajectories(net, x, sigmas, seeds=list(range(5)), num_draws=2, batch=6, progress=False)
    b = an.classifier_trajectories(net, x, sigmas, seeds=list(range(5)), num_draws=2, batch=1000, progress=False)
    assert a.shape == (5, 3) and a.dtype == torch.float64 and ((a > 0) & (a < 1)).all()
    torch.testing.assert_close(a, b)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.slow
def test_classifier_separates_blurred_digits_at_low_sigma_only(digits):
    _, images, _ = digits
    clean, blurred = images[:100], an.quantize(an.corrupt_images(an.as_float(images[100:]), 'blur', 1.5, list(range(100))))
    state = torch.get_rng_state()
    net, stats = an.train_classifier(clean[:80], blurred[:80], kimg=2, batch=64, sigma_range=(0.01, 30), width=16,
                                     seed=0, device='cpu', progress=False)
    assert torch.equal(torch.get_rng_state(), state) and stats['steps'] == 32
    sigmas = np.array([0.02, 0.1, 30.0])
    p_clean = an.classifier_trajectories(net, clean[80:], sigmas, list(range(20)), progress=False)
    p_blurred = an.classifier_trajectories(net, blurred[80:], sigmas, list(range(100, 120)), progress=False)
    acc = an.accuracy_vs_sigma(p_clean, p_blurred)['balanced']
    assert acc[0] >= 0.95 and acc[1] >= 0.95, acc
    assert abs(acc[2] - 0.5) <= 0.1, acc  # at σ = 30 both look like noise
    assert abs(p_clean[:, 2].mean() - p_blurred[:, 2].mean()) < 0.05
    sigma_min = an.first_confusion(p_blurred, sigmas, 0.1)
    assert (sigma_min > 0.1).all()  # no blurred digit is trusted where the classifier still tells it apart

@pytest.mark.gpu
def test_cuda_gives_the_cpu_results():
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for kind, level in (('noise', 0.3), ('blur', 1.0), ('mask', 0.4), ('jpeg', 20)):
        torch.testing.assert_close(an.corrupt_images(x.cuda(), kind, level, [1, 2, 3]).cpu(),
                                   an.corrupt_images(x, kind, level, [1, 2, 3]), atol=1e-5, rtol=0)
    net, _ = an.train_classifier(x[:2], x[2:], kimg=0.1, batch=8, device='cuda', progress=False)
    assert next(net.parameters()).is_cuda
    sigmas = an.sigma_grid((0.1, 10), 3)
    on_cuda = an.classifier_trajectories(net, x, sigmas, [0, 1, 2], progress=False)
    on_cpu = an.classifier_trajectories(net.cpu(), x, sigmas, [0, 1, 2], progress=False)
    torch.testing.assert_close(on_cuda, on_cpu, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------
# The command.


def load_output(dest):
    """(dataset, {file: (σ_min, σ_max, kind)}) of an annotate.py output folder, parsed as training reads it."""
    dataset = ImageFolderDataset(dest, mode='clean', normalize=False)
    with open(os.path.join(dest, 'dataset.json'), encoding='utf-8') as f:
        meta = json.load(f)
    names = [an.image_name(i) for i in range(len(dataset))]
    levels, kinds = parse_annotations(meta['annotations'], names, str(dest))
    by_name = {names[i]: (float(levels[i, 0]), float(levels[i, 1]), KINDS[kinds[i]]) for i in np.flatnonzero(kinds)}
    return dataset, meta, by_name


@pytest.mark.slow  # end to end: annotate, train, evaluate
def test_fixed_sigma_and_known_noise_end_to_end(digits, tmp_path):
    path, images, labels = digits
    dest = tmp_path / 'jpeg'
    dest.mkdir()  # an empty folder may be the destination
    code, out = run(['--data', path, '--dest', dest, '--corrupt=jpeg:10', '--clean_fraction=0.25', '--fixed_sigma=0.3'])
    assert code == 0, out
    dataset, meta, ann = load_output(dest)
    assert len(dataset) == 200 and dataset.image_shape == [1, 16, 16] and dataset.has_annotations
    assert [label for _, label in meta['labels']] == labels  # labels kept, order kept
    assert len(ann) == 150 and set(ann.values()) == {(0.3, 0.0, 'corrupted')}
    is_clean = an.choose_clean(200, 0.25, 0)
    for i in range(200):
        image = torch.from_numpy(dataset[i][0].numpy())
        assert torch.equal(image, images[i]) == bool(is_clean[i])
        assert dataset.annotation(i) == ((0.0, math.inf, 'clean') if is_clean[i] else (0.3, 0.0, 'corrupted'))
    report = json.loads((tmp_path / 'jpeg-report' / 'annotate.json').read_text())
    assert report['num_annotated'] == 150 and 'classifier' not in report
    assert not (tmp_path / 'jpeg-report' / 'classifier-accuracy.png').exists()

    code, out = run(['--data', path, '--dest', tmp_path / 'jpeg2', '--corrupt=jpeg:10', '--clean_fraction=0.25',
                     '--fixed_sigma=0.3'])
    assert code == 0 and (dest / 'dataset.json').read_bytes() == (tmp_path / 'jpeg2' / 'dataset.json').read_bytes()
    assert (dest / '00000/img00000003.png').read_bytes() == (tmp_path / 'jpeg2/00000/img00000003.png').read_bytes()

    code, out = run(['--data', path, '--dest', tmp_path / 'noisy', '--corrupt=noise:0.2', '--clean_fraction=0.5',
                     '--report_dir', tmp_path / 'r'])
    assert code == 0, out
    _, _, ann = load_output(tmp_path / 'noisy')
    assert len(ann) == 100 and set(ann.values()) == {(0.2, 0.0, 'noisy')}
    report = json.loads((tmp_path / 'r' / 'annotate.json').read_text())
    assert report['kind'] == 'noisy' and report['corruption']['clipped_fraction'] > 0  # digits' black background clips


@pytest.mark.slow
def test_classifier_path_end_to_end(digits, tmp_path):
    _, images, labels = digits
    hwc = images.permute(0, 2, 3, 1).numpy()
    blurred = an.quantize(an.corrupt_images(an.as_float(images[:40]), 'blur', 1.5, list(range(40))))
    data = write_edm_dataset(tmp_path / 'blurry', blurred.permute(0, 2, 3, 1).numpy(), labels[:40])
    clean = write_edm_dataset(tmp_path / 'clean.zip', hwc[40:64], labels[40:64])
    dest = tmp_path / 'out'
    code, out = run(['--data', data, '--clean', clean, '--dest', dest, '--kimg=0.5', '--batch=32', '--num_sigmas=4',
                     '--num_draws=2', '--sigma_range=0.01,20', '--holdout=0.2'])
    assert code == 0, out
    dataset, meta, ann = load_output(dest)
    assert len(dataset) == 64 and [label for _, label in meta['labels']] == labels[:64]
    sigmas = an.sigma_grid((0.01, 20), 4)
    assert sorted(ann) == [an.image_name(i) for i in range(40)]  # the --data images; the --clean ones are clean
    assert all(kind == 'corrupted' and smax == 0 and np.isclose(sigmas, smin).any() for smin, smax, kind in ann.values())
    for i in range(40, 64):
        assert dataset.annotation(i) == (0.0, math.inf, 'clean')
        assert torch.equal(torch.from_numpy(dataset[i][0].numpy()), images[i])
    report = json.loads((tmp_path / 'out-report' / 'annotate.json').read_text())
    assert len(report['classifier']['accuracy']['balanced']) == 4 and report['num_annotated'] == 40
    assert report['classifier']['num_holdout'] == dict(clean=5, corrupted=8)
    assert (tmp_path / 'out-report' / 'classifier-accuracy.png').stat().st_size > 1000
    assert not [n for n in os.listdir(tmp_path) if n.startswith('.')]  # no staging folder left behind


def test_dry_run_prints_the_resolved_config_and_writes_nothing(digits, tmp_path):
    code, out = run(['--data', digits[0], '--dest', tmp_path / 'd', '--corrupt=mask:0.5', '--clean_fraction=0.1', '-n'])
    assert code == 0, out
    cfg = json.loads(out)
    assert cfg['corrupt'] == ['mask', 0.5] and cfg['report_dir'] == str(tmp_path / 'd') + '-report'
    assert cfg['classifier']['cls_epsilon'] == 0.05 and not (tmp_path / 'd').exists()


@pytest.mark.parametrize('args, message', [
    (['--corrupt=blur'], 'is not KIND:LEVEL'),
    (['--corrupt=blur:0', '--clean_fraction=0.1'], 'out of range'),
    (['--corrupt=jpeg:300', '--clean_fraction=0.1'], 'out of range'),
    (['--corrupt=blur:1'], '--corrupt needs --clean_fraction'),
    (['--clean_fraction=0.5', '--fixed_sigma=1'], '--clean_fraction has no effect'),
    (['--corrupt=blur:1', '--clean_fraction=0.1', '--clean=x.zip'], 'exclude each other'),
    (['--fixed_sigma=0.5', '--kimg=3'], '--kimg has no effect'),
    (['--corrupt=noise:0.1', '--clean_fraction=0.1', '--fixed_sigma=1'], '--fixed_sigma has no effect'),
    (['--corrupt=noise:0.1', '--clean_fraction=0.1', '--num_sigmas=4'], '--num_sigmas has no effect'),
    ([], 'needs trusted clean images'),
    (['--clean=x.zip', '--sigma_range=1,0.1'], 'needs 0 < MIN < MAX'),
    (['--clean=missing.zip'], 'dataset not found'),
    (['--corrupt=blur:1', '--clean_fraction=0'], 'at least 2 clean'),
    (['--corrupt=blur:1', '--clean_fraction=1', '--fixed_sigma=1'], 'leaves none'),
])
def test_bad_input_is_a_one_line_error(digits, tmp_path, args, message):
    if '--clean=missing.zip' in args:
        args = [a.replace('missing.zip', str(tmp_path / 'missing.zip')) for a in args]
    code, out = run(['--data', digits[0], '--dest', tmp_path / 'out'] + args)
    assert code != 0
    error = [line for line in out.splitlines() if line.startswith('Error:')]
    assert len(error) == 1 and message in error[0], out
    assert 'Traceback' not in out and not (tmp_path / 'out').exists()


def test_refuses_a_non_empty_dest_and_mismatched_datasets(digits, tmp_path):
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'keep.txt').write_text('mine')
    code, out = run(['--data', digits[0], '--dest', tmp_path / 'full', '--fixed_sigma=1'])
    assert code != 0 and 'not an empty folder' in out.splitlines()[-1]
    assert os.listdir(tmp_path / 'full') == ['keep.txt']
    rgb = write_edm_dataset(tmp_path / 'rgb', random_images(4, channels=3, resolution=16))
    code, out = run(['--data', digits[0], '--clean', rgb, '--dest', tmp_path / 'o'])
    assert code != 0 and 'make both at one resolution' in out.splitlines()[-1] and not (tmp_path / 'o').exists()
