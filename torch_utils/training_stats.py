"""Scalar training statistics gathered across devices and processes (after EDM's `training_stats.py`).

`report(name, value)` adds the count, sum and sum of squares of the elements of `value` to a float64
accumulator kept on the value's device. A `Collector` turns the accumulators into mean / std / count
over the interval since its previous `update()`, summing the moments of all processes (through
`torch_utils.distributed`) when there is more than one. Moments are kept in float64 throughout
(EDM reduces the elements in float32), so means and stds match a float64 recomputation.
"""

import math
import re
from typing import Dict, List

import numpy as np
import torch

from dnnlib.util import EasyDict

from . import distributed

_num_moments = 3  # [count, sum(x), sum(x**2)]
_counter_dtype = torch.float64

_counters: Dict[str, Dict[torch.device, torch.Tensor]] = {}  # name -> device -> cumulative moments.


def report(name: str, value):
    """Accumulate the elements of `value` (a number, sequence or tensor of any shape) under `name`.

    Returns `value` unchanged, so it can wrap an expression. An empty value registers the name
    with count 0, which keeps the set of names identical on every process.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f'Statistic name must be a non-empty string, got {name!r}')
    if isinstance(value, torch.Tensor):
        elems = value.detach().flatten().to(_counter_dtype)
    else:
        elems = torch.as_tensor(np.asarray(value, dtype=np.float64).ravel(), dtype=_counter_dtype)
    moments = torch.stack([
        torch.tensor(float(elems.numel()), dtype=_counter_dtype, device=elems.device),
        elems.sum(),
        elems.square().sum(),
    ])
    per_device = _counters.setdefault(name, {})
    if elems.device not in per_device:
        per_device[elems.device] = torch.zeros(_num_moments, dtype=_counter_dtype, device=elems.device)
    per_device[elems.device].add_(moments)
    return value


def report0(name: str, value):
    """Like `report`, but only rank 0's values count (other ranks register the name with count 0)."""
    report(name, value if distributed.get_rank() == 0 else [])
    return value


def _local_moments(name: str) -> torch.Tensor:
    """Cumulative moments of `name` in this process, summed over its devices, as CPU float64."""
    total = torch.zeros(_num_moments, dtype=_counter_dtype)
    for counter in _counters.get(name, {}).values():
        total.add_(counter.cpu())
    return total


class Collector:
    """Mean / std / count of reported statistics over the interval between two `update()` calls.

    `regex` selects the names to collect (full match). With `keep_previous=True` a name that was not
    reported in the latest interval keeps the values of the interval before; otherwise it reads count 0
    and mean/std nan. With several processes, `update()` is a collective: every process calls it at the
    same point, and the moments of all processes are summed.
    """

    def __init__(self, regex: str = '.*', keep_previous: bool = True):
        self._regex = re.compile(regex)
        self._keep_previous = keep_previous
        # Local cumulative moments at the previous update; intervals are local deltas, summed over ranks.
        self._baseline: Dict[str, torch.Tensor] = {name: _local_moments(name) for name in self.names()}
        self._moments: Dict[str, torch.Tensor] = {}

    def names(self) -> List[str]:
        """Sorted names reported so far in this process that match the regex."""
        return sorted(name for name in _counters if self._regex.fullmatch(name))

    def update(self) -> None:
        """Collect the moments reported since the previous update (or since construction)."""
        names = self.names()
        if distributed.get_world_size() > 1:
            # One sorted list on every rank, so that a name reported by only some ranks cannot desynchronise the reduce.
            names = sorted(set().union(*distributed.all_gather_object(names)))
        if not names:
            return
        deltas = []
        for name in names:
            total = _local_moments(name)
            deltas.append(total - self._baseline.get(name, torch.zeros_like(total)))
            self._baseline[name] = total
        stacked = torch.stack(deltas)  # [len(names), 3]
        if distributed.get_world_size() > 1:
            stacked = distributed.all_reduce_sum(stacked.to(distributed.sync_device())).cpu()
        for name, delta in zip(names, stacked):
            if self._keep_previous and delta[0] == 0 and name in self._moments:
                continue
            self._moments[name] = delta

    def _get(self, name: str) -> torch.Tensor:
        return self._moments.get(name, torch.zeros(_num_moments, dtype=_counter_dtype))

    def num(self, name: str) -> int:
        """Number of scalars reported under `name` in the interval."""
        return int(self._get(name)[0])

    def mean(self, name: str) -> float:
        """Mean of the scalars reported under `name` (nan when there were none)."""
        count, total, _ = self._get(name).tolist()
        return total / count if count > 0 else math.nan

    def std(self, name: str) -> float:
        """Population standard deviation sqrt(max(E[x^2] - mean^2, 0)) (nan when there were none)."""
        count, total, total_sq = self._get(name).tolist()
        if count == 0:
            return math.nan
        mean = total / count
        return math.sqrt(max(total_sq / count - mean ** 2, 0.0))

    def as_dict(self) -> Dict[str, EasyDict]:
        """{name: EasyDict(num, mean, std)} for every collected name (e.g. one line of stats.jsonl)."""
        return {name: EasyDict(num=self.num(name), mean=self.mean(name), std=self.std(name))
                for name in sorted(self._moments)}

    def __getitem__(self, name: str) -> float:
        return self.mean(name)


default_collector = Collector()
