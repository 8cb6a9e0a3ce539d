"""Tests for DPS (training/inverse.py: dps_term, measure, solve_batch) and solve_inverse_problems.py."""

import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import solve_inverse_problems as solve_cli
import train
from conftest import random_images, write_edm_dataset
from test_eval import TINY
from test_samplers import GaussianNet
from torch_utils.ambient_diffusion import MaskCorruption, get_operator
from torch_utils.misc import StackedRandomGenerator
from training import inverse, samplers

# ----------------------------------------------------------------------------
# PSNR and SSIM.


def _ssim_reference(x, y):
    """Independent float64 SSIM: explicit 11x11 Gaussian windows (σ = 1.5) over every valid position."""
    d = np.arange(11) - 5
    g = np.exp(-d ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    C1, C2 = 0.01 ** 2, 0.03 ** 2
    out = []
    for a, b in zip(x, y):
        values = []
        for ca, cb in zip(a, b):
            for i in range(ca.shape[0] - 10):
                for j in range(ca.shape[1] - 10):
                    pa, pb = ca[i:i + 11, j:j + 11], cb[i:i + 11, j:j + 11]
                    ma, mb = (w * pa).sum(), (w * pb).sum()
                    va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
                    cov = (w * (pa - ma) * (pb - mb)).sum()
                    values.append((2 * ma * mb + C1) * (2 * cov + C2) / ((ma ** 2 + mb ** 2 + C1) * (va + vb + C2)))
        out.append(np.mean(values))
    return np.array(out)


def test_psnr_closed_form():
    x = torch.rand(3, 2, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.8
    assert torch.allclose(solve_cli.psnr(x + 0.1, x), torch.full([3], 20.0, dtype=torch.float64))  # MSE 0.01
    assert torch.allclose(solve_cli.psnr(x + 0.01, x), torch.full([3], 40.0, dtype=torch.float64))
    assert torch.isinf(solve_cli.psnr(x, x)).all()


def test_ssim_matches_independent_reference():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 13, 14, generator=g, dtype=torch.float64)
    y = (x + 0.2 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    ours = solve_cli.ssim(x, y).numpy()
    np.testing.assert_allclose(ours, _ssim_reference(x.numpy(), y.numpy()), rtol=1e-10, atol=1e-12)
    assert torch.allclose(solve_cli.ssim(x, x), torch.ones(2, dtype=torch.float64))
    assert (ours < 0.99).all()
    assert solve_cli.ssim(x[:, :, :6, :6], y[:, :, :6, :6]).shape == (2,)  # smaller than the window

# ----------------------------------------------------------------------------
# DPS with an exact Gaussian-prior denoiser.

RES = 16


def _truth(n=2, seed=0):
    images = random_images(n, channels=1, resolution=RES, seed=seed)
    return torch.from_numpy(images).permute(0, 3, 1, 2).double() / 127.5 - 1                  # [N, 1, H, W]


def _prior_net(x0, offset=0.15, s=0.2, seed=3):
    """Ambient exact denoiser for a per-pixel prior N(μ, s²) centred near the truth (μ = x0[0] + noise)."""
    g = torch.Generator().manual_seed(seed)
    mu = x0[:1] + offset * torch.randn(x0[:1].shape, generator=g, dtype=torch.float64)
    return GaussianNet(mu, s, channels=1, resolution=RES, ambient=True).eval()


SAMPLER = dict(corruption=MaskCorruption('dust', 0.0), num_steps=18, clipping='static')


@pytest.mark.parametrize('name, kwargs, zeta', [('dust', dict(corruption_probability=0.5), 0.5),
                                                 ('averaging', dict(downsampling_factor=4), 0.5)])
def test_dps_is_measurement_consistent_and_beats_the_baseline(name, kwargs, zeta):
    x0 = _truth(1)
    net = _prior_net(x0)
    operator = get_operator(name, **kwargs)
    y, params = inverse.measure(operator, x0, [7])

    def error(x):
        return (operator.apply(x.double(), params) - y).flatten(1).norm(dim=1)

    plain = inverse.solve_batch(net, operator, y, params, [7], 0.0, **SAMPLER)
    dps = inverse.solve_batch(net, operator, y, params, [7], zeta, **SAMPLER)
    baseline = operator.naive_inverse(y, params)
    assert (error(dps) < 0.5 * error(plain)).all(), (error(dps), error(plain))
    psnr = lambda x: solve_cli.psnr((x.double() + 1) / 2, (x0 + 1) / 2)
    assert (psnr(dps) > psnr(baseline) + 1).all(), (psnr(dps), psnr(baseline))
    assert (psnr(dps) > psnr(plain)).all()


def test_zero_scale_is_the_unconditional_sample():
    x0 = _truth(3)
    net = _prior_net(x0)
    operator = get_operator('dust', corruption_probability=0.3)
    y, params = inverse.measure(operator, x0, [0, 1, 2])
    kwargs = dict(num_steps=4, S_churn=3.0)
    solved = inverse.solve_batch(net, operator, y, params, [0, 1, 2], 0.0, corruption=MaskCorruption('dust', 0.2), **kwargs)
    sampled = samplers.generate_batch(net, [0, 1, 2], corruption=MaskCorruption('dust', 0.2), **kwargs)
    assert torch.equal(solved, sampled)


def test_clean_network_runs_in_the_same_loop():
    x0 = _truth(2)
    clean = GaussianNet(x0[:1] * 0.9, 0.3, channels=1, resolution=RES, ambient=False).eval()
    operator = get_operator('averaging', downsampling_factor=4)
    y, params = inverse.measure(operator, x0, [4, 5])
    solved = inverse.solve_batch(clean, operator, y, params, [4, 5], 0.0, num_steps=5)
    torch.testing.assert_close(solved, samplers.generate_batch(clean, [4, 5], num_steps=5), rtol=0, atol=1e-6)
    guided = inverse.solve_batch(clean, operator, y, params, [4, 5], 2.0, num_steps=5)
    assert not torch.equal(guided, solved)
    with pytest.raises(ValueError, match='ambient networks only'):
        inverse.solve_batch(clean, operator, y, params, [4, 5], 1.0, corruption=MaskCorruption('dust', 0.2))


def test_measurements_depend_on_the_seed_alone():
    x0 = _truth(4)
    for name in ('dust', 'box_masking', 'compressed_sensing'):
        operator = get_operator(name, corruption_probability=0.4)
        y, params = inverse.measure(operator, x0, [10, 11, 12, 13])
        y2, params2 = inverse.measure(operator, x0[2:], [12, 13])
        assert torch.equal(params[2:], params2) and torch.equal(y[2:], y2)
        assert not torch.equal(params[0], params[1])
    motion = get_operator('blurring', blur_type='motion', kernel_size=5, intensity=0.5)
    a, b = (inverse.measure(motion, x0[:2], s)[1] for s in ([0, 1], [0, 2]))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
    # The measurement stream is not the sampler's latent stream.
    latent = StackedRandomGenerator('cpu', [5]).randn([1, 8])
    assert not torch.equal(torch.randn([1, 8], generator=inverse.measurement_generators([5])[0]), latent)


def test_reconstructions_do_not_depend_on_the_batch():
    seeds = [3, 4, 5, 6]
    x0 = _truth(4)
    net = _prior_net(x0)
    operator = get_operator('dust', corruption_probability=0.5)
    y, params = inverse.measure(operator, x0, seeds)
    kwargs = dict(corruption=MaskCorruption('dust', 0.3), num_steps=5, S_churn=2.0)
    whole = inverse.solve_batch(net, operator, y, params, seeds, 1.5, **kwargs)
    parts = [inverse.solve_batch(net, operator, *inverse.measure(operator, x0[i:j], seeds[i:j]), seeds[i:j], 1.5, **kwargs)
             for i, j in ((0, 1), (1, 4))]
    assert torch.equal(whole, torch.cat(parts))


def test_dps_term_norms():
    g = torch.Generator().manual_seed(2)
    operator = get_operator('compressed_sensing', num_measurements=5)
    x = torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64)
    params = operator.sample_params(x.shape, g).double()
    y = operator.apply(torch.randn(x.shape, generator=g, dtype=torch.float64), params)
    r = (y - operator.apply(x, params)).norm()
    per = inverse.dps_term(operator, y, params, 3.0)(None, None, x)
    assert per.shape == (1,) and torch.allclose(per, 3 * r)
    # Two equal samples: the batch norm is ζ·√2·√2·‖r‖ and its per-sample gradient equals the per-sample norm's.
    x2 = x.repeat(2, 1, 1, 1).requires_grad_(True)
    y2, params2 = y.repeat(2, 1), params.repeat(2, 1, 1, 1, 1)
    batch = inverse.dps_term(operator, y2, params2, 3.0, norm='batch')(None, None, x2)
    assert batch.ndim == 0 and torch.allclose(batch, 3 * 2 * r)
    grad_batch = torch.autograd.grad(batch, x2)[0]
    grad_per = torch.autograd.grad(inverse.dps_term(operator, y2, params2, 3.0)(None, None, x2).sum(), x2)[0]
    torch.testing.assert_close(grad_batch, grad_per)
    with pytest.raises(ValueError, match='norm'):
        inverse.dps_term(operator, y, params, 1.0, norm='global')
    with pytest.raises(ValueError, match='zeta'):
        inverse.dps_term(operator, y, params, -1.0)

# ----------------------------------------------------------------------------
# The command.


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('dps')
    data = write_edm_dataset(root / 'data.zip', random_images(8, channels=3, resolution=16, seed=4))
    CliRunner().invoke(train.main, [str(a) for a in ['--outdir', root / 'run', '--data', data,
                                                     '--corruption_probability=0.5', *TINY]], catch_exceptions=False)
    return root / 'run', data


def _solve(run_dir, data, outdir, *args):
    args = ['--network', run_dir, '--latest', '--measurements_path', data, '--outdir', outdir, '--seeds=0-1',
            '--batch=2', '--steps=2', *args]
    result = CliRunner().invoke(solve_cli.main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


OPERATORS = [['--corruption_pattern=dust'], ['--corruption_pattern=box_masking'],
             ['--corruption_pattern=averaging', '--downsampling_factor=4'],
             ['--corruption_pattern=blurring', '--blur_type=gaussian'],
             ['--corruption_pattern=blurring', '--blur_type=motion', '--kernel_size=7'],
             ['--corruption_pattern=compressed_sensing', '--num_measurements=16', '--norm=batch']]


@pytest.mark.slow  # one CLI run per operator
@pytest.mark.parametrize('args', OPERATORS, ids=lambda a: a[0].split('=')[1] + a[1].split('=')[1] if len(a) > 1 else a[0])
def test_cli_every_operator(setup, tmp_path, args):
    run_dir, data = setup
    out = tmp_path / 'out'
    result = _solve(run_dir, data, out, *args)
    assert 'Solving 2 of 2 images' in result.output and 'seconds per image' in result.output
    kinds = ['ref', 'reconstruction', 'baseline'] + (['measurement'] if 'compressed_sensing' not in args[0] else [])
    for kind in kinds:
        assert sorted(os.listdir(out / kind)) == ['000000.png', '000001.png']
        assert np.array(PIL.Image.open(out / kind / '000001.png')).shape == (16, 16, 3)
        assert np.array(PIL.Image.open(out / f'grid-{kind}.png')).shape == (16, 16 * 8, 3)  # one row of the 8-wide grid
    assert ('compressed_sensing' in args[0]) == (not os.path.exists(out / 'measurement'))
    rows = [json.loads(line) for line in open(out / 'metrics.jsonl')]
    assert [r['seed'] for r in rows] == [0, 1]
    ref = np.array(PIL.Image.open(out / 'ref' / '000001.png')).astype(np.float64) / 255
    rec = np.array(PIL.Image.open(out / 'reconstruction' / '000001.png')).astype(np.float64) / 255
    assert rows[1]['psnr'] == pytest.approx(10 * np.log10(1 / np.mean((ref - rec) ** 2)))
    truth = random_images(8, channels=3, resolution=16, seed=4)[1]
    assert np.array_equal(np.array(PIL.Image.open(out / 'ref' / '000001.png')), truth)


def test_cli_rerun_skips_existing(setup, tmp_path):
    run_dir, data = setup
    out = tmp_path / 'out'
    _solve(run_dir, data, out, '--corruption_pattern=dust')
    stamps = {p: os.path.getmtime(out / 'reconstruction' / p) for p in os.listdir(out / 'reconstruction')}
    result = _solve(run_dir, data, out, '--corruption_pattern=dust', '--seeds=0-2')
    assert 'Solving 1 of 3 images' in result.output and 'Summary of 3 images' in result.output
    for p, t in stamps.items():
        assert os.path.getmtime(out / 'reconstruction' / p) == t
    assert [json.loads(line)['seed'] for line in open(out / 'metrics.jsonl')] == [0, 1, 2]


def test_cli_errors(setup, tmp_path):
    run_dir, data = setup
    args = ['--network', run_dir, '--latest', '--measurements_path', data, '--outdir', tmp_path]
    result = CliRunner().invoke(solve_cli.main, [str(a) for a in args + ['--seeds=0-20']])
    assert result.exit_code != 0 and 'holds 8 images' in result.output
    result = CliRunner().invoke(solve_cli.main, [str(a) for a in args + ['--corruption_pattern=averaging',
                                                                          '--downsampling_factor=3', '--seeds=0-3']])
    assert result.exit_code != 0 and 'downsampling_factor=3' in result.output
    assert os.listdir(tmp_path) == []  # bad input: nothing written


def test_cli_refuses_outputs_of_other_settings(setup, tmp_path):
    run_dir, data = setup
    out = tmp_path / 'out'
    _solve(run_dir, data, out, '--corruption_pattern=dust', '--seeds=0')
    before = open(out / 'metrics.jsonl').read()
    result = CliRunner().invoke(solve_cli.main, [str(a) for a in ['--network', run_dir, '--latest', '--measurements_path',
        data, '--outdir', out, '--seeds=0', '--batch=2', '--steps=2', '--corruption_pattern=dust',
        '--operator_corruption_probability=0.7']])
    assert result.exit_code != 0 and 'operator_corruption_probability: None there, 0.7 now' in result.output
    assert 'dps_scale' not in result.output  # only the differing settings are named
    assert open(out / 'metrics.jsonl').read() == before


@pytest.mark.slow
def test_two_processes_give_the_same_reconstructions(setup, tmp_path):
    """torchrun with 2 processes writes the same reconstructions and metrics as one process."""
    import subprocess
    import sys
    from conftest import REPO
    run_dir, data = setup
    args = ['solve_inverse_problems.py', '--network', str(run_dir), '--latest', '--measurements_path', str(data),
            '--seeds=0-4', '--batch=2', '--steps=2', '--dps_scale=1', '--corruption_pattern=dust']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    subprocess.run([sys.executable] + args + ['--outdir', str(tmp_path / 'one')], cwd=REPO, env=env, check=True,
                   capture_output=True)
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'] + args +
                   ['--outdir', str(tmp_path / 'two')], cwd=REPO, env=env, check=True, capture_output=True)
    rows = {}
    for name in ('one', 'two'):
        lines = [json.loads(line) for line in open(tmp_path / name / 'metrics.jsonl')]
        rows[name] = {r['seed']: r['psnr'] for r in lines}
    assert sorted(rows['one']) == sorted(rows['two']) == [0, 1, 2, 3, 4]
    for seed in range(5):
        assert rows['one'][seed] == pytest.approx(rows['two'][seed], abs=1e-6)
        a = np.array(PIL.Image.open(tmp_path / 'one' / 'reconstruction' / f'{seed:06d}.png'))
        b = np.array(PIL.Image.open(tmp_path / 'two' / 'reconstruction' / f'{seed:06d}.png'))
        assert np.array_equal(a, b)


# ----------------------------------------------------------------------------
# Inpainting by replacement and RePaint.

@pytest.mark.parametrize('num_steps, jump_length, jump_n_sample', [(6, 1, 1), (6, 2, 2), (10, 3, 3), (7, 2, 4)])
def test_repaint_moves_follow_the_jump_schedule(num_steps, jump_length, jump_n_sample):
    moves = inverse.repaint_moves(num_steps, jump_length, jump_n_sample)
    assert moves[0] == (0, 1) and moves[-1] == (num_steps - 1, num_steps)
    assert all(abs(j - i) == 1 and 0 <= min(i, j) and max(i, j) <= num_steps for i, j in moves)
    assert all(b[0] == a[1] for a, b in zip(moves, moves[1:]))  # a connected walk
    jump_points = len(range(jump_length, num_steps - jump_length + 1, jump_length))
    ups = sum(j < i for i, j in moves)
    assert ups == jump_points * (jump_n_sample - 1) * jump_length
    assert len(moves) - ups == num_steps + ups  # every step back up is walked down again
    if jump_n_sample == 1:
        assert moves == [(i, i + 1) for i in range(num_steps)]


def test_replacement_keeps_known_pixels_and_leaves_the_rest_to_the_prior():
    x0 = _truth(2)
    net = _prior_net(x0)
    operator = get_operator('box_masking', corruption_probability=0.4)
    y, params = inverse.measure(operator, x0, [3, 4])
    known = operator.apply(torch.ones_like(x0), params)
    for method, extra in (('replace', {}), ('repaint', dict(jump_length=2, jump_n_sample=3))):
        out = inverse.solve_batch(net, operator, y, params, [3, 4], 0.0, method=method, **SAMPLER, **extra).double()
        # Known pixels are the measurement (to float32 and clamping), hidden ones differ from zero-filling.
        torch.testing.assert_close(out * known, (y * known).clamp(-1, 1), rtol=0, atol=1e-6)
        assert ((out - y).abs() * (1 - known)).sum() > 1
    # Pixels are independent under this prior, so the hidden pixels of a replacement sample are prior samples:
    # all-hidden replacement is the plain sampler (a deterministic solver draws no noise of its own).
    nothing = torch.zeros_like(x0)
    mask_all_hidden = get_operator('dust', corruption_probability=0.999999)
    _, params0 = inverse.measure(mask_all_hidden, x0, [3, 4])
    plain = samplers.generate_batch(net, [3, 4], **SAMPLER)
    replaced = inverse.solve_batch(net, mask_all_hidden, nothing, params0 * 0, [3, 4], 0.0, method='replace', **SAMPLER)
    torch.testing.assert_close(replaced, plain, rtol=0, atol=1e-6)


def test_replacement_refusals():
    x0 = _truth(1)
    net = _prior_net(x0)
    y, params = inverse.measure(get_operator('averaging', downsampling_factor=4), x0, [0])
    with pytest.raises(ValueError, match='inpainting operator'):
        inverse.solve_batch(net, get_operator('averaging', downsampling_factor=4), y, params, [0], 0.0, method='replace',
                            **SAMPLER)
    operator = get_operator('dust', corruption_probability=0.5)
    y, params = inverse.measure(operator, x0, [0])
    with pytest.raises(ValueError, match='no DPS term'):
        inverse.solve_batch(net, operator, y, params, [0], 1.0, method='replace', **SAMPLER)
    with pytest.raises(ValueError, match='RePaint'):
        inverse.solve_batch(net, operator, y, params, [0], 0.0, method='replace', jump_length=2, **SAMPLER)


@pytest.mark.parametrize('args', [['--method=replace'], ['--method=repaint', '--jump_length=1', '--jump_n_sample=2'],
                                  ['--method=replace', '--solver=ddim', '--eta=0.5']])
def test_cli_replacement_methods(setup, tmp_path, args):
    run_dir, data = setup
    result = _solve(run_dir, data, tmp_path / 'out', '--corruption_pattern=box_masking', *args)
    assert args[0].split('=')[1] in result.output and 'seconds per image' in result.output
    assert sorted(os.listdir(tmp_path / 'out' / 'reconstruction')) == ['000000.png', '000001.png']


@pytest.mark.parametrize('args, message', [
    (['--method=replace', '--corruption_pattern=averaging'], 'needs an inpainting operator'),
    (['--method=replace', '--dps_scale=2'], '--dps_scale'),
    (['--jump_length=3'], '--jump_length'),
    (['--method=replace', '--jump_n_sample=3'], '--jump_n_sample'),
    (['--method=repaint', '--jump_length=2', '--solver=dpmpp2m', '--corruption_pattern=box_masking'], 'reuses the previous step')])
def test_cli_replacement_errors(setup, tmp_path, args, message):
    run_dir, data = setup
    cmd = ['--network', run_dir, '--latest', '--measurements_path', data, '--outdir', tmp_path / 'o', '--seeds=0', *args]
    result = CliRunner().invoke(solve_cli.main, [str(a) for a in cmd])
    assert result.exit_code != 0 and message in result.output and 'Traceback' not in result.output
    assert not os.path.exists(tmp_path / 'o')


def test_repaint_without_jump_points_is_refused():
    with pytest.raises(ValueError, match='no jump point'):
        inverse.repaint_moves(18, 10, 5)
    assert inverse.repaint_moves(18, 10, 1) == inverse.repaint_moves(18, 1, 1)  # no resampling asked: plain descent
