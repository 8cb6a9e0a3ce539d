"""Finding and loading trained networks: our snapshots, the original's pickles and EDM's pickles.

Formats (detected from the file's content, not its name):
- ours: `network-snapshot-*.pt`, a `torch.save` dict of plain data (`torch.load(weights_only=True)`).
- original (Daras et al. 2023, giannisdaras/ambient-diffusion): `network-snapshot-{kimg:06d}.pkl`, a plain
  pickle of dict(ema=<state dict, keys maybe prefixed '_orig_mod.'/'module.', CUDA tensors>, loss_fn=,
  augment_pipe=, dataset_kwargs=). The architecture is not in the file: the network is rebuilt from the
  run's `training_options.json`.
- edm (Karras et al. 2022): a pickle whose `ema` is a module object; its classes are "persistent" (the
  pickle embeds their source code, EDM `torch_utils/persistence.py`).

Pickles are read with `RestrictedUnpickler`: it builds tensors (on the CPU, whatever device they were
saved from), OrderedDicts, sets, numpy scalars and primitives; every other global becomes an inert
`PickledObject` that records its name and arguments and never runs anything. Module pickles are then
rebuilt from that record (the persistent objects' constructor arguments and tensors) into our own
classes, so EDM's networks load without running their embedded code. Only a module pickle whose
classes we do not have needs `allow_unsafe_pickle=True`, which executes the embedded source.
"""

import hashlib
import io
import json
import os
import pickle
import re
import sys
import types
import warnings
from collections import OrderedDict
from typing import List, Mapping, Optional, Tuple

import numpy as np
import torch

import dnnlib
from torch_utils.misc import unwrapped_name

SNAPSHOT_RE = re.compile(r'^network-snapshot-(\d+(?:\.\d+)?)\.(pt|pkl)$')
PERSISTENT_RECONSTRUCT = 'torch_utils.persistence._reconstruct_persistent_obj'
PRECONDS = ('EDMPrecond', 'VPPrecond', 'VEPrecond', 'iDDPMPrecond')
MODELS = ('SongUNet', 'DhariwalUNet')
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
    magic, _protocol, sys_info = load(), load(), load()
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


# ----------------------------------------------------------------------------
# Finding snapshots.


def snapshot_nimg(path) -> Optional[int]:
    """Training images seen, from a snapshot name (`{kimg:06d}` or `{kimg:010.3f}` tag), else None."""
    match = SNAPSHOT_RE.match(os.path.basename(str(path)))
    return round(float(match.group(1)) * 1000) if match else None


def list_snapshots(path) -> List[Tuple[Optional[int], str]]:
    """Snapshots of a run directory as [(nimg, path)] sorted by nimg; a single file gives [(nimg or None, path)].

    Recognises our `network-snapshot-*.pt` and the original's / EDM's `network-snapshot-*.pkl`.
    """
    path = os.fspath(path)
    if dnnlib.util.is_url(path):
        return [(snapshot_nimg(path), path)]
    if os.path.isfile(path):
        return [(snapshot_nimg(path), path)]
    if not os.path.isdir(path):
        raise FileNotFoundError(f'--network={path}: no such file or directory')
    found = [(snapshot_nimg(name), os.path.join(path, name)) for name in os.listdir(path) if SNAPSHOT_RE.match(name)]
    return sorted(found, key=lambda item: (item[0], item[1]))


def resolve_networks(network, latest=False) -> List[str]:
    """Snapshots to evaluate for a `--network` value: a file or URL -> [it]; a run directory -> all of
    its snapshots in training order, or only the newest with `latest=True`."""
    snapshots = list_snapshots(network)
    if not snapshots:
        raise FileNotFoundError(f'--network={network}: the directory holds no network-snapshot-*.pt or *.pkl files')
    paths = [path for _, path in snapshots]
    return paths[-1:] if latest else paths


# ----------------------------------------------------------------------------
# Loading.


def load_network(path, device='cpu', training_options=None, allow_unsafe_pickle=False):
    """Load a snapshot as (network in eval mode without gradients, info).

    path: a snapshot file (ours, the original's or EDM's) or URL.
    training_options: for the original's `.pkl` snapshots, the run's training_options.json (a path or
        the loaded dict); default: the file next to the snapshot.
    allow_unsafe_pickle: allow running the source code embedded in a module pickle whose classes we
        cannot rebuild ourselves (trusted files only).
    info (EasyDict): format ('ours' | 'original' | 'edm'), path, nimg and kimg (None if unknown), ambient
        (input is [Ã ⊙ x, Ã]), corruption (dict of corruption_pattern, corruption_probability,
        delta_probability, mask_full_rgb; None for EDM), label_dim, resolution, channels (C of the image),
        network_kwargs (what the network was built from).
    """
    local = dnnlib.util.open_url(path, return_filename=True)
    with open(local, 'rb') as f:
        head = f.read(4)
    if head.startswith(b'PK'):  # torch.save's zip format
        net, info = _load_ours(local)
    elif head[:1] == b'\x80':  # a pickle (protocol >= 2)
        with open(local, 'rb') as f:
            data = restricted_load(f)
        net, info = _load_pickle(data, path, local, training_options, allow_unsafe_pickle)
    else:
        raise ValueError(f'{path} is neither a torch.save snapshot nor a pickle')
    info.path = str(path)
    if info.nimg is None:
        info.nimg = snapshot_nimg(path)
    info.kimg = info.nimg / 1000 if info.nimg is not None else None
    net = net.eval().requires_grad_(False).to(torch.device(device if device is not None else 'cpu'))
    return net, info


def _info(**kwargs):
    return dnnlib.EasyDict(dict(format=None, path=None, nimg=None, kimg=None, ambient=False, corruption=None,
                                label_dim=0, resolution=None, channels=None, network_kwargs=None), **kwargs)


def _corruption_info(kwargs, pattern_key):
    keys = ('corruption_probability', 'delta_probability', 'mask_full_rgb')
    if kwargs is None or pattern_key not in kwargs:
        return None
    return dict(corruption_pattern=kwargs[pattern_key], **{k: kwargs[k] for k in keys if k in kwargs})


def _load_ours(path):
    from training.training_loop import load_snapshot  # The snapshot format belongs to the training loop.
    net, snapshot = load_snapshot(path)
    kw = snapshot['network_kwargs']
    ambient = bool(kw.get('ambient', False))
    info = _info(format='ours', nimg=snapshot.get('nimg'), ambient=ambient, label_dim=kw.get('label_dim', 0),
                 corruption=_corruption_info(snapshot.get('corruption'), 'pattern'), network_kwargs=kw,
                 resolution=kw.get('img_resolution'), channels=kw['img_channels'] // (2 if ambient else 1))
    return net, info


def _load_pickle(data, path, local, training_options, allow_unsafe_pickle):
    if not isinstance(data, Mapping) or 'ema' not in data:
        raise ValueError(f'{path} is a pickle but not a network snapshot (expected a dict with an "ema" entry)')
    ema = data['ema']
    if isinstance(ema, Mapping):
        if training_options is None:
            training_options = os.path.join(os.path.dirname(os.path.abspath(local)), 'training_options.json')
            if dnnlib.util.is_url(path) or not os.path.isfile(training_options):
                raise ValueError(f'{path} holds only weights (an original ambient-diffusion snapshot); rebuilding the '
                                 f'network needs the run\'s training_options.json: put it next to the snapshot '
                                 f'({training_options}) or pass its path with --training_options')
        return _load_original(ema, data.get('dataset_kwargs'), training_options, path)
    if isinstance(ema, PickledObject):
        try:
            return _rebuild_module_pickle(ema, path)
        except _NotRebuildable as err:
            if not allow_unsafe_pickle:
                raise ValueError(f'{path} stores the network as code ({err}); loading it would run that code. '
                                 f'Pass {UNSAFE_FLAG} only if you trust the file') from None
        return _load_unsafe(local, path)
    raise ValueError(f'{path}: "ema" is a {type(ema).__name__}, neither a state dict nor a module')


# ----------------------------------------------------------------------------
# The original's snapshots: weights + training_options.json.


def _state_dict(tensors, path):
    sd = OrderedDict()
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f'{path}: state dict entry {key!r} is a {type(value).__name__}, not a tensor')
        sd[unwrapped_name(str(key))] = value
    return sd


def _original_network_kwargs(options, sd, dataset_kwargs, path):
    """Our constructor kwargs for the original's network: its network_kwargs, img_channels = out_channels
    = 2C, ambient, the double-sigmoid gate, and the sizes that only the weights record."""
    kw = dict(options.get('network_kwargs') or {})
    class_name = kw.pop('class_name', None)
    precond = str(class_name).rsplit('.', 1)[-1]
    if precond not in PRECONDS:
        raise ValueError(f'training_options.json: network_kwargs.class_name={class_name!r}; expected '
                         f'training.networks.<{"|".join(PRECONDS)}>')
    kw['class_name'] = f'training.networks.{precond}'
    gated = kw.pop('gated', True)  # the original's default
    if 'gate' not in kw:  # options written in our style name the gate directly
        kw['gate'] = 'double_sigmoid' if gated else 'none'
    conv_in = [k for k in sd if re.fullmatch(r'model\.enc\.(\d+)x\1_conv\.weight', k)]
    if not conv_in:
        raise ValueError(f'{path}: no model.enc.<R>x<R>_conv.weight in the state dict; is it a SongUNet/DhariwalUNet?')
    kw['img_channels'] = kw['out_channels'] = int(sd[conv_in[0]].shape[1])  # [image, mask] in, 2C out
    kw['ambient'] = True
    resolution = dataset_kwargs.get('resolution')
    kw['img_resolution'] = int(resolution) if resolution else int(conv_in[0].split('.')[2].split('x')[0])
    # The number of classes is not in the options: the label embedding's weight is [emb, label_dim].
    labels = dataset_kwargs.get('use_labels', False) and 'model.map_label.weight' in sd
    kw['label_dim'] = int(sd['model.map_label.weight'].shape[1]) if labels else 0
    if 'model.map_augment.weight' in sd:
        kw['augment_dim'] = int(sd['model.map_augment.weight'].shape[1])
    return kw


def _load_original(tensors, pickled_dataset_kwargs, training_options, path):
    if isinstance(training_options, Mapping):
        options = training_options
    else:
        with open(training_options, 'r') as f:
            options = json.load(f)
    dataset_kwargs = dict(pickled_dataset_kwargs or {}) if isinstance(pickled_dataset_kwargs, Mapping) else {}
    dataset_kwargs.update(options.get('dataset_kwargs') or {})
    sd = _state_dict(tensors, path)
    kw = _original_network_kwargs(options, sd, dataset_kwargs, path)
    try:
        net = dnnlib.util.construct_class_by_name(**kw)
    except TypeError as err:
        raise ValueError(f'training_options.json: network_kwargs do not fit our {kw["class_name"]}: {err}') from None
    strict_load(net, sd, path)
    info = _info(format='original', ambient=True, label_dim=kw['label_dim'], resolution=kw['img_resolution'],
                 channels=kw['img_channels'] // 2, corruption=_corruption_info(dataset_kwargs, 'corruption_pattern'),
                 network_kwargs=kw)
    return net, info


def strict_load(net, sd, path='state dict'):
    """`net.load_state_dict(sd, strict=True)` with an error that lists the differing keys and the
    architecture options that probably explain them."""
    own = net.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f'{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}' for k in own
                  if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        show = lambda keys: ', '.join(keys[:8]) + (f' ... ({len(keys)} in all)' if len(keys) > 8 else '')
        parts = [f'{label}: {show(keys)}' for label, keys in
                 (('missing', missing), ('unexpected', unexpected), ('shape file vs network', mismatched)) if keys]
        hints = _architecture_hints(missing + unexpected + mismatched)
        raise ValueError(f'{path} does not fit the network built from its options ({"; ".join(parts)}). '
                         f'Options that probably differ: {", ".join(hints)}')
    net.load_state_dict(sd, strict=True)


def _architecture_hints(keys):
    rules = [
        (lambda k: 'gate_weight' in k, 'gated (the original: gated=True, double sigmoid)'),
        (lambda k: 'map_augment' in k, 'augment_dim (augmentation on or off)'),
        (lambda k: 'map_label' in k, 'label_dim (dataset_kwargs.use_labels)'),
        (lambda k: 'map_noise' in k, 'embedding_type'),
        (lambda k: '.aux_' in k, 'encoder_type / decoder_type (ddpmpp vs ncsnpp)'),
        (lambda k: re.search(r'\.(qkv|proj|norm2)\.', k), 'attn_resolutions'),
        (lambda k: re.search(r'_block\d+\.', k), 'num_blocks'),
        (lambda k: re.search(r'\.\d+x\d+_(conv|down|up|in0|in1)', k), 'img_resolution / channel_mult (levels)'),
        (lambda k: ' vs ' in k, 'model_channels / channel_mult / channel counts'),
    ]
    hints = [hint for test, hint in rules if any(test(k) for k in keys)]
    return hints or ['model_type']


# ----------------------------------------------------------------------------
# Module pickles (EDM): rebuilt from the inert record, or executed when allowed.


class _NotRebuildable(Exception):
    """A module pickle whose classes or arguments we cannot map to our networks."""


def _module_tensors(obj, prefix, out):
    """Parameters and persistent buffers of an inert module tree, by their state-dict names."""
    state = obj.state if isinstance(obj, PickledObject) else None
    if not isinstance(state, Mapping):
        raise _NotRebuildable(f'{prefix or "the network"} has no pickled module state')
    skip = set(state.get('_non_persistent_buffers_set') or ())
    for group in ('_parameters', '_buffers'):
        for name, tensor in (state.get(group) or {}).items():
            if tensor is None or name in skip:
                continue
            if not isinstance(tensor, torch.Tensor):
                raise _NotRebuildable(f'{prefix}{name} is a {type(tensor).__name__}, not a tensor')
            out[prefix + name] = tensor
    for name, child in (state.get('_modules') or {}).items():
        if child is not None:
            _module_tensors(child, f'{prefix}{name}.', out)
    return out


def _rebuild_module_pickle(ema, path):
    """Our network equivalent to a pickled EDM (or original) preconditioner module, from its recorded
    constructor arguments and tensors; nothing from the pickle is executed."""
    precond = ema.class_name
    state = ema.state if isinstance(ema.state, Mapping) else {}
    model = (state.get('_modules') or {}).get('model')
    model_type = model.class_name if isinstance(model, PickledObject) else None
    if precond not in PRECONDS or model_type not in MODELS:
        raise _NotRebuildable(f'classes {precond}/{model_type} are not among ours: {", ".join(PRECONDS)} with '
                              f'{" or ".join(MODELS)}')
    init_args, init_kwargs = state.get('_init_args'), state.get('_init_kwargs')
    if init_args or not isinstance(init_kwargs, Mapping):
        raise _NotRebuildable('the pickle does not record the constructor arguments by name')
    sd = _state_dict(_module_tensors(ema, '', OrderedDict()), path)
    kw = dict(init_kwargs, class_name=f'training.networks.{precond}', model_type=model_type)
    # The original's networks (gated convolutions, [image, mask] input) vs EDM's plain ones.
    ambient = 'gated' in kw or any(k.endswith('gate_weight') for k in sd)
    kw.pop('gated', None)
    kw['gate'] = 'double_sigmoid' if any(k.endswith('gate_weight') for k in sd) else 'none'
    if ambient:
        kw.update(ambient=True, out_channels=kw['img_channels'])
    try:
        net = dnnlib.util.construct_class_by_name(**kw)
    except (TypeError, ValueError) as err:
        raise _NotRebuildable(f'our {precond} does not accept its arguments: {err}') from None
    strict_load(net, sd, path)
    channels = kw['img_channels'] // (2 if ambient else 1)
    info = _info(format='original' if ambient else 'edm', ambient=ambient, label_dim=kw.get('label_dim', 0),
                 resolution=kw.get('img_resolution'), channels=channels, network_kwargs=kw)
    return net, info


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


def _load_unsafe(local, path):
    """A module pickle loaded by running its embedded source (`unsafe_load`); returns (net, info)."""
    with open(local, 'rb') as f:
        data = unsafe_load(f, path)
    net = data['ema']
    if not isinstance(net, torch.nn.Module):
        raise ValueError(f'{path}: "ema" unpickled to a {type(net).__name__}, not a torch module')
    info = _info(format='edm', label_dim=getattr(net, 'label_dim', 0), resolution=getattr(net, 'img_resolution', None),
                 channels=getattr(net, 'img_channels', None))
    return net, info
