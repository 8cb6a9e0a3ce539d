"""The σ-first sampler of noisy and low-quality data (SPEC §3; ambient-utils' `AmbientSampler` semantics).

Every training image is trusted only at some noise levels: image i may be used at σ iff
σ > σ_min,i · b or σ < σ_max,i, with b = sqrt(1 + 1/(s_max − 1)) (b = 1 without s_max; b caps the ambient
factor σ_t⁴/(σ_t² − σ_tn²)² below s_max² for images admitted through the high-noise branch). So σ is drawn
first, from the loss's training distribution, and then the next admissible image is taken: σ is not redrawn
when a candidate is refused, so the σ marginal is exactly the training distribution.

The walk: a global stream of positions 0, 1, 2, ...; at position p, σ_p is drawn from a generator keyed by
(seed, p) and the candidates are the images of a per-epoch seeded permutation, scanned from where the
previous position stopped (a refused candidate is skipped for the rest of that epoch, as in the reference).
Rank r of W processes yields the positions p with p % W == r, and every rank walks the whole stream, so the
items of a position do not depend on the number of processes. The walk's state at any position is
(position, epoch, cursor): no random-generator state, so a resume continues exactly. Unlike the reference,
every epoch has its own permutation, σ travels with the item (the sampler yields (index, position, σ) keys,
which the dataset returns in `noise_info`), and a σ with no admissible image is an error at start-up, not
an endless loop.
"""

import math

import numpy as np
import torch

from torch_utils.misc import seed_hash, seeded_generator

# Seed-stream tags of the σ draws and the epoch permutations.
_TAG_SIGMA, _TAG_EPOCH = 8, 9
_CHECKPOINT_EVERY = 1024  # the walk's state is remembered every this many positions


class NoAdmissibleImage(ValueError):
    """Some noise level of the training distribution has no training image that may be used at it."""


def admissibility_buffer(s_max=None):
    """b = sqrt(1 + 1/(s_max − 1)) for `s_max` > 1, 1 without one."""
    if s_max is None:
        return 1.0
    if not s_max > 1:
        raise ValueError(f's_max={s_max} must be > 1 (it caps σ_t²/(σ_t² − σ_tn²) of the high-noise branch)')
    return math.sqrt(1 + 1 / (s_max - 1))


def admissible(sigma, sigma_min, sigma_max, buffer=1.0):
    """Whether an image annotated (σ_min, σ_max) may be used at σ: σ > σ_min·b or σ < σ_max (array-friendly)."""
    return np.logical_or(np.greater(sigma, np.multiply(sigma_min, buffer)), np.less(sigma, sigma_max))


def uncovered_interval(levels, buffer=1.0, support=(0.0, math.inf)):
    """The noise levels (lo, hi) of `support` at which no image of `levels` ([N, 2] (σ_min, σ_max)) may be used,
    or None. σ is refused by every image iff max σ_max ≤ σ ≤ min σ_min·b."""
    levels = np.asarray(levels, dtype=np.float64)
    lo = max(float(levels[:, 1].max()), support[0])
    hi = min(float((levels[:, 0] * buffer).min()), support[1])
    return (lo, hi) if hi > lo else None


def check_coverage(levels, buffer, support, describe=''):
    """Fail with one line when an interval of noise levels of the training distribution has no admissible image."""
    gap = uncovered_interval(levels, buffer, support)
    if gap is not None:
        raise NoAdmissibleImage(f'no training image{describe} may be used at noise levels σ in ({gap[0]:.4g}, {gap[1]:.4g}), '
                                'which the training σ distribution draws: every annotation there is refused '
                                '(σ ≤ sigma_min·b and σ ≥ sigma_max); add clean images, lower sigma_min, or drop --s_max')


class SigmaFirstSampler(torch.utils.data.Sampler):
    """Endless, rank-sharded stream of (dataset index, position, σ) keys: σ first, then the next admissible image.

    `levels`: float64 [N, 2] (σ_min, σ_max) per dataset index; `draw_sigma(generator) -> float` draws one σ of
    the training distribution; `support`: the (lo, hi) noise levels it can draw, for the start-up check.
    """

    def __init__(self, levels, draw_sigma, rank=0, num_replicas=1, seed=0, shuffle=True, s_max=None,
                 support=(0.0, math.inf), start_position=0):
        levels = np.asarray(levels, dtype=np.float64)
        if levels.ndim != 2 or levels.shape[1] != 2 or levels.shape[0] == 0:
            raise ValueError('SigmaFirstSampler needs the (sigma_min, sigma_max) of at least one image, shape [N, 2]')
        if not 0 <= rank < num_replicas:
            raise ValueError(f'rank must be in [0, num_replicas={num_replicas}), got {rank}')
        super().__init__()
        self.levels, self.draw_sigma = levels, draw_sigma
        self.rank, self.num_replicas, self.seed, self.shuffle = rank, num_replicas, int(seed), bool(shuffle)
        self.s_max, self.buffer = s_max, admissibility_buffer(s_max)
        self.num_items = levels.shape[0]
        self._high, self._low = (levels[:, 0] * self.buffer).tolist(), levels[:, 1].tolist()
        check_coverage(levels, self.buffer, support)
        self._perm_cache = (None, None)
        self._checkpoints = {0: (0, 0)}  # position -> (epoch, cursor) before it
        self._position, self._epoch, self._cursor = 0, 0, 0
        if start_position:
            self._seek(start_position)

    # The walk.

    def _permutation(self, epoch):
        if self._perm_cache[0] != epoch:
            if self.shuffle:
                rng = np.random.RandomState(seed_hash(_TAG_EPOCH, self.seed, epoch) % (1 << 31))
                perm = rng.permutation(self.num_items)
            else:
                perm = np.arange(self.num_items)
            self._perm_cache = (epoch, perm)
        return self._perm_cache[1]

    def sigma_at(self, position):
        """σ of a global position (a function of the seed and the position alone)."""
        return float(self.draw_sigma(seeded_generator(_TAG_SIGMA, self.seed, position)))

    def _step(self):
        """(dataset index, σ) at the current position; advances the walk."""
        sigma = self.sigma_at(self._position)
        high, low = self._high, self._low
        # The rest of this epoch and all of the next one: every image is a candidate at least once.
        for _ in range(2 * self.num_items):
            index = int(self._permutation(self._epoch)[self._cursor])
            self._cursor += 1
            if self._cursor == self.num_items:
                self._epoch, self._cursor = self._epoch + 1, 0
            if sigma > high[index] or sigma < low[index]:
                break
        else:
            raise NoAdmissibleImage(f'no training image may be used at σ = {sigma:.4g} (position {self._position}): '
                                    'add clean images or lower sigma_min')
        self._position += 1
        if self._position % _CHECKPOINT_EVERY == 0:
            self._checkpoints[self._position] = (self._epoch, self._cursor)
        return index, sigma

    def _seek(self, position):
        """Put the walk at `position` (replayed from the nearest remembered state at or before it)."""
        if position < 0:
            raise ValueError(f'position must be >= 0, got {position}')
        if position < self._position or position - self._position > _CHECKPOINT_EVERY:
            earlier = [p for p in self._checkpoints if p <= position]
            if not earlier:
                raise ValueError(f'the sampler cannot go back to position {position}: it started at {min(self._checkpoints)}')
            start = max(earlier)
            if not start <= self._position <= position:
                self._position, (self._epoch, self._cursor) = start, self._checkpoints[start]
        while self._position < position:
            self._step()

    def __iter__(self):
        while True:
            position = self._position
            index, sigma = self._step()
            if position % self.num_replicas == self.rank:
                yield index, position, sigma

    @property
    def position(self):
        return self._position

    def state_dict(self, position=None):
        """The walk's state just before global `position` (default: the current one), plain Python."""
        position = self._position if position is None else int(position)
        here = (self._position, self._epoch, self._cursor)
        self._seek(position)
        state = dict(kind='sigma_first', position=self._position, epoch=self._epoch, cursor=self._cursor,
                     seed=self.seed, num_items=self.num_items, shuffle=self.shuffle, s_max=self.s_max)
        if here[0] != position:
            self._seek(here[0])
        assert (self._position, self._epoch, self._cursor) == here
        return state

    def load_state_dict(self, state):
        if state.get('kind') != 'sigma_first':
            raise ValueError('the training state holds the data order of another sampler (plain EDM sampling), not the '
                             'σ-first sampler of noisy data: resume with the run\'s own --precond')
        for key in ('seed', 'num_items', 'shuffle', 's_max'):
            if state[key] != getattr(self, key):
                raise ValueError(f'the sampler state has {key}={state[key]!r}, this run {getattr(self, key)!r}: resume '
                                 'with the settings of the run')
        self._position, self._epoch, self._cursor = int(state['position']), int(state['epoch']), int(state['cursor'])
        self._checkpoints = {self._position: (self._epoch, self._cursor)}
