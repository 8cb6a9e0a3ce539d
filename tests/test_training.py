"""Tests for train.py and training/training_loop.py: CLI smoke runs, exact resume, checkpoints, stats."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import train
from training import training_loop
from conftest import REPO, random_images, write_edm_dataset

TINY = ['--cbase=8', '--cres=1,2', '--num_blocks=1', '--attn=8', '--batch=4', '--lr=1e-3', '--lr_rampup=0',
        '--workers=0', '--augment=0', '--dropout=0', '--ema=0.001']


@pytest.fixture
def data(tmp_path):
    images = random_images(16, channels=3, resolution=16, seed=2)
    return write_edm_dataset(tmp_path / 'data.zip', images, labels=[i % 2 for i in range(16)])


@pytest.fixture(autouse=True)
def restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)


def run(args, expect_ok=True):
    result = CliRunner().invoke(train.main, [str(a) for a in args], catch_exceptions=False)
    if expect_ok:
        assert result.exit_code == 0, result.output
    return result


def steps(n, batch=4):
    """--duration (Mimg) of n optimizer steps."""
    return f'--duration={n * batch / 1e6}'


def only_run_dir(outdir):
    dirs = [d for d in glob.glob(os.path.join(outdir, '*')) if os.path.isdir(d)]
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_dry_run_prints_config_and_writes_nothing(tmp_path, data):
    out = tmp_path / 'runs'
    result = run(['--outdir', out, '--data', data, '--dry-run', *TINY])
    assert 'Dry run' in result.output and '"class_name": "training.loss.AmbientLoss"' in result.output
    assert '00000-data-uncond-ddpmpp-ambient-gpus1-batch4-fp32' in result.output
    assert not out.exists()


def test_two_ticks_write_run_directory(tmp_path, data):
    out = tmp_path / 'runs'
    run(['--outdir', out, '--data', data, steps(4), '--tick=0.008', '--snap=1', '--dump=1', '--seed=1',
         '--corruption_probability=0.5', '--delta_probability=0.2', *TINY])
    run_dir = only_run_dir(out)
    names = set(os.listdir(run_dir))
    assert {'training_options.json', 'log.txt', 'stats.jsonl', 'loss.png', 'training-data.png'} <= names
    assert 'network-snapshot-000000.016.pt' in names and 'training-state-000000.016.pt' in names
    rows = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]
    assert len(rows) == 3  # ticks at 1 step, 3 steps and the end
    for row in rows:
        assert {'Loss/loss', 'Loss/loss_hat', 'Progress/kimg', 'Timing/sec_per_kimg', 'timestamp'} <= set(row)
        assert row['Loss/loss']['num'] > 0 and row['Loss/loss']['mean'] > 0
    assert rows[-1]['Progress/kimg']['mean'] == pytest.approx(0.016)
    assert 'tick 2' in open(os.path.join(run_dir, 'log.txt')).read()
    # The snapshot is data: weights_only loading, the network rebuilds from it.
    net, snap = training_loop.load_snapshot(os.path.join(run_dir, 'network-snapshot-000000.016.pt'))
    assert snap['corruption']['corruption_probability'] == 0.5 and snap['nimg'] == 16
    x = torch.zeros(2, 6, 16, 16)
    assert net(x, torch.ones(2)).shape == (2, 3, 16, 16)
    options = json.load(open(os.path.join(run_dir, 'training_options.json')))
    assert options['network_kwargs']['gate'] == 'sigmoid' and options['dataset_kwargs']['hat_seed'] == 1
    # New ambient runs use the mask-aware preconditioning, in the network and in the loss weights alike.
    assert net.hidden_precond == 'mask_aware' and snap['network_kwargs']['hidden_precond'] == 'mask_aware'
    assert options['loss_kwargs']['hidden_precond'] == 'mask_aware'


def test_hidden_precond_original(tmp_path, data):
    result = run(['--outdir', tmp_path, '--data', data, '--dry-run', '--hidden_precond=original', *TINY])
    assert result.output.count('"hidden_precond": "original"') == 2  # network and loss


@pytest.mark.parametrize('precond', ['ambient', 'ambient_vp', 'edm', 'vp', 've'])
def test_every_precond_trains(tmp_path, data, precond):
    extra = ['--delta_probability=0'] if precond not in ('ambient', 'ambient_vp') else []
    run(['--outdir', tmp_path, '--data', data, steps(2), '--precond', precond, *extra, *TINY])
    snap = sorted(glob.glob(os.path.join(only_run_dir(tmp_path), 'network-snapshot-*.pt')))[-1]
    net, _ = training_loop.load_snapshot(snap)
    channels = 6 if precond.startswith('ambient') else 3
    assert net(torch.zeros(1, channels, 16, 16), torch.ones(1)).shape == (1, 3, 16, 16)


@pytest.mark.parametrize('arch,extra', [('ddpmpp', []), ('ncsnpp', []), ('adm', ['--cbase=64', '--attn=8'])])
def test_every_arch_trains(tmp_path, data, arch, extra):
    run(['--outdir', tmp_path, '--data', data, steps(1), '--arch', arch, *TINY, *extra, '--cond=True'])
    assert glob.glob(os.path.join(only_run_dir(tmp_path), 'network-snapshot-*.pt'))


def test_augmentation_and_accumulation_run(tmp_path, data):
    run(['--outdir', tmp_path, '--data', data, steps(2, batch=8), *TINY, '--batch=8', '--batch-gpu=2', '--augment=0.5',
         '--max_grad_norm=1', '--weight_decay=0.01', '--xflip=True', '--dropout=0.1'])


def _final_ema(run_dir):
    snaps = sorted(glob.glob(os.path.join(run_dir, 'network-snapshot-*.pt')))
    return torch.load(snaps[-1], weights_only=True)['ema']


def test_resume_is_bitwise_exact(tmp_path, data):
    common = ['--data', data, '--seed=3', '--deterministic=True', '--nosubdir', '--tick=0.008', '--snap=1', '--dump=1',
              *TINY, '--dropout=0.2', '--augment=0.5', '--delta_probability=0.3', '--batch-gpu=2', '--workers=1']
    run(['--outdir', tmp_path / 'straight', steps(6), *common])
    run(['--outdir', tmp_path / 'split', steps(3), *common])
    run(['--outdir', tmp_path / 'split', steps(6), '--resume', tmp_path / 'split', *common])
    a, b = _final_ema(tmp_path / 'straight'), _final_ema(tmp_path / 'split')
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # The resumed run appended to the same stats file.
    rows = [json.loads(line) for line in open(tmp_path / 'split' / 'stats.jsonl')]
    assert rows[-1]['Progress/kimg']['mean'] == pytest.approx(0.024)


def test_resume_refuses_changed_config(tmp_path, data):
    run(['--outdir', tmp_path, '--data', data, steps(1), '--nosubdir', *TINY])
    result = run(['--outdir', tmp_path, '--data', data, steps(2), '--resume', tmp_path, *TINY, '--cbase=16'], expect_ok=False)
    assert result.exit_code != 0 and 'network_kwargs.model_channels' in result.output
    result = run(['--outdir', tmp_path, '--data', data, steps(2), '--resume', tmp_path, *TINY,
                  '--corruption_probability=0.7'], expect_ok=False)
    assert 'corruption.corruption_probability' in result.output


def test_transfer_initialises_weights(tmp_path, data):
    run(['--outdir', tmp_path / 'a', '--data', data, steps(1), '--nosubdir', *TINY])
    snap = glob.glob(str(tmp_path / 'a' / 'network-snapshot-*.pt'))[0]
    run(['--outdir', tmp_path / 'b', '--data', data, steps(1), '--nosubdir', '--transfer', snap, *TINY, '--lr=1e-12'])
    a = torch.load(snap, weights_only=True)['ema']
    b = _final_ema(tmp_path / 'b')
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_atomic_checkpoint_write(tmp_path, monkeypatch):
    path = tmp_path / 'state.pt'
    training_loop.atomic_torch_save({'x': torch.ones(3)}, path)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b'partial bytes')
        raise RuntimeError('killed during save')

    monkeypatch.setattr(torch, 'save', broken_save)
    with pytest.raises(RuntimeError, match='killed'):
        training_loop.atomic_torch_save({'x': torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)['x'], torch.ones(3))
    assert os.listdir(tmp_path) == ['state.pt']


@pytest.mark.parametrize('args,message', [
    (['--batch=6', '--batch-gpu=4'], 'divisible'),
    (['--cond=True', '--data=NOLABELS'], 'labels'),
    (['--precond=edm', '--norm=1'], '--norm=1 only applies'),
    (['--precond=vp'], '--delta_probability'),
    (['--precond=edm', '--delta_probability=0', '--hidden_precond=mask_aware'], '--hidden_precond only applies'),
    (['--data=MISSING'], 'dataset not found'),
    (['--corruption_probability=1.0'], 'corruption_probability'),
])
def test_validation_errors(tmp_path, data, args, message):
    nolabels = write_edm_dataset(tmp_path / 'nolabels.zip', random_images(4, resolution=16))
    args = [a.replace('NOLABELS', nolabels).replace('MISSING', str(tmp_path / 'missing.zip')) for a in args]
    base = ['--outdir', tmp_path / 'runs', '--data', data, *TINY]
    result = run(base + args, expect_ok=False)
    assert result.exit_code != 0 and message in result.output, result.output


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, data):
    """torchrun with 2 gloo processes and the same global batch gives the same weights as one process."""
    common = [sys.executable, '-m', 'torch.distributed.run', '--standalone']
    args = ['train.py', '--data', data, '--seed=5', '--nosubdir', steps(3), *TINY, '--ema=0']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    for nproc, out in ((1, 'one'), (2, 'two')):
        subprocess.run(common + [f'--nproc_per_node={nproc}'] + args + ['--outdir', str(tmp_path / out)],
                       cwd=REPO, env=env, check=True, capture_output=True)
    a, b = _final_ema(tmp_path / 'one'), _final_ema(tmp_path / 'two')
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    la = [json.loads(l)['Loss/loss']['mean'] for l in open(tmp_path / 'one' / 'stats.jsonl')]
    lb = [json.loads(l)['Loss/loss']['mean'] for l in open(tmp_path / 'two' / 'stats.jsonl')]
    assert la == pytest.approx(lb, rel=1e-4)


def test_states_from_before_hidden_precond_resume_with_the_original_formulation(tmp_path, data):
    """A state written before --hidden_precond existed has no such keys: it was trained with the original formulation."""
    run(['--outdir', tmp_path, '--data', data, steps(1), '--nosubdir', '--dump=1', '--hidden_precond=original',
         '--cond_sigma_min=0', *TINY])
    state_path = training_loop.find_latest_state(str(tmp_path))
    state = torch.load(state_path, weights_only=True)
    for key in ('network_kwargs', 'loss_kwargs'):
        del state['config'][key]['hidden_precond']
    torch.save(state, state_path)
    refused = run(['--outdir', tmp_path, '--data', data, steps(2), '--resume', tmp_path, *TINY], expect_ok=False)
    assert refused.exit_code != 0 and "hidden_precond: 'original' in the state, 'mask_aware' now" in refused.output
    run(['--outdir', tmp_path, '--data', data, steps(2), '--resume', tmp_path, '--hidden_precond=original',
         '--cond_sigma_min=0', *TINY])


def test_loss_must_fit_the_network():
    from training.loss import AmbientLoss
    from training.networks import EDMPrecond
    net = EDMPrecond(16, 2, ambient=True, model_type='SongUNet', model_channels=8, channel_mult=[1], num_blocks=1,
                     attn_resolutions=[], hidden_precond='mask_aware')
    training_loop.check_loss_fits_network(AmbientLoss(hidden_precond='mask_aware'), net)
    with pytest.raises(ValueError, match="loss_kwargs.hidden_precond='original' differs"):
        training_loop.check_loss_fits_network(AmbientLoss(), net)
