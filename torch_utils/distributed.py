"""Process-group set-up and collectives; the only module of the project that touches `torch.distributed`.

Works with or without `torchrun` (after EDM's `torch_utils/distributed.py`): a single process never
creates a process group, and every collective below is then a no-op or the identity. Under torchrun
(WORLD_SIZE > 1) the backend is NCCL when CUDA is available and gloo otherwise.
"""

import atexit
import contextlib
import os
from typing import Any, List, Optional

import torch
import torch.distributed as dist

_state = dict(initialized=False, rank=0, world_size=1, local_rank=0, backend=None)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, '')
    if value == '':
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f'Environment variable {name}={value!r} must be an integer') from None


def init(backend: Optional[str] = None) -> None:
    """Join the process group described by RANK / WORLD_SIZE / LOCAL_RANK (as set by torchrun).

    WORLD_SIZE unset or 1: no process group (no port is needed). WORLD_SIZE > 1: `env://` initialisation,
    MASTER_ADDR / MASTER_PORT default to localhost:29500, backend `backend` or else nccl with CUDA and
    gloo without; with CUDA the current device is set to LOCAL_RANK. Calling it again does nothing.
    """
    if _state['initialized']:
        return
    rank = _env_int('RANK', 0)
    world_size = _env_int('WORLD_SIZE', 1)
    local_rank = _env_int('LOCAL_RANK', 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f'Invalid RANK={rank} / WORLD_SIZE={world_size}: need 0 <= RANK < WORLD_SIZE')
    if backend not in (None, 'nccl', 'gloo'):
        raise ValueError(f"backend must be None (automatic), 'nccl' or 'gloo', got {backend!r}")

    if world_size > 1:
        use_cuda = torch.cuda.is_available()
        backend = backend or ('nccl' if use_cuda else 'gloo')
        if backend == 'nccl' and not use_cuda:
            raise ValueError("backend='nccl' needs CUDA; use backend='gloo' on CPU")
        os.environ.setdefault('MASTER_ADDR', 'localhost')
        os.environ.setdefault('MASTER_PORT', '29500')
        if use_cuda:
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, init_method='env://', rank=rank, world_size=world_size)
            # Tear the group down before the interpreter does: gloo's threads destroyed mid-exit abort the process.
            atexit.register(_destroy)
    _state.update(initialized=True, rank=rank, world_size=world_size, local_rank=local_rank,
                  backend=backend if world_size > 1 else None)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def sync_device() -> Optional[torch.device]:
    """Where tensors must be for collectives: this rank's CUDA device with NCCL, the CPU with gloo, None alone."""
    if not _distributed():
        return None
    return torch.device('cuda', _state['local_rank']) if _state['backend'] == 'nccl' else torch.device('cpu')


def is_initialized() -> bool:
    """True once `init()` has run (whether or not a process group was needed)."""
    return _state['initialized']


def _distributed() -> bool:
    return _state['world_size'] > 1 and dist.is_initialized()


def get_rank() -> int:
    """Global rank of this process (0 before `init()` and in single-process runs)."""
    return _state['rank']


def get_world_size() -> int:
    """Number of processes (1 before `init()` and in single-process runs)."""
    return _state['world_size']


def get_local_rank() -> int:
    """Rank of this process on its machine (selects the CUDA device)."""
    return _state['local_rank']


def get_backend() -> Optional[str]:
    """'nccl', 'gloo', or None when there is no process group."""
    return _state['backend']


def device() -> torch.device:
    """This process's compute device: cuda:LOCAL_RANK when CUDA is available, else CPU."""
    if torch.cuda.is_available():
        return torch.device('cuda', get_local_rank())
    return torch.device('cpu')


def barrier() -> None:
    """Wait for all processes (no-op in a single process)."""
    if _distributed():
        dist.barrier()


@contextlib.contextmanager
def rank0_first():
    """Rank 0 runs the block before the other processes do (e.g. to fill a download cache they then read).
    Rank 0 releases the others even when its block fails, so they fail on their own instead of waiting."""
    if get_rank() != 0:
        barrier()
    try:
        yield
    finally:
        if get_rank() == 0:
            barrier()


def print0(*args, **kwargs) -> None:
    """`print` on rank 0 only."""
    if get_rank() == 0:
        print(*args, **kwargs)


def _comm_device() -> torch.device:
    # NCCL moves CUDA tensors only and gloo is used here for CPU tensors only.
    return torch.device('cuda', get_local_rank()) if get_backend() == 'nccl' else torch.device('cpu')


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all processes, in place; returns it. Identity in a single process."""
    if _distributed():
        buffer = tensor if tensor.device == _comm_device() and tensor.is_contiguous() else tensor.to(_comm_device()).contiguous()
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        if buffer is not tensor:
            tensor.copy_(buffer)
    return tensor


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite `tensor` with rank `src`'s copy, in place; returns it. Identity in a single process."""
    if not 0 <= src < get_world_size():
        raise ValueError(f'broadcast src={src} is not a rank of a world of size {get_world_size()}')
    if _distributed():
        buffer = tensor if tensor.device == _comm_device() and tensor.is_contiguous() else tensor.to(_comm_device()).contiguous()
        dist.broadcast(buffer, src=src)
        if buffer is not tensor:
            tensor.copy_(buffer)
    return tensor


def all_gather_object(obj: Any) -> List[Any]:
    """List of every process's (picklable) `obj`, indexed by rank; `[obj]` in a single process."""
    if not _distributed():
        return [obj]
    gathered: List[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s (picklable) `obj` on every process; `obj` itself in a single process."""
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    """Leave the process group (if any) and return to the uninitialised single-process state."""
    if _distributed():
        dist.destroy_process_group()
    _state.update(initialized=False, rank=0, world_size=1, local_rank=0, backend=None)
