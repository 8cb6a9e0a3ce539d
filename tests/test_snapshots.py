"""Tests for training/snapshots.py and torch_utils/pickles.py: finding snapshots and loading ours, the original's and EDM's.

The original's and EDM's pickles are written here with their real structure: tensors pickled the way
torch pickles them (storage bytes from `torch.storage._load_from_bytes`), rewritten to claim a CUDA
location, and persistent objects that reduce to `torch_utils.persistence._reconstruct_persistent_obj`
with embedded source code that would leave a sentinel file behind if it ever ran.
"""

import copy
import copyreg
import io
import json
import math
import os
import pickle
import sys
from collections import OrderedDict

import pytest
import torch

import dnnlib
import torch_utils
from torch_utils.pickles import PickledObject, restricted_load
from training import networks, snapshots
from training.snapshots import list_snapshots, load_network, resolve_networks

CPU_TAG, CUDA_TAG = b'X\x03\x00\x00\x00cpu', b'X\x06\x00\x00\x00cuda:0'  # the location string, pickled

ORIGINAL_OPTIONS = dict(
    dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path='/data/celeba-16.zip', use_labels=False,
                        xflip=False, cache=True, corruption_probability=0.8, delta_probability=0.1, mask_full_rgb=True,
                        corruption_pattern='dust', resolution=16, max_size=None),
    data_loader_kwargs=dict(pin_memory=True, num_workers=1, prefetch_factor=2),
    network_kwargs=dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                        decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], model_channels=16,
                        channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], gated=True,
                        class_name='training.networks.EDMPrecond', augment_dim=9, dropout=0.13, use_fp16=False),
    loss_kwargs=dict(class_name='training.loss.AmbientLoss', norm=2),
    optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=2e-4, betas=[0.9, 0.999], eps=1e-8),
    total_kimg=200000, ema_halflife_kimg=500, batch_size=512, batch_gpu=None, seed=0, run_dir='/runs/00000-x')
TINY = dict(model_type='SongUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0)


# ----------------------------------------------------------------------------
# Writing pickles the way the original and EDM did, without their code.


class Global:
    """A global (function or class) of code we do not have, written into the pickle by name only."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):
        raise AssertionError('never called: only pickled by name')


class Reduce:
    """An object that unpickles as func(*args)."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class Persistent(Reduce):
    """An instance of an EDM persistent class: its source code and state travel in the pickle."""

    def __init__(self, class_name, module_src, state):
        meta = dict(type='class', version=6, module_src=module_src, class_name=class_name, state=state)
        super().__init__(Global('torch_utils.persistence', '_reconstruct_persistent_obj'), (meta,))


def cuda_tagged(tensor):
    """Reduce a tensor as torch does, with storage bytes that say it lived on 'cuda:0'."""
    rebuild, args = tensor.__reduce_ex__(4)
    loader, (data,) = args[0].__reduce__()
    assert rebuild is torch._utils._rebuild_tensor_v2 and data.count(CPU_TAG) == 1
    return rebuild, (Reduce(loader, (data.replace(CPU_TAG, CUDA_TAG),)),) + args[1:]


class Pickler(pickle._Pickler):
    def __init__(self, file, protocol, cuda=True):
        super().__init__(file, protocol)
        if cuda:
            self.dispatch_table = {**copyreg.dispatch_table, torch.Tensor: cuda_tagged}

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, Global):
            self.write(pickle.GLOBAL + f'{obj.module}\n{obj.name}\n'.encode())
            return
        super().save(obj, save_persistent_id)


def dumps(obj, protocol=4, cuda=True):
    f = io.BytesIO()
    Pickler(f, protocol, cuda).dump(obj)
    return f.getvalue()


def sentinel_source(path, class_name):
    """Module source that leaves a file behind when executed."""
    return (f'import torch\nfrom torch_utils import persistence\nopen({str(path)!r}, "w").write("ran")\n'
            f'@persistence.persistent_class\nclass {class_name}(torch.nn.Module):\n'
            f'    def forward(self, x, sigma, class_labels=None):\n        return x * self.gain\n')


def randomize(net, seed=0):
    """Random O(1)-gain weights everywhere (the zero-initialised output layers included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel() if p.ndim > 1 else 4))
    return net.eval()


def original_network(seed=0):
    """The original's network for ORIGINAL_OPTIONS, built by hand: 2C in and out, double-sigmoid gates."""
    kw = ORIGINAL_OPTIONS['network_kwargs']
    torch.manual_seed(seed)
    net = networks.EDMPrecond(img_resolution=16, img_channels=6, out_channels=6, ambient=True, gate='double_sigmoid',
                              label_dim=0, augment_dim=9, model_type='SongUNet', model_channels=16, channel_mult=[1, 2],
                              num_blocks=1, attn_resolutions=[8], resample_filter=[1, 1], dropout=kw['dropout'])
    return randomize(net, seed)


def original_snapshot(net, sentinel, prefix='_orig_mod.'):
    """dict(ema=..., loss_fn=..., augment_pipe=..., dataset_kwargs=...) as the original's training loop pickled it."""
    own = net.state_dict()
    ema = OrderedDict((prefix + k, v) for k, v in own.items())
    ema._metadata = OrderedDict((prefix + k if k else k, v) for k, v in own._metadata.items())
    loss_state = dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5, norm=2, _init_args=(), _init_kwargs=dict(norm=2))
    return dict(ema=ema, loss_fn=Persistent('AmbientLoss', sentinel_source(sentinel, 'AmbientLoss'), loss_state),
                augment_pipe=None, dataset_kwargs=dnnlib.EasyDict(ORIGINAL_OPTIONS['dataset_kwargs']))


def write_original_run(run_dir, net, sentinel, protocol=4, prefix='_orig_mod.', options=ORIGINAL_OPTIONS):
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, 'network-snapshot-000100.pkl')
    with open(path, 'wb') as f:
        f.write(dumps(original_snapshot(net, sentinel, prefix), protocol))
    if options is not None:
        with open(os.path.join(run_dir, 'training_options.json'), 'w') as f:
            json.dump(options, f)
    return path


def ambient_input(batch=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(batch, 3, 16, 16, generator=gen) > 0.3).float()
    x = torch.randn(batch, 3, 16, 16, generator=gen)
    return torch.cat([mask * x, mask], dim=1), torch.tensor([0.3, 4.0])[:batch]


# ----------------------------------------------------------------------------
# Restricted unpickling.


@pytest.mark.parametrize('protocol', [2, 4])
def test_tensors_load_on_cpu_from_cuda_tagged_pickles(protocol):
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    data = OrderedDict(f=torch.randn(3, 5), view=base[1:, 2:5], t=base.t(), half=torch.randn(4).half(),
                       long=torch.tensor([3, -7]), flag=torch.tensor([True, False]), scalar=torch.tensor(2.5),
                       empty=torch.zeros(0, 3))
    payload = dumps(data, protocol)
    assert payload.count(b'cuda:0') == len(data)
    out = restricted_load(io.BytesIO(payload))
    assert isinstance(out, OrderedDict) and list(out) == list(data)
    for key, ref in data.items():
        assert out[key].device.type == 'cpu' and out[key].dtype == ref.dtype
        assert out[key].shape == ref.shape and torch.equal(out[key], ref), key
    if not torch.cuda.is_available():  # the emulation is faithful: torch itself refuses these bytes without CUDA
        with pytest.raises(RuntimeError, match='CUDA'):
            pickle.loads(payload)


def test_no_code_from_the_pickle_runs(tmp_path):
    files = [tmp_path / f'sentinel{i}' for i in range(3)]
    payload = dumps(dict(
        ema=OrderedDict(w=torch.ones(2)),
        exec=Reduce(Global('builtins', 'exec'), (f'open({str(files[0])!r}, "w").write("ran")',)),
        system=Reduce(Global('os', 'system'), (f'touch {files[1]}',)),
        persistent=Persistent('Net', sentinel_source(files[2], 'Net'), dict(_init_kwargs={})),
    ))
    out = restricted_load(io.BytesIO(payload))
    assert not any(f.exists() for f in files)
    assert isinstance(out['exec'], PickledObject) and out['exec'].pickled_global == 'builtins.exec'
    assert out['system'].pickled_global == 'os.system' and out['system'].pickled_args == (f'touch {files[1]}',)
    assert out['persistent'].class_name == 'Net' and 'open(' in out['persistent'].persistent_meta['module_src']
    assert torch.equal(out['ema']['w'], torch.ones(2))
    # A tensor built from anything but our storage parser is refused (no detour through other globals).
    bad = dumps(Reduce(torch._utils._rebuild_tensor_v2, (Reduce(Global('builtins', 'eval'), ('1',)), 0, (1,), (1,))))
    with pytest.raises(pickle.UnpicklingError, match='instead of a storage'):
        restricted_load(io.BytesIO(bad))
    # Control: the payloads are live, plain pickle would have run them.
    control = dumps(Reduce(Global('builtins', 'exec'), (f'open({str(files[0])!r}, "w").write("ran")',)))
    pickle.loads(control)
    assert files[0].exists()


# ----------------------------------------------------------------------------
# The original's snapshots.


@pytest.mark.parametrize('protocol,prefix', [(4, '_orig_mod.'), (2, 'module.'), (4, '_orig_mod.module.')])
def test_original_snapshot_reproduces_the_network(tmp_path, protocol, prefix):
    ref = original_network()
    sentinel = tmp_path / 'sentinel'
    path = write_original_run(tmp_path / 'run', ref, sentinel, protocol, prefix)
    net, info = load_network(path)
    assert not sentinel.exists()
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert all(not k.startswith(('_orig_mod.', 'module.')) for k in net.state_dict())
    x, sigma = ambient_input()
    aug = torch.randn(2, 9, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for kwargs in ({}, dict(augment_labels=aug)):
            expected = ref(x, sigma, **kwargs)
            assert expected.shape == (2, 3, 16, 16)
            assert torch.equal(net(x, sigma, **kwargs), expected)
    assert net.gate == 'double_sigmoid' and net.model.map_augment is not None
    assert net.hidden_precond == 'original'  # the original's formulation, bit-exact
    assert info.format == 'original' and info.ambient and info.nimg == 100000 and info.kimg == 100
    assert info.corruption == dict(corruption_pattern='dust', corruption_probability=0.8, delta_probability=0.1,
                                   mask_full_rgb=True, geometry='original')  # trained with the original's masks
    assert (info.label_dim, info.resolution, info.channels) == (0, 16, 3)


def test_original_snapshot_with_labels_takes_the_class_count_from_the_weights(tmp_path):
    torch.manual_seed(0)
    ref = randomize(networks.EDMPrecond(16, 6, label_dim=5, out_channels=6, ambient=True, gate='double_sigmoid',
                                       augment_dim=9, **TINY))
    options = copy.deepcopy(ORIGINAL_OPTIONS)
    options['dataset_kwargs']['use_labels'] = True
    path = write_original_run(tmp_path, ref, tmp_path / 'sentinel', options=options)
    net, info = load_network(path)
    labels = torch.eye(5)[[1, 4]]
    x, sigma = ambient_input()
    with torch.no_grad():
        assert torch.equal(net(x, sigma, labels), ref(x, sigma, labels))
    assert info.label_dim == 5


def test_original_snapshot_needs_training_options(tmp_path):
    ref = original_network()
    path = write_original_run(tmp_path / 'run', ref, tmp_path / 'sentinel', options=None)
    with pytest.raises(ValueError, match=r'training_options\.json.*next to the snapshot.*--training_options'):
        load_network(path)
    elsewhere = tmp_path / 'options.json'
    elsewhere.write_text(json.dumps(ORIGINAL_OPTIONS))
    x, sigma = ambient_input()
    with torch.no_grad():
        for options in (str(elsewhere), ORIGINAL_OPTIONS):
            net, _ = load_network(path, training_options=options)
            assert torch.equal(net(x, sigma), ref(x, sigma))


@pytest.mark.parametrize('change,missing,hint', [
    (dict(num_blocks=2), 'model.enc.16x16_block1.', 'num_blocks'),
    (dict(gated=False), 'gate_weight', 'gated'),
    (dict(model_channels=32), None, 'model_channels'),
])
def test_mismatched_architecture_names_keys_and_options(tmp_path, change, missing, hint):
    options = copy.deepcopy(ORIGINAL_OPTIONS)
    options['network_kwargs'].update(change)
    path = write_original_run(tmp_path, original_network(), tmp_path / 'sentinel', options=options)
    with pytest.raises(ValueError, match='does not fit the network') as err:
        load_network(path)
    message = str(err.value)
    assert hint in message.split('Options that probably differ:')[1]
    if missing is not None:
        assert missing in message


def test_not_a_snapshot(tmp_path):
    path = tmp_path / 'list.pkl'
    path.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match='not a network snapshot'):
        load_network(path)


# ----------------------------------------------------------------------------
# Our snapshots.


@pytest.mark.parametrize('hidden_precond', [None, 'original', 'mask_aware'])
def test_our_snapshot_loads(tmp_path, hidden_precond):
    kw = dict(class_name='training.networks.EDMPrecond', img_resolution=16, img_channels=2, label_dim=0, ambient=True,
              gate='sigmoid', use_fp16=False, **TINY)
    if hidden_precond is not None:  # snapshots written before the option existed have no key: 'original'
        kw['hidden_precond'] = hidden_precond
    ref = randomize(snapshots.build_network(kw))
    corruption = dict(pattern='box', corruption_probability=0.4, delta_probability=0.2, mask_full_rgb=False,
                      corruption_seed=0, hat_seed=1, fixed_hat_mask=False)
    path = tmp_path / f'network-snapshot-{snapshots.kimg_tag(16)}.pt'
    snapshots.atomic_torch_save(dict(format=snapshots.SNAPSHOT_FORMAT, version=snapshots.FORMAT_VERSION,
        ema=snapshots.cpu_state_dict(ref), network_kwargs=kw, loss_kwargs={}, augment_kwargs=None,
        dataset_kwargs={}, corruption=corruption, nimg=16), str(path))
    net, info = load_network(path)
    x = torch.randn(3, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(net(x, torch.tensor([0.1, 1.0, 10.0])), ref(x, torch.tensor([0.1, 1.0, 10.0])))
    assert info.format == 'ours' and info.nimg == 16 and info.kimg == pytest.approx(0.016) and info.ambient
    assert info.corruption == dict(corruption_pattern='box', corruption_probability=0.4, delta_probability=0.2,
                                   mask_full_rgb=False)
    assert (info.channels, info.resolution, info.label_dim) == (1, 16, 0)
    assert net.hidden_precond == (hidden_precond or 'original')


@pytest.mark.parametrize('class_name,extra', [
    ('os.system', dict(command='touch SENTINEL')),
    ('subprocess.Popen', dict(args=['touch', 'SENTINEL'])),
    ('training.loss.EDMLoss', {}),                       # a class of ours, but not a network
    ('training.networks.EDMPrecond.__init__', {}),
])
def test_snapshot_naming_a_foreign_class_is_refused(tmp_path, class_name, extra):
    """A weights-only snapshot names the class to build; only our preconditioners may be built from it."""
    sentinel = tmp_path / 'PWNED'
    extra = {k: (v.replace('SENTINEL', str(sentinel)) if isinstance(v, str) else [x.replace('SENTINEL', str(sentinel))
             for x in v]) for k, v in extra.items()}
    path = tmp_path / 'network-snapshot-000001.pt'
    torch.save(dict(format=snapshots.SNAPSHOT_FORMAT, ema={}, nimg=1000,
                    network_kwargs=dict(class_name=class_name, **extra)), path)
    with pytest.raises(ValueError, match='not one of the networks'):
        load_network(path)
    assert not sentinel.exists()


# ----------------------------------------------------------------------------
# Finding snapshots.


def test_list_and_resolve_order_mixed_tags(tmp_path):
    names = ['network-snapshot-000001.500.pt', 'network-snapshot-000010.pkl', 'network-snapshot-000001.pkl',
             'network-snapshot-000000.016.pt', 'network-snapshot-000002.pt']
    for name in names + ['training-state-000002.pt', 'log.txt', 'training_options.json']:
        (tmp_path / name).write_bytes(b'')
    expected = [(16, 'network-snapshot-000000.016.pt'), (1000, 'network-snapshot-000001.pkl'),
                (1500, 'network-snapshot-000001.500.pt'), (2000, 'network-snapshot-000002.pt'),
                (10000, 'network-snapshot-000010.pkl')]
    assert sorted(names) != [name for _, name in expected]  # name order would be wrong here
    assert list_snapshots(tmp_path) == [(n, str(tmp_path / name)) for n, name in expected]
    assert resolve_networks(tmp_path) == [str(tmp_path / name) for _, name in expected]
    assert resolve_networks(tmp_path, latest=True) == [str(tmp_path / 'network-snapshot-000010.pkl')]
    single = str(tmp_path / 'network-snapshot-000001.500.pt')
    assert list_snapshots(single) == [(1500, single)] and resolve_networks(single) == [single]
    other = tmp_path / 'edm-cifar10-32x32-cond-vp.pkl'
    other.write_bytes(b'')
    assert list_snapshots(other) == [(None, str(other))]
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='no network-snapshot'):
        resolve_networks(tmp_path / 'empty')
    with pytest.raises(FileNotFoundError):
        resolve_networks(tmp_path / 'missing')


# ----------------------------------------------------------------------------
# EDM's module pickles.


def edm_module(module, sentinel, init_kwargs=None):
    """A module tree as EDM pickles it: persistent classes carry their source, torch containers go by name."""
    state = dict(module.__dict__)
    state['_modules'] = {name: edm_module(child, sentinel) if child is not None else None
                         for name, child in module._modules.items()}
    cls = type(module)
    if cls.__module__ == 'training.networks':
        state.update(_init_args=(), _init_kwargs=init_kwargs or {})
        return Persistent(cls.__name__, sentinel_source(sentinel, cls.__name__), state)
    plain = cls.__new__(cls)
    plain.__dict__.update(state)
    return plain


def test_edm_module_pickle_loads_without_running_its_code(tmp_path):
    kw = dict(img_resolution=16, img_channels=3, label_dim=4, use_fp16=False, beta_d=19.9, **TINY)
    torch.manual_seed(0)
    ref = randomize(networks.VPPrecond(**kw))
    sentinel = tmp_path / 'sentinel'
    path = tmp_path / 'edm-tiny-vp.pkl'
    path.write_bytes(dumps(dict(ema=edm_module(ref, sentinel, kw), loss_fn=None, augment_pipe=None,
                                dataset_kwargs=dnnlib.EasyDict(resolution=16)), cuda=False))
    net, info = load_network(path)
    assert not sentinel.exists()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.eye(4)[[0, 2]]
    with torch.no_grad():
        assert torch.equal(net(x, torch.tensor([0.5, 20.0]), labels), ref(x, torch.tensor([0.5, 20.0]), labels))
    assert isinstance(net, networks.VPPrecond) and net.gate == 'none'
    assert info.format == 'edm' and not info.ambient and info.corruption is None and info.nimg is None
    assert (info.label_dim, info.resolution, info.channels) == (4, 16, 3)


def test_module_pickle_of_unknown_classes_needs_the_unsafe_flag(tmp_path):
    plain = torch.nn.Module()
    plain.register_parameter('gain', torch.nn.Parameter(torch.tensor(2.0)))
    sentinel = tmp_path / 'sentinel'
    path = tmp_path / 'network-snapshot-000003.pkl'
    ema = Persistent('TinyDenoiser', sentinel_source(sentinel, 'TinyDenoiser'), dict(plain.__dict__))
    path.write_bytes(dumps(dict(ema=ema, loss_fn=None, augment_pipe=None, dataset_kwargs={})))
    with pytest.raises(ValueError, match='--allow_unsafe_pickle') as err:
        load_network(path)
    assert len(str(err.value).splitlines()) == 1
    assert not sentinel.exists()
    with pytest.warns(UserWarning, match='running the source code'):
        net, info = load_network(path, allow_unsafe_pickle=True)
    assert sentinel.exists()  # the flag really lets the embedded code run
    assert type(net).__name__ == 'TinyDenoiser' and isinstance(net.gain, torch.nn.Parameter)
    assert torch.equal(net(torch.ones(2), 1.0), torch.full([2], 2.0))
    assert info.format == 'edm' and info.nimg == 3000
    assert 'torch_utils.persistence' not in sys.modules and not hasattr(torch_utils, 'persistence')
