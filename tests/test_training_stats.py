"""Tests for torch_utils/training_stats.py against float64 NumPy recomputation, single and two processes."""

import json
import math
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from torch_utils import training_stats

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _varied_reports(rng, count):
    """Values of many kinds and shapes, each with the float64 numbers it stands for."""
    reports = []
    for k in range(count):
        kind = k % 5
        if kind == 0:
            value = float(rng.normal(3.0, 2.0))
        elif kind == 1:
            value = rng.normal(-1.0, 0.5, size=int(rng.integers(1, 6))).tolist()
        elif kind == 2:
            value = torch.from_numpy(rng.normal(10.0, 3.0, size=(2, 3, 4))).float()
        elif kind == 3:
            value = torch.tensor(int(rng.integers(-5, 5)))
        else:
            value = torch.from_numpy(rng.uniform(0, 1, size=(int(rng.integers(0, 4)),)))  # Possibly empty.
        numbers = torch.as_tensor(value).double().flatten().numpy() if isinstance(value, torch.Tensor) \
            else np.asarray(value, dtype=np.float64).ravel()
        reports.append((value, numbers))
    return reports


def test_mean_std_match_numpy():
    rng = np.random.default_rng(0)
    collector = training_stats.Collector(regex='numpy_check/.*')
    reports = _varied_reports(rng, 400)
    for value, _ in reports:
        assert training_stats.report('numpy_check/x', value) is value
    collector.update()
    expected = np.concatenate([numbers for _, numbers in reports])
    assert collector.num('numpy_check/x') == expected.size
    assert collector.mean('numpy_check/x') == pytest.approx(expected.mean(), rel=1e-12)
    assert collector.std('numpy_check/x') == pytest.approx(expected.std(), rel=1e-10)
    assert collector['numpy_check/x'] == collector.mean('numpy_check/x')
    stats = collector.as_dict()['numpy_check/x']
    assert (stats.num, stats.mean, stats.std) == (collector.num('numpy_check/x'), collector.mean('numpy_check/x'),
                                                  collector.std('numpy_check/x'))


def test_constant_values_have_zero_std():
    collector = training_stats.Collector(regex='constant/.*')
    for _ in range(100):
        training_stats.report('constant/x', torch.full([7], 0.1))
    collector.update()
    # E[x^2] - mean^2 cancels to rounding level (never negative, never nan).
    assert 0.0 <= collector.std('constant/x') < 1e-7
    assert collector.mean('constant/x') == pytest.approx(float(torch.tensor(0.1)), rel=1e-12)


def test_intervals_are_deltas_and_keep_previous():
    keep = training_stats.Collector(regex='delta/.*', keep_previous=True)
    fresh = training_stats.Collector(regex='delta/.*', keep_previous=False)
    training_stats.report('delta/a', [1.0, 2.0, 3.0])
    keep.update()
    fresh.update()
    assert keep.num('delta/a') == 3 and keep.mean('delta/a') == 2.0
    assert keep.std('delta/a') == pytest.approx(math.sqrt(2 / 3), rel=1e-12)

    training_stats.report('delta/a', [10.0, 20.0])
    keep.update()
    fresh.update()
    for collector in (keep, fresh):
        assert collector.num('delta/a') == 2 and collector.mean('delta/a') == 15.0 and collector.std('delta/a') == 5.0

    keep.update()  # Nothing reported in this interval.
    fresh.update()
    assert keep.num('delta/a') == 2 and keep.mean('delta/a') == 15.0
    assert fresh.num('delta/a') == 0 and math.isnan(fresh.mean('delta/a')) and math.isnan(fresh.std('delta/a'))


def test_collector_starts_at_construction():
    training_stats.report('start/x', [100.0] * 10)
    collector = training_stats.Collector(regex='start/.*')
    training_stats.report('start/x', [1.0, 3.0])
    collector.update()
    assert collector.num('start/x') == 2 and collector.mean('start/x') == 2.0


def test_regex_filter_and_unknown_names():
    collector = training_stats.Collector(regex='filter/loss.*')
    training_stats.report('filter/loss', 1.0)
    training_stats.report('filter/loss_test', 2.0)
    training_stats.report('filter/time', 3.0)
    collector.update()
    assert collector.names() == ['filter/loss', 'filter/loss_test']
    assert sorted(collector.as_dict()) == ['filter/loss', 'filter/loss_test']
    assert collector.num('filter/time') == 0 and math.isnan(collector.mean('filter/time'))


def test_report0_counts_only_rank0(monkeypatch):
    collector = training_stats.Collector(regex='rank0/.*')
    training_stats.report0('rank0/x', 5.0)
    with monkeypatch.context() as m:  # as rank 1 would
        m.setattr(training_stats.distributed, 'get_rank', lambda: 1)
        assert training_stats.report0('rank0/x', 7.0) == 7.0
        training_stats.report0('rank0/only_other_ranks', 1.0)
    collector.update()
    assert collector.num('rank0/x') == 1 and collector.mean('rank0/x') == 5.0
    assert 'rank0/only_other_ranks' in collector.names() and collector.num('rank0/only_other_ranks') == 0


def test_report_rejects_bad_names():
    with pytest.raises(ValueError, match='non-empty string'):
        training_stats.report('', 1.0)


WORKER = textwrap.dedent('''
    import json, math
    import torch
    from torch_utils import distributed, training_stats

    distributed.init()
    rank = distributed.get_rank()
    collector = training_stats.Collector(regex='mp/.*', keep_previous=False)
    values = torch.arange(rank * 10, rank * 10 + 5 + rank, dtype=torch.float64)  # Ranks report different counts.
    training_stats.report('mp/x', values)
    if rank == 1:
        training_stats.report('mp/only_rank1', [4.0, 6.0])  # A name the other rank never reports.
    training_stats.report0('mp/r0', float(rank + 1))
    collector.update()
    with open(f'result{rank}.json', 'w') as f:
        json.dump({k: dict(v) for k, v in collector.as_dict().items()}, f)
    distributed.shutdown()
''')


@pytest.mark.slow
def test_two_processes_sum_moments(tmp_path):
    script = tmp_path / 'worker.py'
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS='1')
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = [json.loads((tmp_path / f'result{rank}.json').read_text()) for rank in range(2)]
    everything = np.concatenate([np.arange(0, 5), np.arange(10, 16)]).astype(np.float64)
    for stats in results:
        assert stats['mp/x']['num'] == everything.size
        assert stats['mp/x']['mean'] == pytest.approx(everything.mean(), rel=1e-12)
        assert stats['mp/x']['std'] == pytest.approx(everything.std(), rel=1e-12)
        assert stats['mp/only_rank1'] == {'num': 2, 'mean': 5.0, 'std': 1.0}
        assert stats['mp/r0'] == {'num': 1, 'mean': 1.0, 'std': 0.0}
