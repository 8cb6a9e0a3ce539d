"""PyTorch plumbing: seeds, a resumable infinite data sampler, per-sample random generators, parameter copying
and checks, module summaries (after EDM's `torch_utils/misc.py`)."""

import contextlib
import os
import re
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import distributed

# ----------------------------------------------------------------------------
# Option parsing.


def parse_int_list(s: Union[str, int, Iterable[int]]) -> List[int]:
    """Parse '1,2,5-10' into [1, 2, 5, 6, 7, 8, 9, 10] (inclusive ranges); lists of ints pass through."""
    if isinstance(s, (int, np.integer)) and not isinstance(s, bool):
        return [int(s)]
    if not isinstance(s, str):
        items = list(s)
        if not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in items):
            raise ValueError(f'Expected a list of integers, got {items!r}')
        return [int(x) for x in items]
    result = []
    for part in s.split(','):
        part = part.strip()
        match = re.fullmatch(r'(\d+)\s*-\s*(\d+)', part)
        if match:
            lo, hi = int(match.group(1)), int(match.group(2))
            if lo > hi:
                raise ValueError(f'Range {part!r} in {s!r} is empty; write the smaller number first, e.g. "{hi}-{lo}"')
            result.extend(range(lo, hi + 1))
        elif re.fullmatch(r'-?\d+', part):
            result.append(int(part))
        else:
            raise ValueError(f'Cannot parse {part!r} in {s!r}; expected a list like "1,2,5-10"')
    return result


# ----------------------------------------------------------------------------
# Data sampling.


def _rng_state_to_dict(rng: np.random.RandomState) -> dict:
    state = rng.get_state(legacy=False)
    return dict(key=[int(k) for k in state['state']['key']], pos=int(state['state']['pos']),
                has_gauss=int(state['has_gauss']), gauss=float(state['gauss']))


def _rng_from_dict(state: dict) -> np.random.RandomState:
    rng = np.random.RandomState()
    rng.set_state(dict(bit_generator='MT19937', state=dict(key=np.asarray(state['key'], dtype=np.uint32),
                  pos=int(state['pos'])), has_gauss=int(state['has_gauss']), gauss=float(state['gauss'])))
    return rng


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless, rank-sharded, windowed-shuffle stream of dataset indices that can be resumed exactly.

    The walk (EDM's InfiniteSampler): `order` is a permutation of range(N) drawn with
    `np.random.RandomState(seed)`; at global position i = 0, 1, 2, ... the item `order[i % N]` belongs to
    rank `i % num_replicas`; after each position, `order[i % N]` is swapped with
    `order[(i - randint(window)) % N]`, window = rint(window_size * N) (no swaps without shuffle or
    when window < 2). Every rank walks the same global stream, so the stream does not depend on
    `rank`/`num_replicas` and a run can be resumed with another number of processes.

    Iterating continues from the current position; a new `iter()` does not restart the stream.
    With `yield_positions=True` the sampler yields `(dataset_index, position)` tuples, which the
    dataset receives as keys; `position` is unique across ranks and tells the training loop what it
    has actually consumed, since a DataLoader draws indices ahead of use. `state_dict(position)`
    then gives the state just before `position` (normally: last consumed position + 1), and
    `load_state_dict` continues the stream from there exactly as if it had never stopped.

    Random offsets are drawn in blocks of `_block_size` positions; the offsets of the last
    `_history_blocks` blocks (and the generator state before each) are kept, so the state at a
    recent position costs one undo pass over them. Older positions are recomputed by replaying the
    walk from the seed, O(position) time.
    """

    _block_size = 4096
    _history_blocks = 64

    def __init__(self, dataset, rank: int = 0, num_replicas: int = 1, shuffle: bool = True, seed: int = 0,
                 window_size: float = 0.5, start_position: int = 0, yield_positions: bool = False):
        num_items = len(dataset)
        if num_items <= 0:
            raise ValueError('InfiniteSampler needs a non-empty dataset')
        if num_replicas < 1:
            raise ValueError(f'num_replicas must be >= 1, got {num_replicas}')
        if not 0 <= rank < num_replicas:
            raise ValueError(f'rank must be in [0, num_replicas={num_replicas}), got {rank}')
        if not 0 <= window_size <= 1:
            raise ValueError(f'window_size must be in [0, 1], got {window_size}')
        if start_position < 0:
            raise ValueError(f'start_position must be >= 0, got {start_position}')
        super().__init__()
        self.dataset = dataset
        self.num_items = num_items
        self.rank = rank
        self.num_replicas = num_replicas
        self.shuffle = shuffle
        self.seed = int(seed)
        self.window_size = window_size
        self.yield_positions = yield_positions
        self.window = int(np.rint(num_items * window_size)) if shuffle else 0
        self._reset()
        if start_position > 0:
            self._advance_to(start_position)

    # The walk. State: position (next global position), order, rng (before the block of `position`),
    # and the offsets of the blocks seen recently.

    def _reset(self) -> None:
        """Start of the walk: position 0, seeded permutation, no blocks drawn yet."""
        self._position = 0
        self._order = np.arange(self.num_items, dtype=np.int64)
        self._rng = np.random.RandomState(self.seed) if self.shuffle else None
        if self._rng is not None:
            self._rng.shuffle(self._order)
        self._history: Dict[int, Tuple[dict, np.ndarray]] = {}  # block -> (rng state before it, offsets).

    def _swaps(self) -> bool:
        return self.window >= 2

    def _block_offsets(self, block: int) -> np.ndarray:
        """Offsets of `block`, drawing the next block from the generator when needed."""
        entry = self._history.get(block)
        if entry is None:
            state_before = _rng_state_to_dict(self._rng)
            offsets = self._rng.randint(self.window, size=self._block_size)
            entry = (state_before, offsets)
            self._history[block] = entry
            for old in [b for b in self._history if b <= block - self._history_blocks]:
                del self._history[old]
        return entry[1]

    def _step(self) -> int:
        """Return the dataset index at the current position, then apply its swap and advance."""
        i = self._position
        n = self.num_items
        index = int(self._order[i % n])
        if self._swaps():
            offset = self._block_offsets(i // self._block_size)[i % self._block_size]
            a, b = i % n, (i - offset) % n
            self._order[a], self._order[b] = self._order[b], self._order[a]
        self._position = i + 1
        return index

    def _advance_to(self, position: int) -> None:
        """Walk forward to `position` without yielding (vectorised draws, plain-list swaps)."""
        if position < self._position:
            raise ValueError(f'Cannot advance backwards from {self._position} to {position}')
        if not self._swaps():
            self._position = position
            return
        n, size = self.num_items, self._block_size
        order = self._order.tolist()
        i = self._position
        while i < position:
            block = i // size
            offsets = self._block_offsets(block).tolist()
            stop = min(position, (block + 1) * size)
            for j in range(i, stop):
                a, b = j % n, (j - offsets[j - block * size]) % n
                order[a], order[b] = order[b], order[a]
            i = stop
        self._order = np.asarray(order, dtype=np.int64)
        self._position = position

    def __iter__(self) -> Iterator[Union[int, Tuple[int, int]]]:
        while True:
            position = self._position
            index = self._step()
            if position % self.num_replicas == self.rank:
                yield (index, position) if self.yield_positions else index

    @property
    def position(self) -> int:
        """Global position of the next item the walk will produce."""
        return self._position

    def state_dict(self, position: Optional[int] = None) -> dict:
        """Plain-Python state (loadable with `torch.load(weights_only=True)`) at `position`.

        `position=None` means the current position. An earlier position, typically the position
        after the last item the consumer used, gives the state the sampler had there; a later one the
        state the walk will have there (in multi-process training a rank's walk may not yet have
        produced the positions that belong to the other ranks).
        """
        if position is None:
            position = self._position
        if position < 0:
            raise ValueError(f'state_dict(position={position}) needs a position >= 0')
        if position > self._position:
            ahead = InfiniteSampler(range(self.num_items), shuffle=self.shuffle, seed=self.seed,
                                    window_size=self.window_size)
            ahead.load_state_dict(self.state_dict())
            ahead._advance_to(position)
            return ahead.state_dict()
        order, rng_state = self._state_at(position)
        return dict(position=int(position), order=order.tolist(), rng=rng_state, seed=self.seed,
                    num_items=self.num_items, shuffle=self.shuffle, window=self.window)

    def _state_at(self, position: int) -> Tuple[np.ndarray, Optional[dict]]:
        """(order, rng state before the block of `position`) when the walk was at `position`."""
        if not self._swaps():
            return self._order.copy(), None
        size = self._block_size
        block = position // size
        if position == self._position and block not in self._history:
            return self._order.copy(), _rng_state_to_dict(self._rng)
        first_kept = min(self._history) if self._history else self._position // size
        if block < first_kept or (position < self._position and (self._position - 1) // size not in self._history):
            replay = InfiniteSampler(range(self.num_items), shuffle=True, seed=self.seed,
                                     window_size=self.window_size, start_position=position)
            return replay._state_at(position)
        # Undo the swaps of positions position..self._position-1, newest first (each swap is its own inverse).
        order = self._order.tolist()
        n = self.num_items
        for i in range(self._position - 1, position - 1, -1):
            offset = int(self._history[i // size][1][i % size])
            a, b = i % n, (i - offset) % n
            order[a], order[b] = order[b], order[a]
        return np.asarray(order, dtype=np.int64), self._history[block][0]

    def load_state_dict(self, state: Mapping) -> None:
        """Continue the walk from a `state_dict()` (of this or another sampler over the same data)."""
        expected = dict(seed=self.seed, num_items=self.num_items, shuffle=self.shuffle, window=self.window)
        for key, value in expected.items():
            if key not in state:
                raise ValueError(f'Sampler state has no {key!r}; expected the dict returned by InfiniteSampler.state_dict()')
            if state[key] != value:
                raise ValueError(f'Sampler state has {key}={state[key]!r}, but this sampler has {key}={value!r}; '
                                 f'construct the sampler with the settings of the run being resumed')
        order = np.asarray(state['order'], dtype=np.int64)
        if order.shape != (self.num_items,) or not np.array_equal(np.sort(order), np.arange(self.num_items)):
            raise ValueError('Sampler state has an order that is not a permutation of the dataset indices')
        position = int(state['position'])
        self._position = position
        self._order = order
        self._history = {}
        if self._swaps():
            self._rng = _rng_from_dict(state['rng'])
            if position % self._block_size != 0:
                self._block_offsets(position // self._block_size)  # Redraw the block `position` is in.


# Seeds: every random stream of the project is keyed by a hash of integers (run seed, rank, sample position,
# stream tag, ...), never by the global RNG, so a draw does not depend on what ran before it.

def seed_hash(*entropy: int, spawn_key: Sequence[int] = ()) -> int:
    """A 63-bit seed from numpy's SeedSequence hash of the integers (and an optional spawn key)."""
    sequence = np.random.SeedSequence([int(e) % 2**63 for e in entropy], spawn_key=tuple(spawn_key))
    return int(sequence.generate_state(2, dtype=np.uint64)[0]) % 2**63


def seeded_generator(*entropy: int, spawn_key: Sequence[int] = (), device=None) -> torch.Generator:
    """A torch generator (CPU unless `device`) seeded by `seed_hash(*entropy, spawn_key=spawn_key)`."""
    return torch.Generator(device if device is not None else 'cpu').manual_seed(seed_hash(*entropy, spawn_key=spawn_key))


# Per-sample randomness: a single generator draws a whole batch; a list of generators draws sample i
# from generator i alone, so a sample does not depend on the batch it is in.

def resolve_device(generator, device):
    if device is not None:
        return torch.device(device)
    if isinstance(generator, (list, tuple)):
        generator = generator[0]
    return generator.device if generator is not None else torch.device('cpu')


def per_sample(draw, n, generator, device):
    """Run `draw(count, generator, draw_device) -> [count, ...]` for a batch of `n` samples.

    One generator (or None) draws the whole batch in one call; a list of `n` generators draws sample i
    from generator i alone, so each sample equals its own single draw whatever batch it is in.
    The result is put on `device` (default: the generator's device, else CPU).
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != n:
            raise ValueError(f'generator is a list of {len(generator)} items for a batch of {n}; pass exactly '
                             f'one torch.Generator per sample, a single generator, or None')
        if not all(isinstance(g, torch.Generator) for g in generator):
            raise ValueError('generator list holds an item that is not a torch.Generator; pass one per sample')
        device = resolve_device(generator, device)
        return torch.cat([draw(1, g, g.device).to(device) for g in generator])
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f'generator={generator!r} is invalid; pass a torch.Generator, a list of them, or None')
    device = resolve_device(generator, device)
    draw_device = generator.device if generator is not None else device
    return draw(n, generator, draw_device).to(device)


def rand(shape, generator, device):
    """U[0, 1) of `shape` [N, ...] (float32), per sample; see `per_sample`."""
    return per_sample(lambda n, g, d: torch.rand((n, *shape[1:]), generator=g, device=d), shape[0], generator, device)


def randn(shape, generator, device):
    """N(0, 1) of `shape` [N, ...] (float32), per sample; see `per_sample`."""
    return per_sample(lambda n, g, d: torch.randn((n, *shape[1:]), generator=g, device=d), shape[0], generator, device)


def randint(high, n, generator, device):
    """Uniform integers in {0..high-1} of shape [n] (int64), per sample; see `per_sample`."""
    return per_sample(lambda m, g, d: torch.randint(0, high, (m,), generator=g, device=d), n, generator, device)



class StackedRandomGenerator:
    """One `torch.Generator` per sample seed; draws are stacked along dim 0 (EDM's generate.py).

    Sample s gets the same values whatever batch it is in and whichever process draws it.
    `device=None` means CPU.
    """

    def __init__(self, device, seeds: Sequence[int]):
        self.device = torch.device(device) if device is not None else torch.device('cpu')
        self.seeds = [int(seed) for seed in seeds]
        if not self.seeds:
            raise ValueError('StackedRandomGenerator needs at least one seed')
        self.generators = [torch.Generator(self.device).manual_seed(seed % (1 << 32)) for seed in self.seeds]

    def _check_size(self, size) -> Tuple[int, ...]:
        size = tuple(size)
        if not size or size[0] != len(self.generators):
            raise ValueError(f'size {size} must start with the number of seeds ({len(self.generators)})')
        return size

    def randn(self, size, **kwargs) -> torch.Tensor:
        """Standard normal draws of shape `size` (size[0] == number of seeds)."""
        size = self._check_size(size)
        kwargs.setdefault('device', self.device)
        return torch.stack([torch.randn(size[1:], generator=gen, **kwargs) for gen in self.generators])

    def randn_like(self, input: torch.Tensor) -> torch.Tensor:
        """`randn` with the shape, dtype and device of `input`."""
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def rand(self, size, **kwargs) -> torch.Tensor:
        """Uniform [0, 1) draws of shape `size` (size[0] == number of seeds)."""
        size = self._check_size(size)
        kwargs.setdefault('device', self.device)
        return torch.stack([torch.rand(size[1:], generator=gen, **kwargs) for gen in self.generators])

    def randint(self, *args, size, **kwargs) -> torch.Tensor:
        """Integer draws as `torch.randint(low=0, high, size)` of shape `size` (size[0] == number of seeds)."""
        size = self._check_size(size)
        kwargs.setdefault('device', self.device)
        return torch.stack([torch.randint(*args, size=size[1:], generator=gen, **kwargs) for gen in self.generators])

    def bernoulli(self, probs: torch.Tensor) -> torch.Tensor:
        """0/1 draws with per-element probabilities `probs` (probs.shape[0] == number of seeds)."""
        probs = torch.as_tensor(probs, device=self.device)
        self._check_size(probs.shape)
        return torch.stack([torch.bernoulli(p, generator=gen) for p, gen in zip(probs, self.generators)])


# ----------------------------------------------------------------------------
# Parameters and buffers.

WRAPPER_PREFIXES = ('module.', '_orig_mod.')


def unwrapped_name(name: str) -> str:
    # DDP adds 'module.' and torch.compile adds '_orig_mod.'; matching by name must see through both.
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        if isinstance(module, torch.nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, '_orig_mod'):
            module = module._orig_mod
        else:
            return module


def named_params_and_buffers(module: torch.nn.Module) -> List[Tuple[str, torch.Tensor]]:
    """(name, tensor) for all parameters followed by all buffers of `module`."""
    return list(module.named_parameters()) + list(module.named_buffers())


@torch.no_grad()
def copy_params_and_buffers(src_module: Union[torch.nn.Module, Mapping[str, torch.Tensor]],
                            dst_module: torch.nn.Module, require_all: bool = False) -> List[str]:
    """Copy parameters and buffers by name from a module or a state dict into `dst_module`.

    Names are compared without DDP ('module.') and torch.compile ('_orig_mod.') prefixes. A tensor
    present in both with different shapes is an error; with `require_all`, so is a destination
    tensor missing from the source. Returns the destination names that were copied.
    """
    if isinstance(src_module, torch.nn.Module):
        src_tensors = dict(named_params_and_buffers(src_module))
    elif isinstance(src_module, Mapping):
        src_tensors = dict(src_module)
    else:
        raise TypeError(f'copy_params_and_buffers: source must be a Module or a state dict, got {type(src_module).__name__}')
    src_tensors = {unwrapped_name(name): tensor for name, tensor in src_tensors.items()}
    copied, missing = [], []
    for name, tensor in named_params_and_buffers(dst_module):
        key = unwrapped_name(name)
        if key not in src_tensors:
            missing.append(name)
            continue
        src = src_tensors[key]
        if not isinstance(src, torch.Tensor):
            raise TypeError(f'Source entry {key!r} is a {type(src).__name__}, not a tensor')
        if src.shape != tensor.shape:
            raise ValueError(f'Shape mismatch for {name!r}: source {tuple(src.shape)}, destination {tuple(tensor.shape)}')
        tensor.copy_(src.detach())
        copied.append(name)
    if require_all and missing:
        raise ValueError(f'Source has no tensor for {len(missing)} destination tensor(s): {", ".join(missing[:10])}'
                         + (' ...' if len(missing) > 10 else ''))
    return copied


@contextlib.contextmanager
def ddp_sync(module: torch.nn.Module, sync: bool):
    """Context in which a DDP module skips gradient all-reduce when `sync` is False (gradient accumulation)."""
    if not sync and isinstance(module, torch.nn.parallel.DistributedDataParallel):
        with module.no_sync():
            yield
    else:
        yield


@torch.no_grad()
def check_ddp_consistency(module: torch.nn.Module, ignore_regex: Optional[str] = None) -> None:
    """Raise if any parameter or buffer differs from rank 0's copy (nan equals nan). No-op in one process."""
    for name, tensor in named_params_and_buffers(module):
        fullname = f'{type(module).__name__}.{name}'
        if ignore_regex is not None and re.fullmatch(ignore_regex, fullname):
            continue
        tensor = tensor.detach()
        reference = distributed.broadcast(tensor.clone(), src=0)
        same = tensor == reference
        if tensor.is_floating_point() or tensor.is_complex():
            same |= torch.isnan(tensor) & torch.isnan(reference)
        if not bool(same.all()):
            raise RuntimeError(f'{fullname} on rank {distributed.get_rank()} differs from rank 0')


# ----------------------------------------------------------------------------
# Summaries and determinism.


def _flatten_tensors(obj) -> List[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _flatten_tensors(item)]
    if isinstance(obj, Mapping):
        return [t for item in obj.values() for t in _flatten_tensors(item)]
    return []


@torch.no_grad()
def print_module_summary(module: torch.nn.Module, inputs: Sequence, max_nesting: int = 3,
                         skip_redundant: bool = True, file=None):
    """Run `module(*inputs)` once and print a table of submodules: parameters, buffers, output shape, dtype.

    Submodules deeper than `max_nesting` are folded into their parents; with `skip_redundant`, rows
    with no parameters, no buffers and the same output as another row are dropped. Returns the outputs.
    """
    if not isinstance(module, torch.nn.Module) or isinstance(inputs, torch.Tensor):
        raise TypeError('print_module_summary(module, inputs): inputs is a sequence of positional arguments')
    entries = []
    nesting = [0]

    def pre_hook(_mod, _inputs):
        nesting[0] += 1

    def post_hook(mod, _inputs, outputs):
        nesting[0] -= 1
        if nesting[0] <= max_nesting:
            entries.append((mod, _flatten_tensors(outputs)))

    handles = []
    for mod in module.modules():
        handles.append(mod.register_forward_pre_hook(pre_hook))
        handles.append(mod.register_forward_hook(post_hook))
    try:
        outputs = module(*inputs)
    finally:
        for handle in handles:
            handle.remove()

    # Each tensor is counted once, by the first (innermost) module that finished using it.
    seen = set()
    names = {mod: name for name, mod in module.named_modules()}
    rows = [['Name', 'Parameters', 'Buffers', 'Output shape', 'Datatype'], ['---'] * 5]
    total_params = total_buffers = 0
    for mod, outs in entries:
        params = [t for t in mod.parameters() if id(t) not in seen]
        buffers = [t for t in mod.buffers() if id(t) not in seen]
        seen.update(id(t) for t in params + buffers)
        new_outputs = [t for t in outs if id(t) not in seen]
        seen.update(id(t) for t in outs)
        if skip_redundant and mod is not module and not params and not buffers and not new_outputs:
            continue
        num_params = sum(t.numel() for t in params)
        num_buffers = sum(t.numel() for t in buffers)
        total_params += num_params
        total_buffers += num_buffers
        shown = new_outputs or outs or [None]
        name = names.get(mod, '?') or '<top-level>'
        for k, out in enumerate(shown):
            rows.append([
                (name if k == 0 else '') + (f':{k}' if len(shown) > 1 else ''),
                (str(num_params) if num_params else '-') if k == 0 else '',
                (str(num_buffers) if num_buffers else '-') if k == 0 else '',
                str(list(out.shape)) if out is not None else '-',
                str(out.dtype).split('.')[-1] if out is not None else '-',
            ])
    rows += [['---'] * 5, ['Total', str(total_params), str(total_buffers), '', '']]
    widths = [max(len(row[c]) for row in rows) for c in range(5)]
    print(file=file)
    for row in rows:
        print('  '.join(cell + ' ' * (w - len(cell)) for cell, w in zip(row, widths)).rstrip(), file=file)
    print(file=file)
    return outputs


def set_deterministic(enabled: bool = True) -> None:
    """Ask PyTorch for deterministic kernels (errors on ops without one) and turn off cuDNN autotuning.

    This changes process-wide settings; call it once at start-up. On CUDA, deterministic cuBLAS also
    needs CUBLAS_WORKSPACE_CONFIG, set here if unset (it must be set before the first cuBLAS call).
    """
    if enabled:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled
