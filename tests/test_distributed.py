"""Tests for torch_utils/distributed.py: single-process defaults, and two gloo processes under torchrun."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

from torch_utils import distributed

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def single_process(monkeypatch):
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(name, raising=False)
    distributed.shutdown()
    yield
    distributed.shutdown()


def test_single_process_defaults(single_process, capsys):
    assert not distributed.is_initialized()
    distributed.init()
    distributed.init()  # Idempotent.
    assert distributed.is_initialized() and not dist.is_initialized()  # No process group, so no port needed.
    assert 'MASTER_PORT' not in os.environ
    assert (distributed.get_rank(), distributed.get_world_size(), distributed.get_local_rank()) == (0, 1, 0)
    assert distributed.get_backend() is None
    expected_device = 'cuda' if torch.cuda.is_available() else 'cpu'
    assert distributed.device().type == expected_device

    x = torch.arange(4.0)
    assert distributed.all_reduce_sum(x) is x and x.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert distributed.broadcast(x, src=0) is x and x.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert distributed.all_gather_object({'a': 1}) == [{'a': 1}]
    assert distributed.broadcast_object('hello') == 'hello'
    distributed.barrier()
    distributed.print0('printed once')
    assert capsys.readouterr().out == 'printed once\n'
    with pytest.raises(ValueError, match='src=1'):
        distributed.broadcast(x, src=1)


def test_world_size_one_from_env(single_process, monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '1')
    monkeypatch.setenv('RANK', '0')
    distributed.init()
    assert distributed.get_world_size() == 1 and not dist.is_initialized()


@pytest.mark.parametrize('env,match', [
    (dict(RANK='2', WORLD_SIZE='2'), 'RANK=2'),
    (dict(RANK='zero', WORLD_SIZE='2'), "RANK='zero'"),
])
def test_invalid_env_is_reported(single_process, monkeypatch, env, match):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        distributed.init()
    assert not distributed.is_initialized()


def test_invalid_backend(single_process):
    with pytest.raises(ValueError, match="'mpi'"):
        distributed.init(backend='mpi')


def test_sync_device_alone_is_none(single_process):
    assert distributed.sync_device() is None


WORKER = textwrap.dedent('''
    import json, sys
    import torch
    from torch_utils import distributed, misc

    distributed.init()
    distributed.init()
    rank, world = distributed.get_rank(), distributed.get_world_size()
    out = dict(rank=rank, world=world, local_rank=distributed.get_local_rank(), backend=distributed.get_backend(),
               device=str(distributed.device()))

    x = torch.tensor([1.0, 2.0]) * (rank + 1)
    out['sum'] = distributed.all_reduce_sum(x).tolist()
    strided = torch.arange(6.0).reshape(2, 3).t() * (rank + 1)  # Non-contiguous.
    out['strided_sum'] = distributed.all_reduce_sum(strided).tolist()
    y = torch.full([3], float(rank + 10))
    out['broadcast'] = distributed.broadcast(y, src=1).tolist()
    out['gathered'] = distributed.all_gather_object({'rank': rank})
    out['object'] = distributed.broadcast_object(f'from {rank}', src=0)
    distributed.barrier()
    distributed.print0('PRINT0-MARKER', flush=True)

    net = torch.nn.Linear(2, 2)
    with torch.no_grad():
        net.weight.fill_(float('nan'))
        net.bias.fill_(0.5)
    misc.check_ddp_consistency(net)  # Equal on both ranks, nan included.
    with torch.no_grad():
        net.bias[0] = float(rank)
    try:
        misc.check_ddp_consistency(net)
        out['inconsistent'] = None
    except RuntimeError as err:
        out['inconsistent'] = str(err)
    misc.check_ddp_consistency(net, ignore_regex=r'.*\\.bias')
    distributed.barrier()
    with open(f'result{rank}.json', 'w') as f:
        json.dump(out, f)
    distributed.shutdown()
''')


@pytest.mark.slow
def test_two_processes_under_torchrun(tmp_path):
    script = tmp_path / 'worker.py'
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count('PRINT0-MARKER') == 1
    results = [json.loads((tmp_path / f'result{rank}.json').read_text()) for rank in range(2)]
    for rank, out in enumerate(results):
        assert (out['rank'], out['world'], out['local_rank']) == (rank, 2, rank)
        assert out['backend'] == 'gloo' and out['device'] == 'cpu'
        assert out['sum'] == [3.0, 6.0]
        assert out['strided_sum'] == [[0.0, 9.0], [3.0, 12.0], [6.0, 15.0]]
        assert out['broadcast'] == [11.0, 11.0, 11.0]
        assert out['gathered'] == [{'rank': 0}, {'rank': 1}]
        assert out['object'] == 'from 0'
    assert results[0]['inconsistent'] is None
    assert 'Linear.bias' in results[1]['inconsistent'] and 'rank 1' in results[1]['inconsistent']
