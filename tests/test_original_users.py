"""What users of the original ambient-diffusion code rely on: no option silently ignored, --transfer from the
original's .pkl, the all-pixel loss diagnostic (the original's loss_test) that never reaches the gradient."""

import glob
import json
import os
import pickle

import pytest
import torch
from click.testing import CliRunner

import train
from training import snapshots
from training.loss import AmbientLoss
from conftest import random_images, write_edm_dataset

TINY = ['--cbase=8', '--cres=1,2', '--num_blocks=1', '--attn=8', '--batch=4', '--lr=1e-3', '--lr_rampup=0',
        '--workers=0', '--augment=0', '--dropout=0', '--ema=0.001', '--duration=0.000008', '--nosubdir']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_edm_dataset(tmp_path_factory.mktemp('data') / 'data.zip', random_images(8, channels=3, resolution=16, seed=4))


def invoke(args):
    return CliRunner().invoke(train.main, [str(a) for a in args])


@pytest.mark.parametrize('args, needle', [
    (['--experiment_name=x'], '--experiment_name has no effect'),
    (['--gated=False', '--gate=double_sigmoid'], '--gate has no effect'),
    (['--corruption_pattern=box', '--mask_full_rgb=True'], '--mask_full_rgb has no effect'),
    (['--fp16=True'], '--fp16 has no effect'),
    (['--augment=0', '--augment_set=edm'], '--augment_set has no effect'),
    (['--desc=name'], '--desc has no effect'),
    (['--deterministic=True', '--bench=True'], '--bench has no effect'),
    (['--precond=edm', '--delta_probability=0', '--clean_diagnostics=True'], 'every pixel'),
])
def test_train_refuses_options_that_would_be_ignored(tmp_path, data, args, needle):
    result = invoke(['--outdir', tmp_path / 'run', '--data', data, *TINY, *args])
    assert result.exit_code != 0 and needle in result.output, result.output
    assert not (tmp_path / 'run').exists()


def test_the_same_options_at_their_defaults_are_fine(tmp_path, data):
    result = invoke(['--outdir', tmp_path / 'run', '--data', data, *TINY, '--dry-run'])
    assert result.exit_code == 0, result.output


def test_resume_keeps_its_seed(tmp_path, data):
    run = tmp_path / 'run'
    assert invoke(['--outdir', run, '--data', data, *TINY, '--seed=3']).exit_code == 0
    result = invoke(['--outdir', run, '--data', data, *TINY, '--duration=0.000016', '--resume', run, '--seed=4'])
    assert result.exit_code != 0 and "differs from the run's seed 3" in result.output


def test_transfer_from_the_originals_pickle(tmp_path, data):
    """An original .pkl (dict with the EMA state dict under DDP/compile prefixes) initialises a new run's weights,
    read by the restricted unpickler."""
    run = tmp_path / 'a'
    assert invoke(['--outdir', run, '--data', data, *TINY]).exit_code == 0
    ema = torch.load(glob.glob(str(run / 'network-snapshot-*.pt'))[-1], weights_only=True)['ema']
    original = tmp_path / 'network-snapshot-000000.pkl'
    with open(original, 'wb') as f:
        pickle.dump(dict(ema={f'_orig_mod.module.{k}': v for k, v in ema.items()}, dataset_kwargs={}), f)
    assert snapshots.read_weights(original).keys() == ema.keys()
    result = invoke(['--outdir', tmp_path / 'b', '--data', data, *TINY, '--transfer', original, '--lr=1e-12'])
    assert result.exit_code == 0, result.output
    b = torch.load(glob.glob(str(tmp_path / 'b' / 'network-snapshot-*.pt'))[-1], weights_only=True)['ema']
    assert all(torch.allclose(ema[k], b[k], atol=1e-6) for k in ema)


def test_clean_diagnostics_report_every_pixel_and_never_reach_the_gradient(tmp_path, data):
    result = invoke(['--outdir', tmp_path / 'run', '--data', data, *TINY, '--clean_diagnostics=True',
                     '--corruption_probability=0.5'])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in open(tmp_path / 'run' / 'stats.jsonl')]
    assert all('Loss/loss_all' in row for row in rows)

    torch.manual_seed(0)
    net = torch.nn.Conv2d(6, 3, 3, padding=1)
    x0 = torch.randn(2, 3, 8, 8)
    A = (torch.rand(2, 3, 8, 8) > 0.5).float()
    A_hat = A * (torch.rand(2, 3, 8, 8) > 0.2).float()
    grads = []
    for clean in (None, x0):
        net.zero_grad()
        gen = [torch.Generator().manual_seed(s) for s in (1, 2)]
        loss, diagnostics = AmbientLoss()(lambda x, s, l, augment_labels=None: net(x), A * x0, A, A_hat, clean=clean,
                                          generator=gen)
        loss.sum().backward()
        grads.append(net.weight.grad.clone())
        assert ('loss_all' in diagnostics) == (clean is not None)
    assert torch.equal(grads[0], grads[1])
