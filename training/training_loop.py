"""Main training loop: EDM's loop (Karras et al. 2022) with the ambient additions (Daras et al. 2023).

Exact resumption: every random draw is keyed so that a run stopped at a state dump and resumed gives
the same weights as a run that never stopped. σ, the noise and the augmentation of each training example
come from generators seeded by (seed, sampler position of that example), so they do not depend on the number
of processes or on `batch_gpu`; the further corruption B is keyed the same way by the dataset; dropout uses
the process's torch RNG, saved in the state.
"""

import copy
import json
import math
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
from torch_utils.misc import seed_hash, seeded_generator
from training import samplers, snapshots
from training.sigma_first import SigmaFirstSampler


def check_loss_fits_network(loss_fn, net):
    """An ambient loss must weigh pixels by 1/c_out² of the network's own preconditioning of hidden pixels."""
    loss_precond = getattr(loss_fn, 'hidden_precond', 'original')
    if loss_precond != net.hidden_precond:
        raise ValueError(f'loss_kwargs.hidden_precond={loss_precond!r} differs from network_kwargs.hidden_precond='
                         f'{net.hidden_precond!r}: the loss weights must be 1/c_out² of the network\'s preconditioning; '
                         'set both to the same value')


def _rng_state():
    np_state = np.random.get_state()
    return dict(torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        numpy=[np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        python=random.getstate())


def _set_rng_state(states, seed=0, nimg=0):
    """Restore this process's RNG states from a state's list of every process's states. On another number of
    processes (`--allow_world_size_change`) each process instead seeds its own, keyed by (seed, rank, nimg), so that
    no two processes share dropout draws."""
    world_size, rank = dist.get_world_size(), dist.get_rank()
    if len(states) != world_size:
        dist.print0(f'Note: the state has RNG states of {len(states)} processes, now {world_size}; dropout draws '
                    'will differ from an uninterrupted run (every other draw is keyed by the sampler position).')
        entropy = misc.seed_hash(seed, 11, rank, nimg)
        torch.manual_seed(entropy)
        np.random.seed(entropy % 2**32)
        random.seed(entropy)
        return
    state = states[rank]
    torch.set_rng_state(state['torch'])
    if torch.cuda.is_available() and state['cuda']:
        torch.cuda.set_rng_state_all(state['cuda'])
    kind, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state['python']))


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
    channels_last       = False,    # Weights (and so activations) in channels-last memory format.
    wandb_mode          = 'off',    # off | offline | online.
    wandb_kwargs        = {},       # Extra wandb.init arguments (project, name, ...).
    tensorboard         = False,    # Also write tensorboard event files.
    device              = None,     # torch device; None = this process's CUDA device if any, else CPU.
):
    start_time, device = time.time(), (torch.device(device) if device is not None else dist.device())
    rank, world_size = dist.get_rank(), dist.get_world_size()
    _seed_process(seed, rank, deterministic, cudnn_benchmark)
    batch_gpu, num_accumulation_rounds = split_batch(batch_size, batch_gpu, world_size)
    # Plain JSON data from here on: checkpoints must load with torch.load(weights_only=True).
    config = json.loads(json.dumps(dict(dataset_kwargs=dataset_kwargs, network_kwargs=network_kwargs,
        loss_kwargs=loss_kwargs, augment_kwargs=augment_kwargs, optimizer_kwargs=optimizer_kwargs,
        batch_size=batch_size, seed=seed)))
    dataset_obj, net, loss_fn, augment_pipe, optimizer = _construct(config, batch_gpu, device, channels_last)
    ema = copy.deepcopy(net).eval().requires_grad_(False)

    # Where the run starts: from scratch, from a transferred network, or from a training state.
    run = dnnlib.EasyDict(cur_nimg=0, cur_tick=0, start_position=0, consumed=0, sampler=None, rng=None, seed=seed, rank=rank,
        world_size=world_size, device=device, **{k: config['network_kwargs'].get(k) for k in ('ambient', 'sr_factor')})
    if transfer is not None:
        _transfer_weights(transfer, net, ema)
        config['transferred'] = True  # recorded, so that a resume keeps the EMA ramp-up off too
    if resume_state is not None:
        _resume(resume_state, config, net, ema, optimizer, run)
    if config.get('transferred') or run.get('transferred'):
        ema_rampup_ratio = None
    sampler, dataset_iterator = _data_stream(dataset_obj, run.sampler, seed, rank, world_size, batch_gpu,
                                             data_loader_kwargs, loss_fn)
    ddp = _distribute(net, device, world_size, compile)
    if run.rng is not None:
        _set_rng_state(run.rng, seed, run.cur_nimg)
    outputs = _Outputs(run_dir, config, tensorboard, wandb_mode, wandb_kwargs, resume_nimg=run.cur_nimg)
    if rank == 0 and run.cur_nimg == 0:
        _save_data_grid(dataset_obj, os.path.join(run_dir, 'training-data.png'))

    # Train.
    dist.print0(f'Training for {total_kimg} kimg...')
    dist.print0(f'Batch {batch_size} = {world_size} processes x {num_accumulation_rounds} rounds x {batch_gpu} per round')
    tick = dnnlib.EasyDict(start_nimg=run.cur_nimg, start_time=time.time(), maintenance=time.time() - start_time)
    dist.barrier()
    while True:
        optimizer.zero_grad(set_to_none=True)
        _accumulate_gradients(ddp, loss_fn, dataset_iterator, run, num_accumulation_rounds,
            loss_scaling / (batch_gpu * num_accumulation_rounds), augment_pipe)
        _optimizer_step(net, optimizer, config['optimizer_kwargs']['lr'], lr_rampup_kimg, run.cur_nimg, max_grad_norm)
        _update_ema(ema, net, run.cur_nimg, batch_size, ema_halflife_kimg, ema_rampup_ratio)

        # Tick?
        run.cur_nimg += batch_size
        done = run.cur_nimg >= total_kimg * 1000
        if not done and run.cur_tick != 0 and run.cur_nimg < tick.start_nimg + kimg_per_tick * 1000:
            continue
        tick_end_time = time.time()
        dist.print0(_status_line(run, tick, tick_end_time - start_time, tick_end_time, device))

        # Snapshots, statistics and state dumps: the state last, so that whatever a kill interrupts is redone
        # by the resume from it (which drops later stats rows and rewrites later snapshots identically).
        if snapshot_ticks is not None and (done or run.cur_tick % snapshot_ticks == 0):
            misc.check_ddp_consistency(ema)  # the replicas must agree before rank 0's copy is saved
            if rank == 0:
                snapshots.save_snapshot(run_dir, ema, run.cur_nimg, config)
        outputs.update(run.cur_nimg)
        if (state_dump_ticks is not None and run.cur_tick != 0 and run.cur_tick % state_dump_ticks == 0) or done:
            _save_state(run_dir, run, net, ema, optimizer, sampler, config)

        # Next tick.
        run.cur_tick += 1
        tick.update(start_nimg=run.cur_nimg, start_time=time.time(), maintenance=time.time() - tick_end_time)
        if done:
            break

    outputs.close()
    dist.print0('Exiting...')
    return dict(cur_nimg=run.cur_nimg, cur_tick=run.cur_tick)


# ---------------------------------------------------------------------------------------------
# The pieces of the loop.

def _seed_process(seed, rank, deterministic, cudnn_benchmark):
    """Seed this process's global RNGs (dropout, anything else drawing from them); set the determinism and
    TF32 switches."""
    np.random.seed(seed_hash(seed, rank, 1) % (1 << 31))
    random.seed(seed_hash(seed, rank, 2))
    torch.manual_seed(seed_hash(seed, rank, 3))
    if deterministic:
        misc.set_deterministic(True)
    else:
        torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def split_batch(batch_size, batch_gpu, world_size):
    """(per-round batch, accumulation rounds) of a total batch over `world_size` processes, each limited to
    `batch_gpu` images per round (None = no limit)."""
    batch_gpu_total = batch_size // world_size
    if batch_gpu is None or batch_gpu > batch_gpu_total:
        batch_gpu = batch_gpu_total
    rounds = batch_gpu_total // batch_gpu
    if batch_size != batch_gpu * rounds * world_size:
        raise ValueError(f'batch={batch_size} is not divisible by processes ({world_size}) x batch_gpu ({batch_gpu})')
    return batch_gpu, rounds


def _construct(config, batch_gpu, device, channels_last=False):
    """The dataset, network, loss, augmentation pipe and optimizer of a run's config; completes the config with
    the network's dataset-dependent kwargs and the dataset's corruption. channels_last: the network's weights in
    channels-last format (a convolution with channels-last weights returns channels-last activations)."""
    dist.print0('Loading dataset...')
    dataset_obj = dnnlib.util.construct_class_by_name(**config['dataset_kwargs'])
    config['corruption'] = dataset_obj.corruption_config()
    if dataset_obj.has_annotations:
        config['corruption'].update(dataset_obj.noise_config())
    dist.print0('Constructing network...')
    net, config['network_kwargs'] = _build_network(config['network_kwargs'], dataset_obj, batch_gpu, device)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    loss_fn = dnnlib.util.construct_class_by_name(**config['loss_kwargs'])
    if config['network_kwargs'].get('ambient', False):
        check_loss_fits_network(loss_fn, net)
    augment_kwargs = config['augment_kwargs']
    augment_pipe = dnnlib.util.construct_class_by_name(**augment_kwargs) if augment_kwargs is not None else None
    optimizer = dnnlib.util.construct_class_by_name(params=parameter_groups(net), **config['optimizer_kwargs'])
    return dataset_obj, net, loss_fn, augment_pipe, optimizer


def parameter_groups(net):
    """The optimizer's parameter groups: the network, and a learned noise schedule (`schedule`, VDM) in a group of
    its own without weight decay."""
    schedule = getattr(net, 'schedule', None)
    own = list(schedule.parameters()) if isinstance(schedule, torch.nn.Module) else []
    if not own:
        return [dict(params=list(net.parameters()))]
    ids = {id(p) for p in own}
    return [dict(params=[p for p in net.parameters() if id(p) not in ids]), dict(params=own, weight_decay=0.0)]


def network_kwargs_for(network_kwargs, dataset_obj):
    """The network kwargs completed with the dataset's resolution, labels and channels (doubled for an ambient
    network's [image, mask] input)."""
    channels = dataset_obj.num_channels * (2 if network_kwargs.get('ambient', False) else 1)
    kwargs = dict(network_kwargs, img_resolution=dataset_obj.resolution, label_dim=dataset_obj.label_dim,
                  img_channels=channels)
    if kwargs.pop('outputs', 'image') == 'image_and_mask':  # the original's 2C outputs, of which C are used
        kwargs['out_channels'] = channels
    return kwargs


def check_transfer(path, network_kwargs, dataset_obj):
    """A --transfer file must hold weights for every tensor of the run's network, in its shapes; checked on the
    meta device (nothing allocated), before the run writes anything."""
    src = {misc.unwrapped_name(k): v.shape for k, v in snapshots.read_weights(path).items()}
    with torch.device('meta'):
        net = snapshots.build_network(network_kwargs_for(network_kwargs, dataset_obj))
    wrong = [name for name, tensor in misc.named_params_and_buffers(net) if src.get(name) != tensor.shape]
    if wrong:
        raise ValueError(f'--transfer={path} does not fit the network of this run: {len(wrong)} tensor(s) missing or '
                         f'of another shape, e.g. {wrong[0]}; transfer from a snapshot of the same architecture')


def _build_network(network_kwargs, dataset_obj, batch_gpu, device):
    """The network for the dataset's resolution, labels and channels (doubled for [image, mask] input);
    rank 0 prints its summary. Returns (network, the complete network kwargs)."""
    network_kwargs = network_kwargs_for(network_kwargs, dataset_obj)
    channels = network_kwargs['img_channels']
    net = snapshots.build_network(network_kwargs).train().requires_grad_(True).to(device)
    if dist.get_rank() == 0:
        R = dataset_obj.resolution
        shown = net
        if network_kwargs.get('sr_factor'):  # the summary's call needs the low-resolution condition too
            C = dataset_obj.num_channels
            shown = samplers.LowResConditioned(net, torch.zeros([batch_gpu, C, R, R], device=device))
        with torch.no_grad():
            misc.print_module_summary(shown, [torch.zeros([batch_gpu, channels, R, R], device=device),
                torch.ones([batch_gpu], device=device), torch.zeros([batch_gpu, net.label_dim], device=device)],
                max_nesting=3 if shown is not net else 2)
    return net, network_kwargs


def _transfer_weights(path, net, ema):
    """Initialise the network and its EMA from a snapshot (ours) or a plain state dict."""
    dist.print0(f'Initialising weights from "{path}"...')
    src = snapshots.read_weights(path)
    try:
        misc.copy_params_and_buffers(src, net, require_all=True)
        misc.copy_params_and_buffers(src, ema, require_all=True)
    except (TypeError, ValueError) as err:
        raise ValueError(f'--transfer={path} does not fit the network of this run ({err}); transfer from a snapshot of '
                         'the same architecture') from None


def _resume(path, config, net, ema, optimizer, run):
    """Load a training state into the network, EMA and optimizer, and its counters into `run`."""
    dist.print0(f'Resuming from "{path}"...')
    state = snapshots.load_state(path, config)
    net.load_state_dict(state['net'])
    ema.load_state_dict(state['ema'])
    optimizer.load_state_dict(state['optimizer'])
    # Moments in each parameter's memory layout: the state may come from a run with another --channels_last, and
    # the fused Adam kernel pairs elements by storage order.
    for group in optimizer.param_groups:
        for p in group['params']:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    optimizer.state[p][key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
    # The state was written at the end of tick `cur_tick`: the run continues with the next one.
    run.update(cur_nimg=state['cur_nimg'], cur_tick=state['cur_tick'] + 1, sampler=state['sampler'],
               start_position=state['sampler']['position'], rng=state['rng'],
               transferred=bool(state['config'].get('transferred')))
    if run.transferred:
        config['transferred'] = True


def _save_state(run_dir, run, net, ema, optimizer, sampler, config):
    """Everything a resume needs (gathered from every process; written by rank 0)."""
    rng = dist.all_gather_object(_rng_state())
    world_size = dist.get_world_size()
    state = dict(net=snapshots.cpu_state_dict(net), ema=snapshots.cpu_state_dict(ema),
        optimizer=optimizer.state_dict(), sampler=sampler.state_dict(position=run.start_position + run.consumed * world_size),
        rng=rng, cur_nimg=run.cur_nimg, cur_tick=run.cur_tick, config=config)
    if dist.get_rank() == 0:
        snapshots.save_state(run_dir, state)


def _data_stream(dataset_obj, sampler_state, seed, rank, world_size, batch_gpu, data_loader_kwargs, loss_fn=None):
    """(sampler, iterator of per-round batches) continuing from `sampler_state` (None = the start). A loss that
    trains on (σ, image) pairs (noisy data) gets the σ-first sampler, drawing σ from the loss's distribution."""
    if getattr(loss_fn, 'sigma_first', False):
        dummy = torch.zeros([1, 1, 1, 1], dtype=torch.float64)
        sampler = SigmaFirstSampler(dataset_obj.noise_levels(), lambda gen: loss_fn.sample_sigma(dummy, gen).item(),
            rank=rank, num_replicas=world_size, seed=seed, s_max=loss_fn.s_max, support=loss_fn.sigma_support())
    else:
        sampler = misc.InfiniteSampler(dataset_obj, rank=rank, num_replicas=world_size, seed=seed, yield_positions=True)
    if sampler_state is not None:
        sampler.load_state_dict(sampler_state)
    loader_generator = seeded_generator(seed, rank, 5)
    return sampler, iter(torch.utils.data.DataLoader(dataset=dataset_obj, sampler=sampler, batch_size=batch_gpu,
                                                     generator=loader_generator, **data_loader_kwargs))


def _distribute(net, device, world_size, compile):
    """The module the step calls: `net` under DDP (several processes) and torch.compile (if asked)."""
    ddp = net
    if world_size > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == 'cuda' else None,
            broadcast_buffers=False)
    return torch.compile(ddp) if compile else ddp


def _accumulate_gradients(ddp, loss_fn, batches, run, rounds, loss_scale, augment_pipe):
    """Backpropagate `rounds` batches of this process (gradients synchronised after the last round only)."""
    for round_idx in range(rounds):
        with misc.ddp_sync(ddp, round_idx == rounds - 1):
            batch = next(batches)
            positions = rank_positions(run.start_position, run.consumed, len(batch[0]), run.rank, run.world_size)
            run.consumed += len(batch[0])
            loss = batch_loss(ddp, loss_fn, batch, positions, run.seed, run.device, run.ambient, augment_pipe,
                              run.sr_factor)
            loss.sum().mul(loss_scale).backward()


def batch_loss(net, loss_fn, batch, positions, seed, device, ambient, augment_pipe, sr_factor=None):
    """Per-pixel loss of one round's batch (observation, labels, mask, hat_mask); reports the diagnostics.

    σ and the noise of each example come from a generator keyed by (seed, its sampler position), its
    augmentation from another one keyed the same way."""
    observation, labels, mask, hat_mask, *rest = batch  # the clean image last, only for the loss_all diagnostic
    generators = [seeded_generator(seed, 6, p) for p in positions]
    augment_generator = [seeded_generator(seed, 7, p) for p in positions] if augment_pipe is not None else None
    observation, mask, hat_mask = (t.to(device, non_blocking=True) for t in (observation, mask, hat_mask))
    labels = labels.to(device) if labels.shape[-1] > 0 else None
    if getattr(loss_fn, 'needs_positions', False):  # times keyed by the global positions (VDM)
        loss, diagnostics = loss_fn(net=net, images=observation, labels=labels, augment_pipe=augment_pipe,
                                    generator=generators, positions=positions, seed=seed)
    elif getattr(loss_fn, 'sigma_first', False):
        noise_info, fixed_noise, *clean = rest
        loss, diagnostics = loss_fn(net=net, images=observation, noise_info=noise_info.to(device),
            fixed_noise=fixed_noise.to(device), labels=labels, augment_pipe=augment_pipe, generator=generators,
            augment_generator=augment_generator, clean=clean[0].to(device) if clean else None)
    else:
        condition = rest.pop(0).to(device) if sr_factor else None  # the dataset's SR3 condition precedes `clean`
        extra = {} if condition is None else dict(condition=condition)
        if ambient:
            loss, diagnostics = loss_fn(net=net, observation=observation, mask=mask, hat_mask=hat_mask, labels=labels,
                augment_pipe=augment_pipe, generator=generators, augment_generator=augment_generator,
                clean=rest[0].to(device) if rest else None, **extra)
        else:
            loss, diagnostics = loss_fn(net=net, images=observation, labels=labels, augment_pipe=augment_pipe,
                generator=generators, augment_generator=augment_generator, **extra)
    for name, value in diagnostics.items():
        training_stats.report(f'Loss/{name}', value)
    return loss


def _optimizer_step(net, optimizer, base_lr, lr_rampup_kimg, cur_nimg, max_grad_norm):
    """Learning-rate ramp-up, non-finite gradients zeroed/clamped, optional clipping, one optimizer step."""
    lr = base_lr * min(cur_nimg / max(lr_rampup_kimg * 1000, 1e-8), 1) if lr_rampup_kimg > 0 else base_lr
    for group in optimizer.param_groups:
        group['lr'] = lr
    for param in net.parameters():
        if param.grad is not None:
            torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
    # The norm is reported always; with max_norm = inf nothing is clipped (the gradients are scaled by exactly 1).
    # Each parameter group is clipped on its own: a learned schedule's gradients (of another objective, VDM's
    # estimator variance) do not scale the network's.
    max_norm = max_grad_norm if max_grad_norm is not None else math.inf
    norms = [torch.nn.utils.clip_grad_norm_(group['params'], max_norm) for group in optimizer.param_groups]
    training_stats.report('Train/grad_norm', norms[0])
    if len(norms) > 1:
        training_stats.report('Train/schedule_grad_norm', norms[1])
    optimizer.step()
    training_stats.report('Train/lr', lr)


def _update_ema(ema, net, cur_nimg, batch_size, ema_halflife_kimg, ema_rampup_ratio):
    """EMA of the weights with EDM's half-life in images (ramped up with the images seen); buffers copied."""
    ema_halflife_nimg = ema_halflife_kimg * 1000
    if ema_rampup_ratio is not None:
        ema_halflife_nimg = min(ema_halflife_nimg, cur_nimg * ema_rampup_ratio)
    ema_beta = 0.5 ** (batch_size / max(ema_halflife_nimg, 1e-8))
    params, buffers = list(ema.parameters()), list(ema.buffers())
    with torch.no_grad():  # one multi-tensor kernel: ema ← ema + (1 − β)(net − ema); the lists may be empty
        if params:
            torch._foreach_lerp_(params, [p.detach() for p in net.parameters()], 1 - ema_beta)
        if buffers:
            torch._foreach_copy_(buffers, list(net.buffers()))


def _status_line(run, tick, total_sec, tick_end_time, device):
    """The tick's progress line; its numbers are also reported as Progress/*, Timing/* and Resources/* stats."""
    report0 = training_stats.report0
    sec_per_kimg = (tick_end_time - tick.start_time) / max(run.cur_nimg - tick.start_nimg, 1) * 1e3
    fields = [f"tick {report0('Progress/tick', run.cur_tick):<5d}",
        f"kimg {report0('Progress/kimg', run.cur_nimg / 1e3):<9.3f}",
        f"time {dnnlib.util.format_time(report0('Timing/total_sec', total_sec)):<12s}",
        f"sec/tick {report0('Timing/sec_per_tick', tick_end_time - tick.start_time):<7.1f}",
        f"sec/kimg {report0('Timing/sec_per_kimg', sec_per_kimg):<7.2f}",
        f"maintenance {report0('Timing/maintenance_sec', tick.maintenance):<6.1f}",
        f"cpumem {report0('Resources/cpu_mem_gb', psutil.Process(os.getpid()).memory_info().rss / 2**30):<6.2f}"]
    if device.type == 'cuda':
        fields += [f"gpumem {report0('Resources/peak_gpu_mem_gb', torch.cuda.max_memory_allocated(device) / 2**30):<6.2f}"]
        torch.cuda.reset_peak_memory_stats()
    return ' '.join(fields)


def _drop_rows_after(stats_path, nimg):
    """Remove the stats.jsonl rows of ticks after `nimg` (written before a kill; the resumed run writes them
    again), so that a resumed run's rows equal an uninterrupted run's. A damaged last line is dropped too."""
    if not os.path.isfile(stats_path):
        return
    keep = []
    with open(stats_path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if round(row.get('Progress/kimg', {}).get('mean', 0) * 1000) <= nimg:
                keep.append(line if line.endswith('\n') else line + '\n')
    with atomic_write(stats_path, 'w') as f:
        f.writelines(keep)


class _Outputs:
    """The statistics of each tick, collected from every process; rank 0 writes them to stats.jsonl (appended),
    loss.png, tensorboard and wandb (when asked)."""

    def __init__(self, run_dir, config, tensorboard, wandb_mode, wandb_kwargs, resume_nimg=0):
        self.collector = training_stats.Collector(regex='.*')
        self.run_dir = run_dir
        self.jsonl, self.tfevents, self.wandb_run = None, None, None
        if dist.get_rank() != 0:
            return
        os.makedirs(run_dir, exist_ok=True)
        stats_path = os.path.join(run_dir, 'stats.jsonl')
        if resume_nimg > 0:
            _drop_rows_after(stats_path, resume_nimg)
        self.jsonl = open(stats_path, 'at')
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tfevents = SummaryWriter(run_dir)
        if wandb_mode != 'off':
            import wandb
            self.wandb_run = wandb.init(mode=wandb_mode, dir=run_dir, config=config, resume='allow', **wandb_kwargs)

    def update(self, nimg):
        """Close the tick's statistics (a collective call: every process makes it) and write them."""
        self.collector.update()
        if self.jsonl is None:
            return
        stats = self.collector.as_dict()
        self.jsonl.write(json.dumps(dict(stats, timestamp=time.time())) + '\n')
        self.jsonl.flush()
        plot_losses(os.path.join(self.run_dir, 'stats.jsonl'), os.path.join(self.run_dir, 'loss.png'))
        scalars = {name: value.mean for name, value in stats.items()}
        if self.tfevents is not None:
            for name, value in scalars.items():
                self.tfevents.add_scalar(name, value, global_step=nimg)
            self.tfevents.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=nimg)

    def close(self):
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tfevents is not None:
            self.tfevents.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _save_data_grid(dataset, dest, num=32):
    """What the model trains on: observations A ⊙ x0 (top) and further-corrupted Ã ⊙ x0 (bottom)."""
    num = min(num, len(dataset))
    items = [dataset[(i, i)] for i in range(num)]
    obs = torch.stack([it[0] for it in items])
    hat = torch.stack([it[3] * it[0] for it in items])
    if obs.dtype == torch.uint8:
        obs, hat = obs.float() / 127.5 - 1, hat.float() / 127.5 - 1
    save_image_grid(torch.cat([obs, hat]), dest, grid_w=min(num, 16), pad=1, scale=2)
