"""Training beyond one machine: torchrun's c10d rendezvous (as on several nodes, here two processes on localhost),
and resumes on another number of processes (exact, or refused with one line where dropout draws from each
process's RNG)."""

import glob
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import train
from conftest import REPO, random_images, steps, write_edm_dataset

TINY = ['--cbase=8', '--cres=1,2', '--num_blocks=1', '--attn=4', '--batch=4', '--lr=1e-3', '--lr_rampup=0',
        '--workers=0', '--augment=0', '--ema=0', '--precond=ambient', '--corruption_probability=0.4', '--seed=7',
        '--nosubdir', '--tick=0.008', '--snap=1', '--dump=1']


def free_port():
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def final_state(run_dir):
    return torch.load(sorted(glob.glob(os.path.join(run_dir, 'training-state-*.pt')))[-1], weights_only=True)


@pytest.fixture(scope='module')
def data_zip(tmp_path_factory):
    return write_edm_dataset(tmp_path_factory.mktemp('mn') / 'data.zip', random_images(8, channels=1, resolution=8, seed=2))


def rendezvous(nproc, args):
    """train.py under torchrun with a c10d rendezvous, as each node of a multi-node job starts it."""
    command = [sys.executable, '-m', 'torch.distributed.run', '--nnodes=1', f'--nproc_per_node={nproc}',
               '--rdzv_backend=c10d', f'--rdzv_endpoint=localhost:{free_port()}', '--rdzv_id=test-job', 'train.py']
    result = subprocess.run(command + [str(a) for a in args], cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS='1'),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow  # two torchrun launches and two in-process runs
def test_c10d_rendezvous_and_a_resume_on_one_process_continue_exactly(tmp_path, data_zip):
    """4 steps on one process = 2 steps on two processes (c10d rendezvous), then a resume on one process: every
    draw is keyed by the sampler position, so only the all-reduce's rounding differs."""
    straight = CliRunner().invoke(train.main, [str(a) for a in ['--outdir', tmp_path / 'straight', '--data', data_zip,
                                                                steps(4), '--dropout=0', *TINY]])
    assert straight.exit_code == 0, straight.output
    rendezvous(2, ['--outdir', tmp_path / 'split', '--data', data_zip, steps(2), '--dropout=0', *TINY])
    assert final_state(tmp_path / 'split')['cur_nimg'] == 8 and len(final_state(tmp_path / 'split')['rng']) == 2
    resumed = CliRunner().invoke(train.main, [str(a) for a in ['--outdir', tmp_path / 'split', '--data', data_zip,
                                                               steps(4), '--dropout=0', *TINY, '--resume',
                                                               tmp_path / 'split']])
    assert resumed.exit_code == 0, resumed.output
    a, b = final_state(tmp_path / 'straight'), final_state(tmp_path / 'split')
    assert a['sampler'] == b['sampler'] and a['cur_nimg'] == b['cur_nimg'] == 16
    for name in a['net']:
        torch.testing.assert_close(a['net'][name], b['net'][name], rtol=1e-4, atol=1e-4)
    rows_a = [json.loads(line)['Loss/loss']['mean'] for line in open(tmp_path / 'straight' / 'stats.jsonl')]
    rows_b = [json.loads(line)['Loss/loss']['mean'] for line in open(tmp_path / 'split' / 'stats.jsonl')]
    assert rows_a[0] == pytest.approx(rows_b[0], rel=1e-4)  # tick 0 (the first step); later ticks split differently


@pytest.mark.slow  # one torchrun launch
def test_resume_with_dropout_on_another_world_size_is_refused_unless_allowed(tmp_path, data_zip):
    rendezvous(2, ['--outdir', tmp_path / 'run', '--data', data_zip, steps(2), '--dropout=0.1', *TINY])
    args = ['--outdir', tmp_path / 'run', '--data', data_zip, steps(4), '--dropout=0.1', *TINY, '--resume', tmp_path / 'run']
    result = CliRunner().invoke(train.main, [str(a) for a in args])
    errors = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert result.exit_code != 0 and len(errors) == 1 and 'trained on 2 processes' in errors[0], result.output
    assert final_state(tmp_path / 'run')['cur_nimg'] == 8  # nothing written
    result = CliRunner().invoke(train.main, [str(a) for a in args + ['--allow_world_size_change']])
    assert result.exit_code == 0, result.output
    assert final_state(tmp_path / 'run')['cur_nimg'] == 16


def test_allow_world_size_change_needs_resume(tmp_path, data_zip):
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path), '--data', data_zip, '--allow_world_size_change'])
    assert result.exit_code != 0 and 'only applies with --resume' in result.output
