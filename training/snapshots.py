"""The snapshot format: network snapshots and training states, written and read, ours and foreign.

Ours (written by the training loop, read with `torch.load(weights_only=True)`, plain data only):
- `network-snapshot-{kimg}.pt`: dict(format=SNAPSHOT_FORMAT, version, ema=<state dict>, network_kwargs,
  loss_kwargs, augment_kwargs, dataset_kwargs, corruption, nimg).
- `training-state-{kimg}.pt`: dict(format=STATE_FORMAT, version, net, ema, optimizer, sampler, rng, cur_nimg,
  cur_tick, config), everything a resume needs.
The kimg tag is EDM's `{kimg:06d}` for whole kimg, `{kimg:010.3f}` otherwise.

Foreign (read only, detected from the content, not the name; pickles go through `torch_utils.pickles`, so
no code in them runs):
- the original's (Daras et al. 2023) `network-snapshot-{kimg:06d}.pkl`: dict(ema=<state dict, keys maybe
  prefixed '_orig_mod.'/'module.', CUDA tensors>, loss_fn=, augment_pipe=, dataset_kwargs=). The architecture
  is not in the file: the network is rebuilt from the run's `training_options.json`.
- EDM's (Karras et al. 2022) pickles, whose `ema` is a module object of "persistent" classes: rebuilt into our
  classes from the recorded constructor arguments and tensors; only classes we do not have need
  `--allow_unsafe_pickle`, which runs the source the pickle embeds.

Every network any of these files names is built by `build_network`, from an allow-list of our classes: a class
name read from a file never chooses what code runs.
"""

import json
import os
import re
from collections import OrderedDict
from typing import List, Mapping, Optional, Tuple

import torch

import dnnlib
from dnnlib.util import atomic_write
from torch_utils.misc import unwrap, unwrapped_name
from torch_utils.pickles import UNSAFE_FLAG, PickledObject, restricted_load, unsafe_load

SNAPSHOT_FORMAT = 'ambient-diffusion-snapshot'
STATE_FORMAT = 'ambient-diffusion-training-state'
FORMAT_VERSION = 1
SNAPSHOT_RE = re.compile(r'^network-snapshot-(\d+(?:\.\d+)?)\.(pt|pkl)$')
PRECONDS = ('EDMPrecond', 'VPPrecond', 'VEPrecond', 'iDDPMPrecond', 'DDPMPrecond', 'VDMPrecond')
MODELS = ('SongUNet', 'DhariwalUNet')

# The only classes a snapshot, a training state, training_options.json or a pickle may ask us to build: a class
# name read from a file would otherwise choose what code runs (`os.system` with a command as its argument).
NETWORK_CLASSES = tuple(f'training.networks.{name}' for name in PRECONDS)

# Config entries that must match for a resume to continue the same run.
RESUME_MUST_MATCH = ('network_kwargs', 'loss_kwargs', 'augment_kwargs', 'corruption')

# Options added after states were first written: a state without the key was trained with this value.
ABSENT_MEANS = {'hidden_precond': 'original', 'cond_sigma_min': 0}


# ----------------------------------------------------------------------------
# Writing and reading ours.


def kimg_tag(nimg):
    """Snapshot name tag: EDM's `{kimg:06d}` for whole kimg, `{kimg:010.3f}` for fractional ones."""
    return f'{nimg // 1000:06d}' if nimg % 1000 == 0 else f'{nimg / 1000:010.3f}'


def atomic_torch_save(obj, path):
    """torch.save through a temporary file and a rename: a crash leaves the previous file intact."""
    with atomic_write(path, 'wb') as f:
        torch.save(obj, f)


def cpu_state_dict(module):
    """A detached CPU copy of the state dict of the module under any DDP / torch.compile wrappers."""
    return {name: tensor.detach().cpu().clone() for name, tensor in unwrap(module).state_dict().items()}


def build_network(network_kwargs, source='network_kwargs'):
    """Construct one of our preconditioned networks (`NETWORK_CLASSES`) from its stored kwargs (class_name plus
    constructor arguments); any other class is refused with a ValueError naming `source`."""
    class_name = network_kwargs.get('class_name') if isinstance(network_kwargs, Mapping) else None
    if class_name not in NETWORK_CLASSES:
        raise ValueError(f'{source}: class_name={class_name!r} is not one of the networks this codebase builds '
                         f'({", ".join(NETWORK_CLASSES)}); refusing to construct it')
    return dnnlib.util.construct_class_by_name(**network_kwargs)


def save_snapshot(run_dir, ema, nimg, config):
    """Write `network-snapshot-{kimg}.pt` of the EMA network; `config` holds the run's kwargs and corruption."""
    data = dict(format=SNAPSHOT_FORMAT, version=FORMAT_VERSION, ema=cpu_state_dict(ema), nimg=nimg,
        **{key: config[key] for key in ('network_kwargs', 'loss_kwargs', 'augment_kwargs', 'dataset_kwargs',
                                        'corruption')})
    path = os.path.join(run_dir, f'network-snapshot-{kimg_tag(nimg)}.pt')
    atomic_torch_save(data, path)
    return path


def read_torch_file(path, what):
    """`torch.load(path, weights_only=True)` on the CPU; a missing, truncated or foreign file is a ValueError
    that names it and says what was expected (`what`)."""
    if not os.path.isfile(path):
        raise ValueError(f'{path}: no such file; expected {what}')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for damaged files
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f'{path} is not a readable {what} (truncated, damaged or another kind of file: '
                         f'{reason[:160]})') from None


def load_snapshot(path):
    """Load a network snapshot written by the training loop; returns (network in eval mode, snapshot dict)."""
    snapshot = read_torch_file(path, 'network snapshot of this codebase')
    if not isinstance(snapshot, dict) or snapshot.get('format') != SNAPSHOT_FORMAT:
        raise ValueError(f'{path} is not a network snapshot of this codebase (no "{SNAPSHOT_FORMAT}" format tag)')
    net = build_network(snapshot.get('network_kwargs'), source=str(path))
    net.load_state_dict(snapshot['ema'], strict=True)
    return net.eval().requires_grad_(False), snapshot


def save_state(run_dir, state):
    """Write `training-state-{kimg}.pt` from the dict of what a resume needs (`cur_nimg` names the file)."""
    path = os.path.join(run_dir, f'training-state-{kimg_tag(state["cur_nimg"])}.pt')
    atomic_torch_save(dict(format=STATE_FORMAT, version=FORMAT_VERSION, **state), path)
    return path


def load_state(path, config=None):
    """A training state; with `config`, checked against the current run's: the entries of RESUME_MUST_MATCH must
    agree. The state's `cur_tick` is the tick at whose end it was written."""
    state = read_torch_file(path, 'training state (training-state-*.pt)')
    if not isinstance(state, dict) or state.get('format') != STATE_FORMAT:
        raise ValueError(f'{path} is not a training state of this codebase (no "{STATE_FORMAT}" format tag)')
    if config is None:
        return state
    diffs = []
    for key in RESUME_MUST_MATCH:
        diffs += config_differences({key: state['config'].get(key)}, {key: config[key]})
    if diffs:
        raise ValueError('cannot resume: the run was started with a different configuration: ' + '; '.join(diffs))
    return state


def config_differences(saved, current):
    """Human-readable differences between two nested config dicts (for refused resumes)."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        absent = ABSENT_MEANS.get(key, '<absent>')
        a, b = saved.get(key, absent), current.get(key, absent)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f'{key}.{d}' for d in config_differences(a, b)]
        elif a != b:
            diffs.append(f'{key}: {a!r} in the state, {b!r} now')
    return diffs


def find_latest_state(run_dir):
    """Newest `training-state-*.pt` in a run directory, or None."""
    states = [f for f in os.listdir(run_dir) if f.startswith('training-state-') and f.endswith('.pt')]
    if not states:
        return None
    nimg = lambda f: round(float(f[len('training-state-'):-len('.pt')]) * 1000)
    return os.path.join(run_dir, max(states, key=nimg))


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
    A network trained in bfloat16 (train.py --fp16=bf16) evaluates in its training precision on CUDA and in
    float32 elsewhere (bfloat16 is slow on CPUs without AVX512-BF16 or AMX); set `net.use_fp16 = 'bf16'` to
    evaluate it in bfloat16 on a CPU.
    """
    local = dnnlib.util.open_url(path, return_filename=True)
    with open(local, 'rb') as f:
        head = f.read(4)
    if head.startswith(b'PK'):  # torch.save's zip format
        net, info = _load_ours(local)
    elif head[:1] == b'\x80':  # a pickle (protocol >= 2)
        net, info = _load_pickle(_read_pickle(local, path), path, local, training_options, allow_unsafe_pickle)
    else:
        raise ValueError(f'{path} is neither a torch.save snapshot nor a pickle')
    info.path = str(path)
    if info.nimg is None:
        info.nimg = snapshot_nimg(path)
    info.kimg = info.nimg / 1000 if info.nimg is not None else None
    device = torch.device(device if device is not None else 'cpu')
    net = net.eval().requires_grad_(False).to(device)
    if device.type != 'cuda' and getattr(net, 'use_fp16', False) == 'bf16':
        net.use_fp16 = False  # evaluation off CUDA runs float32 unless asked (eval.py generate --precision=bf16)
    return net, info


def _read_pickle(local, path):
    """A pickle read with the restricted unpickler; damaged bytes are a one-line ValueError."""
    with open(local, 'rb') as f:
        try:
            return restricted_load(f)
        except Exception as err:  # damaged bytes raise anything from UnpicklingError to OverflowError
            raise ValueError(f'{path} is a damaged or truncated pickle ({type(err).__name__}: '
                             f'{(str(err).splitlines() or [""])[0][:160]})') from None


def read_weights(path):
    """The weights (a state dict of tensors) in any snapshot we read, without building its network: ours (the
    EMA of a `.pt` snapshot, or a plain state-dict file), the original's `.pkl` (its EMA state dict, prefixes
    stripped) or an EDM module pickle (its parameters and buffers). A path or URL; nothing from the file runs."""
    local = dnnlib.util.open_url(path, return_filename=True)
    with open(local, 'rb') as f:
        head = f.read(4)
    data = _read_pickle(local, path) if head[:1] == b'\x80' else None
    if isinstance(data, Mapping) and 'ema' in data:  # the original's or EDM's pickle (not torch's legacy format)
        ema = data['ema']
        try:
            if isinstance(ema, Mapping):
                return _state_dict(ema, path)
            if isinstance(ema, PickledObject):
                return _state_dict(_module_tensors(ema, '', OrderedDict()), path)
        except _NotRebuildable as err:
            raise ValueError(f'{path}: {err}') from None
        raise ValueError(f'{path} is a pickle but not a network snapshot (expected a dict with an "ema" entry)')
    src = read_torch_file(local, 'network snapshot (.pt or .pkl) or state dict')
    src = src['ema'] if isinstance(src, dict) and 'ema' in src else src
    if not isinstance(src, dict) or not src or not all(isinstance(v, torch.Tensor) for v in src.values()):
        raise ValueError(f'{path} holds no state dict of tensors (nor a snapshot with one under "ema")')
    return {unwrapped_name(k): v for k, v in src.items()}


def _info(**kwargs):
    return dnnlib.EasyDict(dict(format=None, path=None, nimg=None, kimg=None, ambient=False, corruption=None,
                                label_dim=0, resolution=None, channels=None, network_kwargs=None), **kwargs)


def _corruption_info(kwargs, pattern_key):
    keys = ('corruption_probability', 'delta_probability', 'mask_full_rgb', 'geometry')
    if kwargs is None or pattern_key not in kwargs:
        return None
    return dict(corruption_pattern=kwargs[pattern_key], **{k: kwargs[k] for k in keys if k in kwargs})


def _load_ours(path):
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
        net = build_network(kw, source='training_options.json')
    except TypeError as err:
        raise ValueError(f'training_options.json: network_kwargs do not fit our {kw["class_name"]}: {err}') from None
    strict_load(net, sd, path)
    info = _info(format='original', ambient=True, label_dim=kw['label_dim'], resolution=kw['img_resolution'],
                 channels=kw['img_channels'] // 2,
                 corruption=_corruption_info(dict(dataset_kwargs, geometry='original'), 'corruption_pattern'),
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
        net = build_network(kw, source=str(path))
    except (TypeError, ValueError) as err:
        raise _NotRebuildable(f'our {precond} does not accept its arguments: {err}') from None
    strict_load(net, sd, path)
    channels = kw['img_channels'] // (2 if ambient else 1)
    info = _info(format='original' if ambient else 'edm', ambient=ambient, label_dim=kw.get('label_dim', 0),
                 resolution=kw.get('img_resolution'), channels=channels, network_kwargs=kw)
    return net, info


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
