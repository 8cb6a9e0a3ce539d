"""Main training loop: EDM's loop (Karras et al. 2022) with the ambient additions (Daras et al. 2023).

Exact resumption: every random draw is keyed so that a run stopped at a state dump and resumed gives
the same weights as a run that never stopped. σ and the noise of each training example come from a
generator seeded by (seed, sampler position of that example), so they do not depend on the number of
processes or on `batch_gpu`; the further corruption B is keyed the same way by the dataset;
dropout uses the process's torch RNG and augmentation a per-rank generator, both saved in the state.
"""

import copy
import json
import os
import random
import time

import numpy as np
import psutil
import torch

import dnnlib
from dnnlib.util import atomic_write
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import training_stats
from torch_utils.images import save_image_grid

SNAPSHOT_FORMAT = 'ambient-diffusion-snapshot'
STATE_FORMAT = 'ambient-diffusion-training-state'
FORMAT_VERSION = 1

# Config entries that must match for a resume to continue the same run.
RESUME_MUST_MATCH = ('network_kwargs', 'loss_kwargs', 'augment_kwargs', 'corruption')


# ---------------------------------------------------------------------------------------------
# Small pieces, usable on their own (and by eval scripts).

def seed_entropy(*entropy):
    """A 63-bit seed from a well-mixed hash of integers."""
    state = np.random.SeedSequence([int(e) % 2**63 for e in entropy]).generate_state(2, dtype=np.uint64)
    return int(state[0]) % 2**63


def kimg_tag(nimg):
    """Snapshot name tag: EDM's `{kimg:06d}` for whole kimg, `{kimg:010.3f}` for fractional ones."""
    return f'{nimg // 1000:06d}' if nimg % 1000 == 0 else f'{nimg / 1000:010.3f}'


def atomic_torch_save(obj, path):
    """torch.save through a temporary file and a rename: a crash leaves the previous file intact."""
    with atomic_write(path, 'wb') as f:
        torch.save(obj, f)


def unwrap(module):
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        if isinstance(module, torch.nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, '_orig_mod'):
            module = module._orig_mod
        else:
            return module


def cpu_state_dict(module):
    return {name: tensor.detach().cpu().clone() for name, tensor in unwrap(module).state_dict().items()}


# The only classes a snapshot, a training state or training_options.json may ask us to build: a class name
# read from a file would otherwise choose what code runs (`os.system` with a command as its argument).
NETWORK_CLASSES = tuple(f'training.networks.{name}' for name in ('EDMPrecond', 'VPPrecond', 'VEPrecond', 'iDDPMPrecond'))


def build_network(network_kwargs, source='network_kwargs'):
    """Construct one of our preconditioned networks (`NETWORK_CLASSES`) from its stored kwargs (class_name plus
    constructor arguments); any other class is refused with a ValueError naming `source`."""
    class_name = network_kwargs.get('class_name') if isinstance(network_kwargs, dict) else None
    if class_name not in NETWORK_CLASSES:
        raise ValueError(f'{source}: class_name={class_name!r} is not one of the networks this codebase builds '
                         f'({", ".join(NETWORK_CLASSES)}); refusing to construct it')
    return dnnlib.util.construct_class_by_name(**network_kwargs)


def check_loss_fits_network(loss_fn, net):
    """An ambient loss must weigh pixels by 1/c_out² of the network's own preconditioning of hidden pixels."""
    loss_precond = getattr(loss_fn, 'hidden_precond', 'original')
    if loss_precond != net.hidden_precond:
        raise ValueError(f'loss_kwargs.hidden_precond={loss_precond!r} differs from network_kwargs.hidden_precond='
                         f'{net.hidden_precond!r}: the loss weights must be 1/c_out² of the network\'s preconditioning; '
                         'set both to the same value')


def load_snapshot(path):
    """Load a network snapshot written by the training loop; returns (network in eval mode, snapshot dict)."""
    snapshot = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(snapshot, dict) or snapshot.get('format') != SNAPSHOT_FORMAT:
        raise ValueError(f'{path} is not a network snapshot of this codebase (no "{SNAPSHOT_FORMAT}" format tag)')
    net = build_network(snapshot.get('network_kwargs'), source=str(path))
    net.load_state_dict(snapshot['ema'], strict=True)
    return net.eval().requires_grad_(False), snapshot


def find_latest_state(run_dir):
    """Newest `training-state-*.pt` in a run directory, or None."""
    states = [f for f in os.listdir(run_dir) if f.startswith('training-state-') and f.endswith('.pt')]
    if not states:
        return None
    nimg = lambda f: round(float(f[len('training-state-'):-len('.pt')]) * 1000)
    return os.path.join(run_dir, max(states, key=nimg))


# Options added after states were first written: a state without the key was trained with this value.
ABSENT_MEANS = {'hidden_precond': 'original', 'cond_sigma_min': 0}


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


def _rng_state(augment_generator):
    np_state = np.random.get_state()
    return dict(torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        numpy=[np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        python=random.getstate(), augment=augment_generator.get_state())


def _set_rng_state(state, augment_generator):
    torch.set_rng_state(state['torch'])
    if torch.cuda.is_available() and state['cuda']:
        torch.cuda.set_rng_state_all(state['cuda'])
    kind, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state['python']))
    augment_generator.set_state(state['augment'])


def rank_positions(start_position, consumed, count, rank, world_size):
    """Global sampler positions of the next `count` items of `rank`, after it consumed `consumed` items.

    Rank r receives the positions i >= start with i % world_size == r, in order (InfiniteSampler).
    """
    first = start_position + (rank - start_position) % world_size
    return [first + (consumed + b) * world_size for b in range(count)]


def plot_losses(stats_path, dest):
    """Plot every Loss/* mean in stats.jsonl against kimg; written atomically as PNG."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    with open(stats_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    names = sorted({k for r in rows for k in r if k.startswith('Loss/')})
    if not rows or not names:
        return
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name in names:
        pts = [(r['Progress/kimg']['mean'], r[name]['mean']) for r in rows if name in r and 'Progress/kimg' in r]
        if pts:
            ax.plot(*zip(*pts), marker='.', label=name)
    ax.set_xlabel('kimg')
    ax.set_ylabel('loss (mean over its pixels)')
    ax.set_yscale('log')
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_write(dest, 'wb') as f:
        fig.savefig(f, format='png')
    plt.close(fig)


# ---------------------------------------------------------------------------------------------

def training_loop(
    run_dir             = '.',      # Output directory.
    dataset_kwargs      = {},       # Options for the training set (class_name + kwargs).
    data_loader_kwargs  = {},       # Options for torch.utils.data.DataLoader.
    network_kwargs      = {},       # Options for the network (class_name + kwargs; `ambient` doubles input channels).
    loss_kwargs         = {},       # Options for the loss (class_name + kwargs).
    optimizer_kwargs    = {},       # Options for the optimizer (class_name + kwargs).
    augment_kwargs      = None,     # Options for the augmentation pipe, None = no augmentation.
    seed                = 0,        # Seed of everything random in the run.
    batch_size          = 512,      # Total batch size over all processes, per optimizer step.
    batch_gpu           = None,     # Limit of the per-process batch; None = no limit (no accumulation).
    total_kimg          = 200000,   # Training duration in thousands of images.
    ema_halflife_kimg   = 500,      # Half-life of the EMA of the weights.
    ema_rampup_ratio    = 0.05,     # EMA ramp-up coefficient, None = no ramp-up.
    lr_rampup_kimg      = 10000,    # Learning-rate ramp-up duration.
    loss_scaling        = 1,        # Loss scaling factor (for fp16).
    max_grad_norm       = None,     # Clip the global gradient norm to this, None = no clipping.
    kimg_per_tick       = 50,       # Interval of progress prints.
    snapshot_ticks      = 50,       # How often to save network snapshots, None = never (the end included).
    state_dump_ticks    = 500,      # How often to dump the training state; the end always gets one.
    resume_state        = None,     # Training-state file to continue from (the same run, in place).
    transfer            = None,     # Network snapshot to initialise the weights from (EMA ramp-up off).
    cudnn_benchmark     = True,     # torch.backends.cudnn.benchmark (ignored when deterministic).
    deterministic       = False,    # Deterministic kernels (bitwise-reproducible resumes on CPU).
    compile             = False,    # torch.compile the network.
    wandb_mode          = 'off',    # off | offline | online.
    wandb_kwargs        = {},       # Extra wandb.init arguments (project, name, ...).
    tensorboard         = False,    # Also write tensorboard event files.
    device              = None,     # torch device; None = this process's CUDA device if any, else CPU.
):
    start_time = time.time()
    # Plain JSON data from here on: checkpoints must load with torch.load(weights_only=True).
    plain = lambda x: json.loads(json.dumps(x))
    dataset_kwargs, network_kwargs, loss_kwargs, optimizer_kwargs, augment_kwargs = (plain(x) for x in
        (dataset_kwargs, network_kwargs, loss_kwargs, optimizer_kwargs, augment_kwargs))
    device = torch.device(device) if device is not None else dist.device()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    np.random.seed(seed_entropy(seed, rank, 1) % (1 << 31))
    random.seed(seed_entropy(seed, rank, 2))
    torch.manual_seed(seed_entropy(seed, rank, 3))
    augment_generator = torch.Generator(device).manual_seed(seed_entropy(seed, rank, 4))
    if deterministic:
        misc.set_deterministic(True)
    else:
        torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    # Batch sizes.
    batch_gpu_total = batch_size // world_size
    if batch_gpu is None or batch_gpu > batch_gpu_total:
        batch_gpu = batch_gpu_total
    num_accumulation_rounds = batch_gpu_total // batch_gpu
    if batch_size != batch_gpu * num_accumulation_rounds * world_size:
        raise ValueError(f'batch={batch_size} is not divisible by processes ({world_size}) x batch_gpu ({batch_gpu})')

    # Dataset.
    dist.print0('Loading dataset...')
    dataset_obj = dnnlib.util.construct_class_by_name(**dataset_kwargs)
    corruption = dataset_obj.corruption_config()
    ambient = bool(network_kwargs.get('ambient', False))

    # Network, loss, augmentation.
    dist.print0('Constructing network...')
    interface_kwargs = dict(img_resolution=dataset_obj.resolution, label_dim=dataset_obj.label_dim,
        img_channels=dataset_obj.num_channels * (2 if ambient else 1))
    network_kwargs = dict(network_kwargs, **interface_kwargs)
    net = build_network(network_kwargs).train().requires_grad_(True).to(device)
    if rank == 0:
        C, R = dataset_obj.num_channels, dataset_obj.resolution
        with torch.no_grad():
            misc.print_module_summary(net, [torch.zeros([batch_gpu, interface_kwargs['img_channels'], R, R], device=device),
                torch.ones([batch_gpu], device=device), torch.zeros([batch_gpu, net.label_dim], device=device)], max_nesting=2)
    loss_fn = dnnlib.util.construct_class_by_name(**loss_kwargs)
    if ambient:
        check_loss_fits_network(loss_fn, net)
    augment_pipe = dnnlib.util.construct_class_by_name(**augment_kwargs) if augment_kwargs is not None else None
    optimizer = dnnlib.util.construct_class_by_name(params=net.parameters(), **optimizer_kwargs)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    base_lr = optimizer_kwargs['lr']
    config = dict(network_kwargs=network_kwargs, loss_kwargs=loss_kwargs, augment_kwargs=augment_kwargs,
        corruption=corruption, dataset_kwargs=dataset_kwargs, optimizer_kwargs=optimizer_kwargs,
        batch_size=batch_size, seed=seed)

    # Resume or transfer.
    cur_nimg, cur_tick, start_position, rng_states = 0, 0, 0, None
    sampler_state = None
    if transfer is not None:
        dist.print0(f'Initialising weights from "{transfer}"...')
        src = torch.load(transfer, map_location='cpu', weights_only=True)
        src = src['ema'] if isinstance(src, dict) and 'ema' in src else src
        misc.copy_params_and_buffers(src, net, require_all=True)
        misc.copy_params_and_buffers(src, ema, require_all=True)
        ema_rampup_ratio = None
    if resume_state is not None:
        dist.print0(f'Resuming from "{resume_state}"...')
        state = torch.load(resume_state, map_location='cpu', weights_only=True)
        if not isinstance(state, dict) or state.get('format') != STATE_FORMAT:
            raise ValueError(f'{resume_state} is not a training state of this codebase')
        diffs = []
        for key in RESUME_MUST_MATCH:
            diffs += config_differences({key: state['config'].get(key)}, {key: config[key]})
        if diffs:
            raise ValueError('cannot resume: the run was started with a different configuration: ' + '; '.join(diffs))
        net.load_state_dict(state['net'])
        ema.load_state_dict(state['ema'])
        optimizer.load_state_dict(state['optimizer'])
        cur_nimg, cur_tick = state['cur_nimg'], state['cur_tick']
        sampler_state = state['sampler']
        start_position = sampler_state['position']
        rng_states = state['rng']
        del state

    # Data.
    sampler = misc.InfiniteSampler(dataset_obj, rank=rank, num_replicas=world_size, seed=seed, yield_positions=True)
    if sampler_state is not None:
        sampler.load_state_dict(sampler_state)
    loader_generator = torch.Generator().manual_seed(seed_entropy(seed, rank, 5))
    dataset_iterator = iter(torch.utils.data.DataLoader(dataset=dataset_obj, sampler=sampler, batch_size=batch_gpu,
        generator=loader_generator, **data_loader_kwargs))
    consumed = 0  # Items this rank has consumed since `start_position`.

    # Distribution and compilation.
    ddp = net
    if world_size > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == 'cuda' else None,
            broadcast_buffers=False)
    if compile:
        ddp = torch.compile(ddp)
    if rng_states is not None:
        if len(rng_states) != world_size:
            dist.print0(f'Note: the state has RNG states of {len(rng_states)} processes, now {world_size}; '
                'dropout/augmentation draws will differ from an uninterrupted run.')
        _set_rng_state(rng_states[rank % len(rng_states)], augment_generator)

    # Outputs.
    stats_jsonl, stats_tfevents, wandb_run = None, None, None
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        stats_jsonl = open(os.path.join(run_dir, 'stats.jsonl'), 'at')
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            stats_tfevents = SummaryWriter(run_dir)
        if wandb_mode != 'off':
            import wandb
            wandb_run = wandb.init(mode=wandb_mode, dir=run_dir, config=config, resume='allow', **wandb_kwargs)
        if cur_nimg == 0:
            _save_data_grid(dataset_obj, os.path.join(run_dir, 'training-data.png'))

    def save_snapshot():
        data = dict(format=SNAPSHOT_FORMAT, version=FORMAT_VERSION, ema=cpu_state_dict(ema),
            network_kwargs=network_kwargs, loss_kwargs=loss_kwargs, augment_kwargs=augment_kwargs,
            dataset_kwargs=dataset_kwargs, corruption=corruption, nimg=cur_nimg)
        if rank == 0:
            atomic_torch_save(data, os.path.join(run_dir, f'network-snapshot-{kimg_tag(cur_nimg)}.pt'))

    def save_state():
        rng = dist.all_gather_object(_rng_state(augment_generator))
        data = dict(format=STATE_FORMAT, version=FORMAT_VERSION, net=cpu_state_dict(net), ema=cpu_state_dict(ema),
            optimizer=optimizer.state_dict(), sampler=sampler.state_dict(position=start_position + consumed * world_size),
            rng=rng, cur_nimg=cur_nimg, cur_tick=cur_tick, config=config)
        if rank == 0:
            atomic_torch_save(data, os.path.join(run_dir, f'training-state-{kimg_tag(cur_nimg)}.pt'))

    # Train.
    dist.print0(f'Training for {total_kimg} kimg...')
    dist.print0(f'Batch {batch_size} = {world_size} processes x {num_accumulation_rounds} rounds x {batch_gpu} per round')
    tick_start_nimg = cur_nimg
    tick_start_time = time.time()
    maintenance_time = tick_start_time - start_time
    dist.barrier()
    stats_collector = training_stats.Collector(regex='.*')
    while True:
        optimizer.zero_grad(set_to_none=True)
        for round_idx in range(num_accumulation_rounds):
            with misc.ddp_sync(ddp, round_idx == num_accumulation_rounds - 1):
                observation, labels, mask, hat_mask = next(dataset_iterator)
                positions = rank_positions(start_position, consumed, observation.shape[0], rank, world_size)
                consumed += observation.shape[0]
                generators = [torch.Generator().manual_seed(seed_entropy(seed, 6, p)) for p in positions]
                observation, mask, hat_mask = (t.to(device, non_blocking=True) for t in (observation, mask, hat_mask))
                labels = labels.to(device) if dataset_obj.label_dim > 0 else None
                if ambient:
                    loss, diagnostics = loss_fn(net=ddp, observation=observation, mask=mask, hat_mask=hat_mask,
                        labels=labels, augment_pipe=augment_pipe, generator=generators, augment_generator=augment_generator)
                else:
                    loss, diagnostics = loss_fn(net=ddp, images=observation, labels=labels, augment_pipe=augment_pipe,
                        generator=generators, augment_generator=augment_generator)
                for name, value in diagnostics.items():
                    training_stats.report(f'Loss/{name}', value)
                loss.sum().mul(loss_scaling / batch_gpu_total).backward()

        # Update the weights.
        lr = base_lr * min(cur_nimg / max(lr_rampup_kimg * 1000, 1e-8), 1) if lr_rampup_kimg > 0 else base_lr
        for group in optimizer.param_groups:
            group['lr'] = lr
        for param in net.parameters():
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
        if max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), max_grad_norm)
            training_stats.report('Train/grad_norm', grad_norm)
        optimizer.step()
        training_stats.report('Train/lr', lr)

        # Update the EMA.
        ema_halflife_nimg = ema_halflife_kimg * 1000
        if ema_rampup_ratio is not None:
            ema_halflife_nimg = min(ema_halflife_nimg, cur_nimg * ema_rampup_ratio)
        ema_beta = 0.5 ** (batch_size / max(ema_halflife_nimg, 1e-8))
        with torch.no_grad():
            for p_ema, p_net in zip(ema.parameters(), net.parameters()):
                p_ema.copy_(p_net.detach().lerp(p_ema, ema_beta))
            for b_ema, b_net in zip(ema.buffers(), net.buffers()):
                b_ema.copy_(b_net)

        # Tick?
        cur_nimg += batch_size
        done = cur_nimg >= total_kimg * 1000
        if not done and cur_tick != 0 and cur_nimg < tick_start_nimg + kimg_per_tick * 1000:
            continue

        # Status line.
        tick_end_time = time.time()
        fields = []
        fields += [f"tick {training_stats.report0('Progress/tick', cur_tick):<5d}"]
        fields += [f"kimg {training_stats.report0('Progress/kimg', cur_nimg / 1e3):<9.3f}"]
        fields += [f"time {dnnlib.util.format_time(training_stats.report0('Timing/total_sec', tick_end_time - start_time)):<12s}"]
        fields += [f"sec/tick {training_stats.report0('Timing/sec_per_tick', tick_end_time - tick_start_time):<7.1f}"]
        sec_per_kimg = (tick_end_time - tick_start_time) / max(cur_nimg - tick_start_nimg, 1) * 1e3
        fields += [f"sec/kimg {training_stats.report0('Timing/sec_per_kimg', sec_per_kimg):<7.2f}"]
        fields += [f"maintenance {training_stats.report0('Timing/maintenance_sec', maintenance_time):<6.1f}"]
        fields += [f"cpumem {training_stats.report0('Resources/cpu_mem_gb', psutil.Process(os.getpid()).memory_info().rss / 2**30):<6.2f}"]
        if device.type == 'cuda':
            fields += [f"gpumem {training_stats.report0('Resources/peak_gpu_mem_gb', torch.cuda.max_memory_allocated(device) / 2**30):<6.2f}"]
            torch.cuda.reset_peak_memory_stats()
        dist.print0(' '.join(fields))

        # Snapshots and state dumps.
        if snapshot_ticks is not None and (done or cur_tick % snapshot_ticks == 0):
            save_snapshot()
        if (state_dump_ticks is not None and cur_tick != 0 and cur_tick % state_dump_ticks == 0) or done:
            save_state()

        # Statistics.
        stats_collector.update()
        if rank == 0:
            stats = stats_collector.as_dict()
            stats_jsonl.write(json.dumps(dict(stats, timestamp=time.time())) + '\n')
            stats_jsonl.flush()
            plot_losses(os.path.join(run_dir, 'stats.jsonl'), os.path.join(run_dir, 'loss.png'))
            scalars = {name: value.mean for name, value in stats.items()}
            if stats_tfevents is not None:
                for name, value in scalars.items():
                    stats_tfevents.add_scalar(name, value, global_step=cur_nimg)
                stats_tfevents.flush()
            if wandb_run is not None:
                wandb_run.log(scalars, step=cur_nimg)

        # Next tick.
        cur_tick += 1
        tick_start_nimg = cur_nimg
        tick_start_time = time.time()
        maintenance_time = tick_start_time - tick_end_time
        if done:
            break

    # Done.
    if rank == 0:
        stats_jsonl.close()
        if stats_tfevents is not None:
            stats_tfevents.close()
        if wandb_run is not None:
            wandb_run.finish()
    dist.print0('Exiting...')
    return dict(cur_nimg=cur_nimg, cur_tick=cur_tick)


def _save_data_grid(dataset, dest, num=32):
    """What the model trains on: observations A ⊙ x0 (top) and further-corrupted Ã ⊙ x0 (bottom)."""
    num = min(num, len(dataset))
    items = [dataset[(i, i)] for i in range(num)]
    obs = torch.stack([it[0] for it in items])
    hat = torch.stack([it[3] * it[0] for it in items])
    if obs.dtype == torch.uint8:
        obs, hat = obs.float() / 127.5 - 1, hat.float() / 127.5 - 1
    save_image_grid(torch.cat([obs, hat]), dest, grid_w=min(num, 16), pad=1, scale=2)
