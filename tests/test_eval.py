"""Tests for `eval.py generate`: snapshots -> images, resume of generation, batch independence, scoring."""

import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import eval as eval_cli
import train
from training import snapshots
from conftest import REPO, random_images, write_edm_dataset
from test_samplers import GaussianNet
from fixtures import save_tiny_detector

TINY = ['--cbase=8', '--cres=1,2', '--num_blocks=1', '--attn=8', '--batch=4', '--lr=1e-3', '--lr_rampup=0',
        '--workers=0', '--augment=0', '--dropout=0', '--ema=0.001', '--duration=0.000008', '--nosubdir', '--seed=0']


def invoke(command, args, expect_ok=True):
    result = CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)
    if expect_ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('gen')
    data = write_edm_dataset(root / 'data.zip', random_images(8, channels=3, resolution=16, seed=4))
    invoke(train.main, ['--outdir', root / 'run', '--data', data, '--corruption_probability=0.5', *TINY])
    return root / 'run'


def pngs(folder):
    return sorted(glob.glob(os.path.join(folder, '*.png')))


def test_generate_every_snapshot_then_skip_existing(run_dir, tmp_path):
    snaps = sorted(glob.glob(str(run_dir / 'network-snapshot-*.pt')))
    assert len(snaps) == 2  # tick 0 and the end
    out = tmp_path / 'out'
    result = invoke(eval_cli.cli, ['generate', '--network', run_dir, '--outdir', out, '--seeds=0-4', '--batch=3', '--steps=3'])
    dirs = sorted(d for d in os.listdir(out) if os.path.isdir(out / d))
    assert dirs == ['000000.004', '000000.008']
    for d in dirs:
        files = [os.path.basename(p) for p in pngs(out / d)]
        assert files == [f'{s:06d}.png' for s in range(5)]
        grid = np.array(PIL.Image.open(out / f'grid-{d}.png'))
        assert grid.shape == (16, 16 * 8, 3)  # one row of the 8-wide grid
        assert np.array(PIL.Image.open(out / d / '000000.png')).shape == (16, 16, 3)
    stamps = {p: os.path.getmtime(p) for p in pngs(out / dirs[-1])}
    result = invoke(eval_cli.cli, ['generate', '--network', run_dir, '--latest', '--outdir', out, '--seeds=0-5',
                                   '--batch=3', '--steps=3'])
    assert 'Generating 1 of 6 images' in result.output
    for p, t in stamps.items():
        assert os.path.getmtime(p) == t, f'{p} was regenerated'


def test_samples_do_not_depend_on_batch_size(run_dir, tmp_path):
    common = ['generate', '--network', run_dir, '--latest', '--seeds=3-7', '--steps=4', '--num_masks=2',
              '--guidance_scale=0.5', '--S_churn=5']
    invoke(eval_cli.cli, common + ['--outdir', tmp_path / 'a', '--batch=5'])
    invoke(eval_cli.cli, common + ['--outdir', tmp_path / 'b', '--batch=2'])
    for pa in pngs(tmp_path / 'a' / '000000.008'):
        pb = str(pa).replace(str(tmp_path / 'a'), str(tmp_path / 'b'))
        assert np.array_equal(np.array(PIL.Image.open(pa)), np.array(PIL.Image.open(pb))), pa


def test_corruption_override_changes_samples(run_dir, tmp_path):
    common = ['generate', '--network', run_dir, '--latest', '--seeds=0', '--steps=3']
    invoke(eval_cli.cli, common + ['--outdir', tmp_path / 'a'])
    invoke(eval_cli.cli, common + ['--outdir', tmp_path / 'b', '--corruption_probability=0.1', '--delta_probability=0'])
    a = np.array(PIL.Image.open(tmp_path / 'a' / '000000.008' / '000000.png'))
    b = np.array(PIL.Image.open(tmp_path / 'b' / '000000.008' / '000000.png'))
    assert not np.array_equal(a, b)


def test_generate_and_score(run_dir, tmp_path):
    detector = save_tiny_detector(str(tmp_path / 'tiny.pt'), seed=0, feature_dim=8)
    ref = tmp_path / 'ref.npz'
    data = write_edm_dataset(tmp_path / 'ref.zip', random_images(12, channels=3, resolution=16, seed=9))
    invoke(eval_cli.cli, ['ref', '--data', data, '--dest', ref, '--detector', detector, '--workers=0'])
    out = tmp_path / 'out'
    invoke(eval_cli.cli, ['generate', '--network', run_dir, '--latest', '--outdir', out, '--seeds=0-9', '--steps=2',
                          '--ref', ref, '--detector', detector, '--workers=0'])
    rows = [json.loads(line) for line in open(out / 'metrics.jsonl')]
    assert len(rows) == 1 and rows[0]['num_images'] == 10 and np.isfinite(rows[0]['fid'])
    assert rows[0]['kimg'] == pytest.approx(0.008) and rows[0]['network'].endswith('.pt')


def test_generate_errors(run_dir, tmp_path):
    result = invoke(eval_cli.cli, ['generate', '--network', run_dir, '--outdir', tmp_path, '--class=1'], expect_ok=False)
    assert result.exit_code != 0 and 'unconditional' in result.output
    result = invoke(eval_cli.cli, ['generate', '--network', tmp_path / 'none', '--outdir', tmp_path], expect_ok=False)
    assert result.exit_code != 0 and 'none' in result.output
    result = invoke(eval_cli.cli, ['generate', '--network', run_dir / 'log.txt', '--outdir', tmp_path, '--watch'],
                    expect_ok=False)
    assert result.exit_code != 0 and '--watch' in result.output


def test_clean_network_uses_edm_sampler(tmp_path, monkeypatch):
    data = write_edm_dataset(tmp_path / 'data.zip', random_images(4, channels=1, resolution=16, seed=5))
    invoke(train.main, ['--outdir', tmp_path / 'run', '--data', data, '--precond=edm', '--corruption_probability=0',
                        '--delta_probability=0', *TINY])
    invoke(eval_cli.cli, ['generate', '--network', tmp_path / 'run', '--latest', '--outdir', tmp_path / 'out',
                          '--seeds=0-1', '--steps=2'])
    assert len(pngs(tmp_path / 'out' / '000000.008')) == 2
    result = invoke(eval_cli.cli, ['generate', '--network', tmp_path / 'run', '--latest', '--outdir', tmp_path / 'o2',
                                   '--num_masks=2'], expect_ok=False)
    assert 'clean (non-ambient) network' in result.output

    # The snapshot's network swapped for the exact denoiser of data N(μ, s²): along the probability-flow ODE
    # dx/dσ = (x − D(x, σ))/σ, (x − μ)/sqrt(s² + σ²) is constant, so x_T = σmax·z ends at
    # x_0 = μ + s/sqrt(s² + σmax²)·(σmax·z − μ), z the latents of the seed (EDM: randn after manual_seed(seed)).
    mu, s, sigma_max = 0.1, 0.3, 80.0
    load_network = eval_cli.snapshots.load_network

    def load_exact_denoiser(path, **kwargs):
        _, info = load_network(path, **kwargs)
        return GaussianNet(mu, s, channels=1, resolution=16).eval(), info

    monkeypatch.setattr(eval_cli.snapshots, 'load_network', load_exact_denoiser)
    invoke(eval_cli.cli, ['generate', '--network', tmp_path / 'run', '--latest', '--outdir', tmp_path / 'exact',
                          '--seeds=0-3', '--steps=100', f'--sigma_max={sigma_max}'])
    for seed in range(4):
        z = torch.randn([16, 16], generator=torch.Generator().manual_seed(seed)).double().numpy()
        x0 = np.clip(mu + s / math.sqrt(s ** 2 + sigma_max ** 2) * (sigma_max * z - mu), -1, 1)
        image = np.array(PIL.Image.open(tmp_path / 'exact' / '000000.008' / f'{seed:06d}.png'), dtype=np.float64)
        # PNG rounding (half a level) plus Heun's error at 100 steps (under 0.003, i.e. 0.4 levels).
        np.testing.assert_array_less(np.abs(image.reshape(16, 16) - (x0 + 1) * 127.5), 0.5 + 0.003 * 127.5)


@pytest.mark.slow
def test_two_processes_write_the_same_images(run_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    args = ['eval.py', 'generate', '--network', str(run_dir), '--latest', '--seeds=0-6', '--batch=2', '--steps=3']
    subprocess.run([sys.executable] + args + ['--outdir', str(tmp_path / 'one')], cwd=REPO, env=env, check=True,
                   capture_output=True)
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'] + args +
                   ['--outdir', str(tmp_path / 'two')], cwd=REPO, env=env, check=True, capture_output=True)
    one, two = pngs(tmp_path / 'one' / '000000.008'), pngs(tmp_path / 'two' / '000000.008')
    assert [os.path.basename(p) for p in one] == [os.path.basename(p) for p in two]
    for a, b in zip(one, two):
        assert np.array_equal(np.array(PIL.Image.open(a)), np.array(PIL.Image.open(b))), a


def test_denoise_error_per_sigma(run_dir, tmp_path):
    data = run_dir.parent / 'data.zip'
    out = tmp_path / 'err'
    result = invoke(eval_cli.cli, ['denoise', '--network', run_dir, '--data', data, '--outdir', out, '--seeds=0-5',
                                   '--sigmas=1,0.1', '--batch=4'])
    assert 'MSE hidden' in result.output
    rows = [json.loads(line) for line in open(out / 'denoising-error.jsonl')]
    assert [row['kimg'] for row in rows] == sorted(row['kimg'] for row in rows) and len(rows) == 2  # every snapshot
    for row in rows:
        assert row['sigmas'] == [0.1, 1.0] and row['num_images'] == 6
        assert all(np.isfinite(row['mse_visible'])) and all(np.isfinite(row['mse_hidden']))
        assert 0.4 < row['hidden_fraction'] < 0.7  # p = 0.5 and δ from training: 1 − 0.5·(1 − δ)
    assert PIL.Image.open(out / 'denoising-error.png').size[0] > 100
    # The batch does not change the numbers.
    invoke(eval_cli.cli, ['denoise', '--network', run_dir, '--data', data, '--outdir', tmp_path / 'b', '--seeds=0-5',
                          '--sigmas=1,0.1', '--batch=6'])
    other = [json.loads(line) for line in open(tmp_path / 'b' / 'denoising-error.jsonl')]
    for a, b in zip(rows, other):
        np.testing.assert_allclose(a['mse_hidden'], b['mse_hidden'], rtol=1e-5)
        np.testing.assert_allclose(a['mse_visible'], b['mse_visible'], rtol=1e-5)
    result = invoke(eval_cli.cli, ['denoise', '--network', run_dir, '--data', data, '--outdir', out, '--seeds=0-20'],
                    expect_ok=False)
    assert result.exit_code != 0 and 'holds 8 images' in result.output
    result = invoke(eval_cli.cli, ['denoise', '--network', run_dir, '--data', data, '--outdir', out, '--sigmas=0,1'],
                    expect_ok=False)
    assert result.exit_code != 0 and 'must lie in' in result.output
    small = write_edm_dataset(tmp_path / 'small.zip', random_images(4, channels=3, resolution=8, seed=1))
    result = invoke(eval_cli.cli, ['denoise', '--network', run_dir, '--data', small, '--outdir', out, '--seeds=0-3'],
                    expect_ok=False)
    assert result.exit_code != 0 and 'dataset_tool.py' in result.output and 'Traceback' not in result.output


def test_snapshot_that_names_a_foreign_class_runs_nothing(tmp_path):
    """The attack: a weights-only snapshot whose network_kwargs name os.system. Every loading command refuses it."""
    import torch

    import solve_inverse_problems
    from training import snapshots
    sentinel = tmp_path / 'PWNED'
    path = tmp_path / 'network-snapshot-000001.pt'
    torch.save(dict(format=snapshots.SNAPSHOT_FORMAT, ema={}, nimg=1000,
                    network_kwargs={'class_name': 'os.system', 'command': f'touch {sentinel}'}), path)
    data = write_edm_dataset(tmp_path / 'data.zip', random_images(4, channels=3, resolution=16, seed=1))
    for command, args in [
            (eval_cli.cli, ['generate', f'--network={path}', f'--outdir={tmp_path / "gen"}', '--seeds=0']),
            (eval_cli.cli, ['denoise', f'--network={path}', f'--data={data}', f'--outdir={tmp_path / "den"}', '--seeds=0']),
            (solve_inverse_problems.main, [f'--network={path}', f'--measurements_path={data}', f'--outdir={tmp_path / "dps"}',
                                           '--seeds=0'])]:
        result = invoke(command, args, expect_ok=False)
        assert result.exit_code != 0 and 'not one of the networks' in result.output, result.output
        assert 'Traceback' not in result.output and len(result.output.strip().splitlines()) <= 3, result.output
        assert not sentinel.exists()


def test_denoise_on_annotated_data_scores_only_clean_images(run_dir, tmp_path):
    """Noisy or corrupted images of an annotated dataset have no clean version: the error leaves them out."""
    images = random_images(8, channels=3, resolution=16, seed=4)
    data = write_edm_dataset(tmp_path / 'annotated', images)
    names = sorted(os.path.relpath(p, data).replace(os.sep, '/') for p in glob.glob(f'{data}/*/*.png'))
    with open(os.path.join(data, 'dataset.json'), 'w') as f:
        json.dump(dict(labels=None, annotations=[[names[i], 0.3, 0, 'noisy'] for i in (0, 2, 3)]), f)
    out = tmp_path / 'err'
    result = invoke(eval_cli.cli, ['denoise', '--network', run_dir, '--data', data, '--outdir', out, '--seeds=0-5',
                                   '--sigmas=1,0.1', '--batch=4', '--latest'])
    assert 'measured on the 3 clean images' in result.output and '3 noisy or corrupted' in result.output
    row = [json.loads(line) for line in open(out / 'denoising-error.jsonl')][-1]
    assert row['num_images'] == 3
    # The same numbers as the clean images alone, in a dataset without annotations (seeds 1, 4, 5 there too).
    plain = write_edm_dataset(tmp_path / 'plain.zip', images)
    invoke(eval_cli.cli, ['denoise', '--network', run_dir, '--data', plain, '--outdir', tmp_path / 'p', '--seeds=1,4,5',
                          '--sigmas=1,0.1', '--batch=4', '--latest'])
    ref = [json.loads(line) for line in open(tmp_path / 'p' / 'denoising-error.jsonl')][-1]
    np.testing.assert_allclose(row['mse_visible'], ref['mse_visible'], rtol=1e-6)
    result = invoke(eval_cli.cli, ['denoise', '--network', run_dir, '--data', data, '--outdir', tmp_path / 'q',
                                   '--seeds=0,2,3', '--latest'], expect_ok=False)
    assert result.exit_code != 0 and 'none of the 3 images of --seeds is clean' in result.output


@pytest.mark.slow  # compiles a tiny network (about a minute on 2 CPU cores)
def test_compiled_generation_writes_the_same_images(run_dir, tmp_path):
    """eval.py generate --compile (frozen weights) gives the eager images, up to one 8-bit level from float32
    rounding."""
    import numpy as np
    import PIL.Image
    base = ['generate', '--network', run_dir, '--latest', '--seeds=0-1', '--steps=4']
    invoke(eval_cli.cli, base + ['--outdir', tmp_path / 'eager'])
    invoke(eval_cli.cli, base + ['--outdir', tmp_path / 'compiled', '--compile'])
    for seed in (0, 1):
        a, b = (np.asarray(PIL.Image.open(next((tmp_path / d).glob(f'*/{seed:06d}.png'))), dtype=np.int16)
                for d in ('eager', 'compiled'))
        assert np.abs(a - b).max() <= 1


@pytest.mark.slow  # three generations
def test_generate_precision(run_dir, tmp_path):
    """--precision=bf16 samples a float32 network in bfloat16: the images stay close to float32's, the provenance
    says bfloat16 (a float32 rerun into the same directory is refused), fp16 off CUDA is refused."""
    base = ['generate', '--network', run_dir, '--latest', '--seeds=0-3', '--steps=4']
    invoke(eval_cli.cli, base + ['--outdir', tmp_path / 'fp32'])
    invoke(eval_cli.cli, base + ['--outdir', tmp_path / 'bf16', '--precision=bf16'])
    assert json.load(open(tmp_path / 'bf16' / '000000.008' / 'provenance.json'))['precision'] == 'bfloat16'
    assert json.load(open(tmp_path / 'fp32' / '000000.008' / 'provenance.json'))['precision'] == 'float32'
    a, b = (np.stack([np.asarray(PIL.Image.open(p), dtype=np.int16) for p in pngs(tmp_path / d / '000000.008')])
            for d in ('fp32', 'bf16'))
    assert 0 < np.abs(a - b).mean() < 4
    result = invoke(eval_cli.cli, base + ['--outdir', tmp_path / 'bf16', '--precision=fp32'], expect_ok=False)
    assert result.exit_code != 0 and 'bfloat16' in result.output and 'other settings' in result.output
    if not torch.cuda.is_available():
        result = invoke(eval_cli.cli, base + ['--outdir', tmp_path / 'half', '--precision=fp16'], expect_ok=False)
        assert result.exit_code != 0 and '--precision=fp16 needs a CUDA device' in result.output
    # A directory written before precisions were recorded: it was float32 on a CPU, so a float32 rerun continues.
    record = tmp_path / 'fp32' / '000000.008' / 'provenance.json'
    saved = json.load(open(record))
    del saved['precision']
    json.dump(saved, open(record, 'w'))
    result = invoke(eval_cli.cli, base + ['--outdir', tmp_path / 'fp32', '--seeds=0-4'])
    assert 'Generating 1 of 5 images' in result.output
    result = invoke(eval_cli.cli, base + ['--outdir', tmp_path / 'fp32', '--precision=bf16'], expect_ok=False)
    assert result.exit_code != 0 and 'other settings' in result.output


@pytest.mark.slow  # trains a tiny network in bfloat16
def test_bf16_trained_network_evaluates_in_float32_off_cuda(tmp_path):
    """A network trained with --fp16=bf16 samples in float32 on a CPU by default (--precision=auto), in bfloat16 when
    asked; loading it off CUDA gives a float32 network."""
    data = write_edm_dataset(tmp_path / 'data.zip', random_images(8, channels=3, resolution=16, seed=4))
    invoke(train.main, ['--outdir', tmp_path / 'run', '--data', data, '--corruption_probability=0.5', '--fp16=bf16', *TINY])
    snapshot = sorted(glob.glob(str(tmp_path / 'run' / 'network-snapshot-*.pt')))[-1]
    net, _ = snapshots.load_network(snapshot)
    assert net.compute_dtype('cpu') == torch.float32
    base = ['generate', '--network', snapshot, '--seeds=0-1', '--steps=3']
    for precision, expected in (('auto', 'float32'), ('bf16', 'bfloat16')):
        invoke(eval_cli.cli, base + ['--outdir', tmp_path / precision, f'--precision={precision}'])
        assert json.load(open(next((tmp_path / precision).glob('*/provenance.json'))))['precision'] == expected
