"""train.py --precond=vdm, eval.py bpd and eval.py generate --solver=vdm: configs, one-line errors, end-to-end runs,
resumes and two processes."""

import glob
import json
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
from training import vdm
from training.networks import VDMPrecond
from training.snapshots import load_network
from torch_utils.misc import seeded_generator
from conftest import REPO, assert_one_line_error, random_images, steps, train_options, write_edm_dataset

TINY = ['--cbase=8', '--cres=1,2', '--num_blocks=1', '--attn=4', '--batch=4', '--lr=1e-3', '--lr_rampup=0',
        '--workers=0', '--dropout=0', '--ema=0.001']


@pytest.fixture(scope='module')
def data_zip(tmp_path_factory):
    return write_edm_dataset(tmp_path_factory.mktemp('vdm') / 'data.zip', random_images(8, channels=1, resolution=8, seed=0))


def final_state(run_dir):
    return torch.load(sorted(glob.glob(os.path.join(run_dir, 'training-state-*.pt')))[-1], weights_only=True)


def test_config():
    base = ['--outdir=unused', '--data=unused', '--precond=vdm']
    c = train.build_config(train_options(base))
    assert c.network_kwargs.class_name == 'training.networks.VDMPrecond' and c.network_kwargs.schedule == 'learned'
    assert (c.network_kwargs.gamma_min, c.network_kwargs.gamma_max) == (-13.3, 5.0)
    assert c.loss_kwargs == dict(class_name='training.vdm.VDMLoss', t_sampling='low_discrepancy', T=None, strata=512)
    assert c.augment_kwargs is None and c.dataset_kwargs.corruption_probability == 0
    assert not c.network_kwargs.ambient and 'fourier_features' not in c.network_kwargs
    c = train.build_config(train_options(base + ['--schedule=fixed_linear', '--T=100', '--t_sampling=antithetic',
                                                 '--fourier_features=7,8', '--gamma_min=-10', '--batch=64']))
    assert c.loss_kwargs.T == 100 and c.loss_kwargs.t_sampling == 'antithetic' and c.loss_kwargs.strata == 64
    assert c.network_kwargs.fourier_features == [7, 8] and c.network_kwargs.gamma_min == -10
    assert 'T' not in c.network_kwargs  # the discrete bound is the loss's; the network is the same


@pytest.mark.parametrize('args,needle', [
    (['--precond=vdm', '--gamma_min=5', '--gamma_max=5'], 'must be below --gamma_max'),
    (['--precond=vdm', '--gamma_min=6'], 'must be below --gamma_max'),
    (['--precond=vdm', '--gamma_min=-inf'], 'both finite'),
    (['--precond=vdm', '--cond_sigma_min=0.1'], '--cond_sigma_min'),
    (['--precond=vdm', '--augment=0.1'], 'augmentation'),
    (['--precond=vdm', '--corruption_probability=0.5'], 'masks'),
    (['--precond=vdm', '--noise_sigma=0.2'], 'synthetic noise'),
    (['--precond=vdm', '--task=superres'], '--task'),
    (['--precond=edm', '--schedule=learned'], '--precond=vdm'),
    (['--precond=ambient', '--t_sampling=uniform'], '--precond=vdm'),
    (['--precond=vdm', '--T=0'], '--T'),
    (['--precond=ddpm', '--T=1'], 'at least 2'),
])
def test_train_errors(tmp_path, data_zip, args, needle):
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path / 'out'), '--data', data_zip, *args])
    assert_one_line_error(result, needle)
    assert not (tmp_path / 'out').exists() or not os.listdir(tmp_path / 'out')


@pytest.fixture(scope='module')
def vdm_run(tmp_path_factory, data_zip):
    out = tmp_path_factory.mktemp('vdm-run') / 'run'
    args = ['--outdir', out, '--data', data_zip, '--precond=vdm', steps(3), '--nosubdir', '--seed=0', '--snap=1',
            '--tick=0.008', '--fourier_features=7', *TINY]
    result = CliRunner().invoke(train.main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow  # trains a tiny model
def test_training_logs_each_term_and_trains_the_schedule(vdm_run):
    rows = [json.loads(line) for line in open(vdm_run / 'stats.jsonl')]
    for name in ('vdm/bpd', 'vdm/prior_bpd', 'vdm/reconstruction_bpd', 'vdm/diffusion_bpd'):
        assert np.isfinite(rows[-1][f'Loss/{name}']['mean']) and rows[-1][f'Loss/{name}']['std'] > 0
    state = final_state(vdm_run)
    assert len(state['optimizer']['param_groups']) == 2 and state['optimizer']['param_groups'][1]['weight_decay'] == 0
    init = VDMPrecond(8, 1, schedule='learned', model_channels=8, channel_mult=[1, 2], num_blocks=1).schedule.state_dict()
    for name, value in init.items():  # the endpoints and the shape moved
        assert not torch.allclose(state['net'][f'schedule.{name}'], value), name


@pytest.mark.slow  # trains a tiny model
def test_bpd_command(vdm_run, data_zip, tmp_path):
    out = tmp_path / 'bpd'
    args = ['bpd', '--network', str(vdm_run), '--latest', '--data', data_zip, '--outdir', str(out), '--num_t=2',
            '--seeds=0-5']
    result = CliRunner().invoke(eval_cli.cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in open(out / 'bpd.jsonl')]
    assert len(rows) == 1 and rows[0]['num_images'] == 6 and rows[0]['schedule'] == 'learned'
    row = rows[0]
    # The command's means and standard errors are those of the library's per-image bits, image i keyed by seed i.
    net, _ = load_network(row['network'])
    from training.dataset import ImageFolderDataset
    dataset = ImageFolderDataset(data_zip, mode='clean', normalize=False)
    k = torch.stack([dataset[i][0] for i in range(6)]).long()
    bits = vdm.image_bits(net, net.schedule, k, 2, [seeded_generator(9, i) for i in range(6)])
    for name in ('total', 'prior', 'reconstruction', 'diffusion'):
        assert row[f'bpd_{name}'] == pytest.approx(float(bits[name].mean()), rel=1e-6)
        assert row[f'bpd_{name}_se'] == pytest.approx(float(bits[name].std() / 6 ** 0.5), rel=1e-6)
    # A rerun skips the snapshot; other options add a row.
    result = CliRunner().invoke(eval_cli.cli, args, catch_exceptions=False)
    assert 'skipped' in result.output and len(open(out / 'bpd.jsonl').readlines()) == 1
    result = CliRunner().invoke(eval_cli.cli, args[:-2] + ['--num_t=1', '--seeds=0-5', '--T=10'], catch_exceptions=False)
    assert len(open(out / 'bpd.jsonl').readlines()) == 2
    result = CliRunner().invoke(eval_cli.cli, args[:-1] + ['--seeds=1-6'], catch_exceptions=False)  # other images
    assert 'skipped' not in result.output and len(open(out / 'bpd.jsonl').readlines()) == 3
    # A VDM network has its own schedule.
    result = CliRunner().invoke(eval_cli.cli, args + ['--gamma_min=-10'])
    assert_one_line_error(result, '--gamma_min', 'own schedule')


@pytest.mark.slow  # trains a tiny model
def test_bpd_of_edm_networks_and_errors(tmp_path, data_zip):
    run = tmp_path / 'edm'
    args = ['--outdir', run, '--data', data_zip, '--precond=edm', '--corruption_probability=0', '--augment=0', steps(1),
            '--nosubdir', '--seed=0', *TINY]
    assert CliRunner().invoke(train.main, [str(a) for a in args], catch_exceptions=False).exit_code == 0
    out = tmp_path / 'bpd'
    base = ['bpd', '--network', str(run), '--latest', '--data', data_zip, '--outdir', str(out), '--num_t=1']
    result = CliRunner().invoke(eval_cli.cli, base + ['--gamma_min=-10', '--gamma_max=4'], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    row = json.loads(open(out / 'bpd.jsonl').readline())
    assert row['schedule'] == 'fixed_linear' and row['gamma_min'] == -10 and np.isfinite(row['bpd_total'])
    assert_one_line_error(CliRunner().invoke(eval_cli.cli, base + ['--gamma_min=5', '--outdir', str(tmp_path / 'x')]),
                          'gamma_min')
    # Not 8-bit data: one line naming the image.
    images = (np.random.default_rng(0).random((4, 8, 8)) * 65535).astype(np.uint16)
    folder = tmp_path / 'deep'
    os.makedirs(folder)
    for i, image in enumerate(images):
        PIL.Image.fromarray(image).save(folder / f'{i}.png')
    result = CliRunner().invoke(eval_cli.cli, ['bpd', '--network', str(run), '--latest', '--data', str(folder),
                                               '--outdir', str(tmp_path / 'y')])
    assert_one_line_error(result, '8-bit')
    # --solver=vdm needs a VDM network.
    result = CliRunner().invoke(eval_cli.cli, ['generate', '--network', str(run), '--latest', '--outdir',
                                               str(tmp_path / 'gen'), '--seeds=0', '--solver=vdm'])
    assert_one_line_error(result, '--solver=vdm', 'schedule')


@pytest.mark.slow  # trains a tiny model
def test_generate_with_the_vdm_solver(vdm_run, tmp_path):
    out = tmp_path / 'gen'
    args = ['generate', '--network', str(vdm_run), '--latest', '--outdir', str(out), '--seeds=0-2', '--solver=vdm',
            '--steps=5']
    result = CliRunner().invoke(eval_cli.cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert len(glob.glob(str(out / '*' / '*.png'))) == 3
    for extra, needle in ((['--sigma_max=10'], '--sigma_max'), (['--eta=0.5'], '--eta'), (['--S_churn=1'], '--S_churn')):
        result = CliRunner().invoke(eval_cli.cli, args + extra)
        assert_one_line_error(result, needle)


@pytest.fixture
def restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.slow  # three short training runs
def test_vdm_training_resumes_bitwise(tmp_path, data_zip, restore_determinism):
    """4 steps straight = 2 steps, stop, resume to 4: the network, the learned schedule, its optimizer group."""
    common = ['--data', data_zip, '--precond=vdm', '--seed=3', '--deterministic=True', '--nosubdir', '--tick=0.008',
              '--snap=1', '--dump=1', *TINY, '--batch-gpu=2']
    for out, n in (('straight', 4), ('split', 2), ('split', 4)):
        resume = ['--resume', tmp_path / out] if (out, n) == ('split', 4) else []
        result = CliRunner().invoke(train.main, [str(a) for a in ['--outdir', tmp_path / out, steps(n), *common, *resume]])
        assert result.exit_code == 0, result.output
    a, b = final_state(tmp_path / 'straight'), final_state(tmp_path / 'split')
    for key in ('net', 'ema'):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert 'schedule.raw_w' in a['net']


@pytest.mark.slow  # two torchrun launches
def test_vdm_two_processes_match_one(tmp_path, data_zip):
    """2 gloo processes and the same global batch give the weights of one process: the times are keyed by global
    positions (stratified per global batch), and the whole bound runs inside DDP's forward."""
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone']
    args = ['train.py', '--data', data_zip, '--precond=vdm', '--seed=5', '--nosubdir', steps(3), *TINY, '--ema=0']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    for nproc, out in ((1, 'one'), (2, 'two')):
        subprocess.run(command + [f'--nproc_per_node={nproc}'] + args + ['--outdir', str(tmp_path / out)],
                       cwd=REPO, env=env, check=True, capture_output=True)
    a, b = final_state(tmp_path / 'one'), final_state(tmp_path / 'two')
    for name in a['ema']:
        torch.testing.assert_close(a['ema'][name], b['ema'][name], rtol=1e-4, atol=1e-4)
    la = [json.loads(line)['Loss/vdm/bpd']['mean'] for line in open(tmp_path / 'one' / 'stats.jsonl')]
    lb = [json.loads(line)['Loss/vdm/bpd']['mean'] for line in open(tmp_path / 'two' / 'stats.jsonl')]
    assert la == pytest.approx(lb, rel=1e-4)


@pytest.mark.slow  # one torchrun launch
def test_bpd_two_processes_match_one(vdm_run, data_zip, tmp_path):
    """eval.py bpd splits the images over processes and gathers them: 2 processes write the row 1 process writes."""
    args = ['eval.py', 'bpd', '--network', str(vdm_run), '--latest', '--data', data_zip, '--num_t=2', '--seeds=0-6']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    subprocess.run([sys.executable] + args + ['--outdir', str(tmp_path / 'one')], cwd=REPO, env=env, check=True,
                   capture_output=True)
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'] + args +
                   ['--outdir', str(tmp_path / 'two')], cwd=REPO, env=env, check=True, capture_output=True)
    one, two = (json.loads(open(tmp_path / name / 'bpd.jsonl').readline()) for name in ('one', 'two'))
    for key in one:
        if key.startswith('bpd_'):
            assert one[key] == pytest.approx(two[key], rel=1e-6), key
