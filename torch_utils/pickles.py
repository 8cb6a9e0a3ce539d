"""Reading pickles without running their code (the original's and EDM's network snapshots).

`RestrictedUnpickler` builds tensors (on the CPU, whatever device they were saved from), OrderedDicts, sets,
numpy scalars and primitives; every other global becomes an inert `PickledObject` that records its name and
arguments and never runs anything. `training/snapshots.py` rebuilds networks from those records.
`unsafe_load` is the opt-in exception: it runs the source code that EDM's "persistent" objects embed
(EDM `torch_utils/persistence.py`), for trusted files only.
"""

import hashlib
import io
import os
import pickle
import sys
import types
import warnings
from collections import OrderedDict
from typing import Mapping

import numpy as np
import torch

import dnnlib

PERSISTENT_RECONSTRUCT = 'torch_utils.persistence._reconstruct_persistent_obj'
UNSAFE_FLAG = '--allow_unsafe_pickle'

# Storage classes of torch's legacy serialization (torch.<Name>Storage, or torch.cuda.<Name>Storage
# in old versions) and the dtype of their elements.
_STORAGE_DTYPES = {
    'DoubleStorage': torch.float64, 'FloatStorage': torch.float32, 'HalfStorage': torch.float16,
    'BFloat16Storage': torch.bfloat16, 'LongStorage': torch.int64, 'IntStorage': torch.int32,
    'ShortStorage': torch.int16, 'CharStorage': torch.int8, 'ByteStorage': torch.uint8, 'BoolStorage': torch.bool,
    'ComplexFloatStorage': torch.complex64, 'ComplexDoubleStorage': torch.complex128, 'UntypedStorage': torch.uint8,
}

# ----------------------------------------------------------------------------
# Restricted unpickling.


class PickledObject:
    """Inert stand-in for an object the pickle would have built by calling code (a class or a function).

    `pickled_global` is the dotted name of that code, `pickled_args` the arguments it would have been
    called with and `pickled_state` what would have been passed to `__setstate__`. Nothing is called.
    """
    pickled_global = '?'

    def __new__(cls, *args, **kwargs):
        # Pickles create objects either by calling the class (REDUCE) or through __new__ (NEWOBJ).
        obj = super().__new__(cls)
        obj.pickled_args = args
        obj.pickled_kwargs = kwargs
        obj.pickled_state = None
        obj.pickled_items = []
        return obj

    def __setstate__(self, state):
        self.pickled_state = state

    # Containers (list / dict subclasses) are filled through these during unpickling.
    def append(self, item):
        self.pickled_items.append(item)

    def extend(self, items):
        self.pickled_items.extend(items)

    def __setitem__(self, key, value):
        self.pickled_items.append((key, value))

    @property
    def persistent_meta(self):
        """The meta dict of an EDM persistent object (class_name, module_src, state), else None."""
        if self.pickled_global == PERSISTENT_RECONSTRUCT and len(self.pickled_args) == 1 \
                and isinstance(self.pickled_args[0], Mapping):
            return self.pickled_args[0]
        return None

    @property
    def class_name(self):
        """Name of the class this object was an instance of, as far as the pickle tells."""
        meta = self.persistent_meta
        if meta is not None:
            return str(meta.get('class_name'))
        if self.pickled_global == 'copyreg._reconstructor' and self.pickled_args:
            return getattr(self.pickled_args[0], 'pickled_global', '?')
        return self.pickled_global

    @property
    def state(self):
        """The object's attribute dict as pickled (for modules: _parameters, _buffers, _modules, ...)."""
        meta = self.persistent_meta
        return meta.get('state') if meta is not None else self.pickled_state

    def __repr__(self):
        return f'<inert {self.class_name} from a pickle>'


class _FlatStorage:
    """The elements of one tensor storage, as a 1-D CPU tensor."""

    def __init__(self, data):
        self.data = data


def _load_storage_bytes(data):
    """Replacement for `torch.storage._load_from_bytes`: parse torch's legacy format, on the CPU.

    Layout (torch.serialization legacy save): pickles of the magic number, the protocol version and
    sys_info, a pickle of the storage as a persistent id ('storage', type, key, location, numel,
    view_metadata), a pickle of the list of keys, then per key an int64 element count and the raw bytes.
    The `location` tag (e.g. 'cuda:0') is ignored: the bytes are read into CPU memory.
    """
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError(f'tensor storage must be bytes, got {type(data).__name__}')
    f = io.BytesIO(data)
    records = {}

    class StorageUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if module in ('torch', 'torch.cuda') and name in _STORAGE_DTYPES:
                return _STORAGE_DTYPES[name]
            raise pickle.UnpicklingError(f'unexpected global {module}.{name} inside a tensor storage')

        def persistent_load(self, pid):
            if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == 'storage'):
                raise pickle.UnpicklingError(f'unexpected persistent id {pid!r} inside a tensor storage')
            dtype, key, numel = pid[1], str(pid[2]), int(pid[4])
            if len(pid) == 6 and pid[5] is not None:
                raise pickle.UnpicklingError('storage views (torch < 1.0 pickles) are not supported')
            records.setdefault(key, (dtype, numel))
            return key

    load = lambda: StorageUnpickler(f).load()
    magic = load()
    load()  # the protocol version
    sys_info = load()
    if magic != 0x1950a86a20f9469cfc6c:
        raise pickle.UnpicklingError('tensor storage bytes lack torch\'s magic number')
    if isinstance(sys_info, dict) and not sys_info.get('little_endian', True):
        raise pickle.UnpicklingError('big-endian tensor storages are not supported')
    key = load()
    keys = load()
    storages = {}
    for k in keys:
        dtype, numel = records[str(k)]
        count = int.from_bytes(f.read(8), 'little', signed=True)
        itemsize = torch.empty((), dtype=dtype).element_size()
        raw = f.read(count * itemsize)
        if count != numel or len(raw) != count * itemsize:
            raise pickle.UnpicklingError(f'truncated tensor storage: {numel} elements expected, '
                                         f'{len(raw) // itemsize} found')
        storages[str(k)] = torch.frombuffer(bytearray(raw), dtype=dtype) if count else torch.empty(0, dtype=dtype)
    return _FlatStorage(storages[key])


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Replacement for `torch._utils._rebuild_tensor_v2`: a CPU tensor viewing `storage`, copied out."""
    if not isinstance(storage, _FlatStorage):
        raise pickle.UnpicklingError(f'tensor built from a {type(storage).__name__} instead of a storage')
    if metadata:
        raise pickle.UnpicklingError(f'tensor metadata {metadata!r} is not supported')
    size, stride = [int(s) for s in size], [int(s) for s in stride]
    return torch.as_strided(storage.data, size, stride, int(storage_offset)).clone()


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """Replacement for `torch._utils._rebuild_parameter(_with_state)`: the plain tensor."""
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError(f'parameter built from a {type(data).__name__} instead of a tensor')
    return data


def _codecs_encode(text, encoding='utf-8'):
    """`_codecs.encode` as protocol-2 pickles use it to store bytes (str -> bytes only)."""
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1', 'utf-8', 'utf8'):
        raise pickle.UnpicklingError(f'unexpected _codecs.encode({type(text).__name__}, {encoding!r})')
    return text.encode(encoding)


def _numpy_scalar(dtype, data=None):
    """`numpy.core.multiarray.scalar` for plain (non-object) dtypes."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError(f'unsupported numpy scalar of dtype {dtype!r}')
    return np.frombuffer(data, dtype=dtype)[0]


_SAFE_GLOBALS = {
    ('collections', 'OrderedDict'): OrderedDict,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('builtins', 'bytearray'): bytearray,
    ('_codecs', 'encode'): _codecs_encode,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('torch.storage', '_load_from_bytes'): _load_storage_bytes,
    ('dnnlib.util', 'EasyDict'): dnnlib.EasyDict,
    ('dnnlib', 'EasyDict'): dnnlib.EasyDict,
    ('numpy', 'dtype'): np.dtype,
    ('numpy.core.multiarray', 'scalar'): _numpy_scalar,
    ('numpy._core.multiarray', 'scalar'): _numpy_scalar,
}
_TENSOR_LOADERS = {key: _SAFE_GLOBALS[key] for key in [('torch._utils', '_rebuild_tensor_v2'),
                                                         ('torch.storage', '_load_from_bytes')]}
_PY2_MODULES = {'__builtin__': 'builtins', 'copy_reg': 'copyreg'}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that runs no code from the file: known data types are built, any other global is inert.

    Tensors are rebuilt by our own parser of torch's storage format, always on the CPU.
    """

    def __init__(self, file):
        super().__init__(file)
        self._inert_classes = {}

    def find_class(self, module, name):
        module = _PY2_MODULES.get(module, module)
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        key = f'{module}.{name}'
        if key not in self._inert_classes:
            self._inert_classes[key] = type(name, (PickledObject,), dict(pickled_global=key))
        return self._inert_classes[key]


def restricted_load(file):
    """Unpickle a binary file object with `RestrictedUnpickler` (no code from the file runs)."""
    return RestrictedUnpickler(file).load()


def unsafe_load(file, path):
    """Unpickle a binary file object running the source code its persistent objects embed (EDM/StyleGAN
    `torch_utils.persistence`); trusted files only. Tensors still land on the CPU."""
    warnings.warn(f'{path}: running the source code embedded in the pickle ({UNSAFE_FLAG})', stacklevel=3)
    shim = types.ModuleType('torch_utils.persistence')
    shim.persistent_class = lambda cls: cls  # the embedded source decorates its classes with it
    shim.is_persistent = lambda obj: False
    shim.import_hook = lambda hook: hook
    modules = {}

    def reconstruct(meta):
        src = meta['module_src']
        name = '_pickled_module_' + hashlib.sha1(src.encode()).hexdigest()[:16]
        if name not in modules:
            module = types.ModuleType(name)
            sys.modules[name] = module
            exec(compile(src, f'<source embedded in {os.path.basename(str(path))}>', 'exec'), module.__dict__)
            modules[name] = module
        cls = modules[name].__dict__[meta['class_name']]
        obj = cls.__new__(cls)
        state = dnnlib.EasyDict(meta['state']) if isinstance(meta['state'], dict) else meta['state']
        if callable(getattr(obj, '__setstate__', None)):
            obj.__setstate__(state)
        else:
            obj.__dict__.update(state)
        return obj

    class UnsafeUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if f'{module}.{name}' == PERSISTENT_RECONSTRUCT:
                return reconstruct
            if (module, name) in _TENSOR_LOADERS:  # ours: CUDA-saved tensors land on the CPU
                return _TENSOR_LOADERS[(module, name)]
            return super().find_class(module, name)

    import torch_utils
    saved = sys.modules.get(shim.__name__), getattr(torch_utils, 'persistence', None)
    sys.modules[shim.__name__], torch_utils.persistence = shim, shim
    try:
        return UnsafeUnpickler(file).load()
    finally:
        if saved[0] is None:
            del sys.modules[shim.__name__]
        else:
            sys.modules[shim.__name__] = saved[0]
        if saved[1] is None:
            del torch_utils.persistence
        else:
            torch_utils.persistence = saved[1]
