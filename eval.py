"""Generate images from trained models, score them with FID and Inception Score, make reference statistics.

    python eval.py generate --network=runs/00000-... --outdir=out --seeds=0-63
    torchrun --standalone --nproc_per_node=8 eval.py generate --network=runs/00000-... --outdir=out \
        --seeds=0-49999 --ref=stats.npz --num_images=50000
    python eval.py ref --data=data.zip --dest=stats.npz
    python eval.py fid --images=out/images --ref=stats.npz --num=50000
    python eval.py denoise --network=runs/00000-... --data=clean.zip --outdir=out   # error on hidden pixels per σ
    python eval.py bpd --network=runs/00000-... --data=test.zip --outdir=out       # test-set bits/dim (VDM bound)
    torchrun --standalone --nproc_per_node=8 eval.py fid --images=out/images --ref=stats.npz

Reference statistics use EDM's `.npz` format (`mu`, `sigma`), so EDM's published references
(https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/) work with `fid` and ours work with EDM's fid.py.
The detector defaults to NVIDIA's Inception-v3 URL, fetched once into the dnnlib cache; offline, copy the
file there or pass its path with --detector. The computation lives in `training.metrics`.
"""

import hashlib
import json
import os
import time

import click
import numpy as np
import PIL.Image
import torch
import tqdm

import dnnlib
from dnnlib.util import atomic_write
from torch_utils import distributed as dist
from torch_utils.images import save_image_grid, save_png, to_uint8
from torch_utils.misc import parse_int_list, seeded_generator
from torch_utils.ambient_diffusion import downsample, upsample_bicubic
from training import inverse, metrics, samplers, snapshots, vdm
from training.dataset import ImageFolderDataset
from training.cli import (SIGMA_RANGE, check_output_dir, check_output_file, check_subset_seed, claim_output_dir,
                          command_body, detector_options, discrete_grid_rules, file_digest, given_options, guidance_rules, image_path,
                          load_detector, network_options, refuse_ignored, sampler_options, sampling_corruption,
                          sampling_mask_options, score_images, score_options, sigma_range_check)
from training.snapshots import kimg_tag

# ---------------------------------------------------------------------------------------------
# Generation.

def generate_images(net, info, seeds, outdir, batch=64, subdirs=False, class_idx=None, corruption=None,
                    sampler_kwargs={}, num_masks=1, resample_guidance_masks=False, device=None, progress=True,
                    grid_path=None):
    """Write `{outdir}/{seed:06d}.png` for every seed (seeds split across processes), skipping images already
    on disk, and an 8x8 grid of the first 64 seeds to `grid_path` (outside `outdir`, which holds only samples,
    so it can be scored as it is). Sample s does not depend on batch or process count.
    Returns the number of images this process generated."""
    device = torch.device(device) if device is not None else dist.device()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    todo = [s for s in seeds if not os.path.isfile(image_path(outdir, s, subdirs))]
    num_batches = max((len(todo) - 1) // (batch * world_size) + 1, 1) * world_size
    rank_batches = np.array_split(np.array(todo, dtype=np.int64), num_batches)[rank::world_size]
    dist.print0(f'Generating {len(todo)} of {len(seeds)} images to "{outdir}" ({len(seeds) - len(todo)} already there)...')
    count = 0
    for batch_seeds in tqdm.tqdm(rank_batches, unit='batch', disable=(rank != 0 or not progress)):
        if len(batch_seeds) == 0:
            continue
        kwargs = dict(sampler_kwargs)
        if info.ambient:
            kwargs.update(corruption=corruption, num_masks=num_masks, resample_guidance_masks=resample_guidance_masks)
        images = samplers.generate_batch(net, batch_seeds.tolist(), class_labels=class_idx, device=device, **kwargs)
        for seed, image in zip(batch_seeds.tolist(), to_uint8(images)):
            path = image_path(outdir, seed, subdirs)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_png(image, path)
        count += len(batch_seeds)
    dist.barrier()
    grid_seeds = [s for s in seeds[:64] if os.path.isfile(image_path(outdir, s, subdirs))]
    if rank == 0 and grid_seeds and grid_path is not None:
        grid = [np.array(PIL.Image.open(image_path(outdir, s, subdirs))) for s in grid_seeds]
        grid = torch.from_numpy(np.stack([g[:, :, None] if g.ndim == 2 else g for g in grid])).permute(0, 3, 1, 2)
        save_image_grid(grid, grid_path, grid_w=8)
    return count


def save_class_grid(net, info, seeds, dest, corruption=None, sampler_kwargs={}, num_masks=1, resample_guidance_masks=False,
                    batch=64, device=None):
    """One row per class, the same seeds (so the same initial noise) in every row: `dest` PNG (rank 0 writes)."""
    if not info.label_dim:
        raise click.UsageError('--class_grid draws one row per class; this network is unconditional')
    device = torch.device(device) if device is not None else dist.device()
    rows = []
    for k in tqdm.tqdm(range(info.label_dim), desc='Class grid', unit='class', disable=dist.get_rank() != 0):
        kwargs = dict(sampler_kwargs)
        if info.ambient:
            kwargs.update(corruption=corruption, num_masks=num_masks, resample_guidance_masks=resample_guidance_masks)
        rows += [samplers.generate_batch(net, seeds[i:i + batch], class_labels=k, device=device, **kwargs)
                 for i in range(0, len(seeds), batch)]
    if dist.get_rank() == 0:
        save_image_grid(torch.cat(rows).cpu(), dest, grid_w=len(seeds))


def _set_precision(net, precision, path):
    """Apply generate's --precision to `net`. Returns the names of the dtypes its network F runs in now and ran in
    before (what an output directory recorded without a precision was made with)."""
    if not hasattr(net, 'compute_dtype'):  # a module pickle of another codebase: its own precision rules
        if precision != 'auto':
            raise click.UsageError(f'--precision={precision}: {path} has no precision setting of ours; drop --precision')
        return 'module', 'module'
    name = lambda: str(net.compute_dtype(dist.device())).removeprefix('torch.')  # noqa: E731
    before = name()
    if precision == 'fp16' and dist.device().type != 'cuda':
        raise click.UsageError('--precision=fp16 needs a CUDA device; use --precision=bf16 on a CPU')
    if precision != 'auto':
        net.use_fp16 = {'fp32': False, 'bf16': 'bf16', 'fp16': True}[precision]
    return name(), before


def _process_snapshot(path, opts, detector_cache, given=()):
    net, info = snapshots.load_network(path, device=dist.device(), training_options=opts.training_options,
                                         allow_unsafe_pickle=opts.allow_unsafe_pickle)
    precision, before = _set_precision(net, opts.get('precision', 'auto'), path)
    if opts.get('compile_net'):
        net = samplers.compile_for_sampling(net)
    corruption = sampling_corruption(info, opts)
    refuse_ignored(given, [(name, not info.ambient and opts[name] != default, f'{path} is a clean network; it applies '
                            'to ambient ones') for name, default in (('guidance_scale', 0), ('guidance_units', 'ours'),
                           ('clipping', 'static'), ('resample_guidance_masks', False))])
    refuse_ignored(given, discrete_grid_rules(net, opts, path))
    if opts.get('num_classes') and opts.num_classes != info.label_dim:
        raise click.UsageError(f'--num_classes={opts.num_classes} but {path} has {info.label_dim} classes')
    tag = kimg_tag(info.nimg) if info.nimg is not None else os.path.splitext(os.path.basename(path))[0]
    outdir = os.path.join(opts.outdir, tag)
    sampler_kwargs = dict(num_steps=opts.steps, sigma_min=opts.sigma_min, sigma_max=opts.sigma_max, rho=opts.rho,
        S_churn=opts.S_churn, S_min=opts.S_min, S_max=opts.S_max, S_noise=opts.S_noise, solver=opts.solver,
        eta=opts.get('eta', 0.0), variance=opts.get('ddpm_variance', 'beta_tilde'))
    if opts.get('cfg_scale') is not None:
        net = samplers.ClassifierFreeGuidance(net, opts.cfg_scale)
    if opts.get('class_grid') and not info.label_dim:  # before generating anything
        raise click.UsageError(f'--class_grid draws one row per class; {path} is unconditional')
    if info.ambient:
        sampler_kwargs.update(guidance_scale=opts.guidance_scale, clipping=opts.clipping, guidance_units=opts.guidance_units)
    dist.print0(f'Network {path} ({info.format}, kimg {info.kimg}); corruption {corruption}')
    claim_output_dir(outdir, dict(network_sha256=file_digest(path), sampler=sampler_kwargs,
        corruption=corruption.to_dict() if corruption is not None else None, num_masks=opts.num_masks,
        resample_guidance_masks=opts.resample_guidance_masks, class_idx=opts.class_idx, subdirs=opts.subdirs,
        cfg_scale=opts.get('cfg_scale'), precision=precision), absent_means=dict(precision=before))
    generate_images(net, info, opts.seeds, outdir, batch=opts.batch, subdirs=opts.subdirs, class_idx=opts.class_idx,
        corruption=corruption, sampler_kwargs=sampler_kwargs, num_masks=opts.num_masks,
        resample_guidance_masks=opts.resample_guidance_masks, grid_path=os.path.join(opts.outdir, f'grid-{tag}.png'))
    if opts.get('class_grid'):
        save_class_grid(net, info, opts.seeds[:opts.class_grid], os.path.join(opts.outdir, f'class-grid-{tag}.png'),
                        corruption, sampler_kwargs, opts.num_masks, opts.resample_guidance_masks, opts.batch)
    if opts.ref is not None:
        if 'detector' not in detector_cache:
            detector_cache['detector'] = load_detector(opts)
        score_images(outdir, dnnlib.EasyDict(opts, num=opts.num or len(opts.seeds), outdir=opts.outdir,
                     seed=opts.subset_seed), extra=dict(network=os.path.abspath(path), kimg=info.kimg),
                     detector=detector_cache['detector'])


class _Commands(click.Group):
    """The subcommands, or, when the first argument is an option (`eval.py --network=... --ref=...`), the original
    ambient-diffusion eval.py's command line (`original`)."""

    def parse_args(self, ctx, args):
        if args and args[0].startswith('--') and args[0] != '--help':
            args = ['original', *args]
        return super().parse_args(ctx, args)


@click.group(cls=_Commands)
def cli():
    """FID / Inception Score evaluation (run a command with --help for its options).

    `eval.py --network=... --ref=... [the original's options]` runs the original eval.py's command line."""


@cli.command()
@click.option('--images',   help='Folder (searched recursively) or zip of images to score', metavar='DIR|ZIP', type=str, required=True)
@score_options
@detector_options
@command_body()
def fid(opts):
    """FID and Inception Score of a folder of images against reference statistics."""
    if opts.outdir is not None:
        check_output_dir(opts.outdir)
    score_images(opts.images, opts)


@cli.command()
@click.option('--data',     help='Dataset (folder or zip, as made by dataset_tool.py)', metavar='ZIP|DIR', type=str, required=True)
@click.option('--dest',     help='Output statistics file',                              metavar='NPZ',     type=str, required=True)
@click.option('--max_size', help='Use a random subset of at most this many images',      metavar='INT',     type=click.IntRange(min=2))
@click.option('--seed',     help='Seed of the --max_size subset',                        metavar='INT',     type=int, default=0, show_default=True)
@detector_options
@command_body()
def ref(opts):
    """Reference statistics (EDM's .npz format) of a dataset's clean images."""
    check_subset_seed(opts)
    check_output_file(opts.dest, '--dest')
    detector = load_detector(opts)
    dist.print0(f'Computing reference statistics of {opts.data} ...')
    stats = metrics.calculate_inception_stats(opts.data, detector, max_size=opts.max_size, seed=opts.seed,
        max_batch_size=opts.batch, device=dist.device(), compute_is=False, num_workers=opts.workers)
    if dist.get_rank() == 0:
        metrics.save_stats(opts.dest, stats.mu, stats.sigma)
    dist.print0(f'Saved statistics of {stats.num_images} images ({stats.mu.shape[0]} features) to {opts.dest}')


@cli.command()
@click.option('--network',          help='Snapshot (.pt of ours, .pkl of the original) or run directory', metavar='PATH|DIR', type=str, required=True)
@click.option('--outdir',           help='Where to save images: {outdir}/{kimg}/{seed:06d}.png and {outdir}/grid-{kimg}.png', metavar='DIR', type=str, required=True)
@click.option('--latest',           help='Only the newest snapshot of a run directory', is_flag=True)
@click.option('--training_options', help='training_options.json of an original .pkl  [default: next to it]', metavar='JSON', type=str)
@click.option('--seeds',            help='Random seeds (e.g. 1,2,5-10)', metavar='LIST', type=parse_int_list, default='0-63', show_default=True)
@click.option('--subdirs',          help='Put images in subdirectories of 1000 seeds', is_flag=True)
@click.option('--class', 'class_idx', help='Class label  [default: random]', metavar='INT', type=click.IntRange(min=0))
@click.option('--class_grid',       help='Also write {outdir}/class-grid-{kimg}.png: one row per class, the first N seeds in each', metavar='N', type=click.IntRange(min=1))
@sampler_options
@click.option('--resample_guidance_masks', help='Draw new guidance masks at every step', is_flag=True)
@sampling_mask_options
@click.option('--corruption_pattern', help='Sampling mask pattern  [default: the training one]', type=click.Choice(['dust', 'box', 'fixed_box', 'keep_patch']))
@click.option('--ref',              help='Also score each snapshot against these statistics', metavar='NPZ|URL', type=str)
@click.option('--num', '--num_images', 'num', help='Images to score  [default: all seeds] (under torchrun: --num_images)', metavar='INT', type=click.IntRange(min=2))
@click.option('--subset_seed',      help='Seed of the scored subset when there are more images', metavar='INT', type=int, default=0, show_default=True)
@click.option('--wandb',            help='Weights & Biases logging of the scores', type=click.Choice(['off', 'offline', 'online']), default='off', show_default=True)
@click.option('--watch',            help='Keep polling the run directory for new snapshots', is_flag=True)
@click.option('--compile', 'compile_net', help='torch.compile the network with frozen weights for long generations (the first batch compiles: minutes on CPU)', is_flag=True)
@click.option('--precision',        help='Precision of the network: auto (its training precision on CUDA, float32 elsewhere), fp32, bf16 (CUDA, or CPUs with AVX512-BF16/AMX) or fp16 (CUDA)', type=click.Choice(['auto', 'fp32', 'bf16', 'fp16']), default='auto', show_default=True)
@click.option('--poll',             help='Seconds between polls with --watch', metavar='SEC', type=click.FloatRange(min=0.1), default=60, show_default=True)
@detector_options
@command_body()
def generate(opts):
    """Generate images from every requested snapshot (skipping images already on disk) and optionally score them."""
    if opts.watch and not os.path.isdir(opts.network):
        raise click.BadParameter('--watch polls a run directory; --network is not one', param_hint='--watch')
    given = given_options()
    refuse_ignored(given, guidance_rules(opts) + [('class_grid', opts.class_idx is not None, 'it draws every class; '
                                                   'drop --class')])
    check_output_dir(opts.outdir)
    done, detector_cache = set(), {}
    while True:
        paths = snapshots.resolve_networks(opts.network, latest=opts.latest)
        for path in [p for p in paths if p not in done]:
            _process_snapshot(path, opts, detector_cache, given)
            done.add(path)
        if not opts.watch:
            break
        time.sleep(opts.poll)
    dist.print0('Done.')


@cli.command()
@network_options
@click.option('--data',             help='High-resolution images (the low-resolution input is made from them and they are scored against) or low-resolution ones (1/sr_factor of the network\'s size; nothing to score against)', metavar='ZIP|DIR', type=str, required=True)
@click.option('--outdir',           help='Where sr/, bicubic/, lowres/ (and ref/), metrics.jsonl and grids go', metavar='DIR', type=str, required=True)
@click.option('--seeds',            help='Images i (dataset index i, seed i of the sampler)', metavar='LIST', type=parse_int_list, default='0-63', show_default=True)
@click.option('--batch',            help='Images per batch', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@sampler_options
@sampling_mask_options
@click.option('--corruption_pattern', help='Sampling mask pattern of an ambient network  [default: the training one]', type=click.Choice(['dust', 'box', 'fixed_box', 'keep_patch']))
@command_body()
def superres(opts):
    """Super-resolve images with an SR3 network (train.py --task=superres); PSNR/SSIM against the bicubic baseline."""
    refuse_ignored(given_options(), guidance_rules(opts) + [
        ('num_masks', opts.num_masks > 1, 'super-resolution samples with one mask per image'),
        ('cfg_scale', opts.cfg_scale is not None, 'super-resolution runs without classifier-free guidance')])
    check_output_dir(opts.outdir)
    dataset = ImageFolderDataset(opts.data, mode='clean')
    paths = snapshots.resolve_networks(opts.network, latest=opts.latest)
    for path in paths:
        net, info = snapshots.load_network(path, device=dist.device(), training_options=opts.training_options,
                                             allow_unsafe_pickle=opts.allow_unsafe_pickle)
        refuse_ignored(given_options(), discrete_grid_rules(net, opts, path))
        factor = getattr(net, 'sr_factor', None)
        if not factor:
            raise click.ClickException(f'{path} is not a super-resolution network; train one with train.py --task=superres')
        if dataset.resolution not in (net.img_resolution, net.img_resolution // factor):
            raise click.ClickException(f'{opts.data} holds {dataset.resolution}x{dataset.resolution} images; {path} '
                                       f'super-resolves {net.img_resolution // factor} to {net.img_resolution}: pass '
                                       'either size (dataset_tool.py --resolution)')
        if max(opts.seeds) >= len(dataset):
            raise click.BadParameter(f'{opts.data} holds {len(dataset)} images; pass --seeds within 0-{len(dataset) - 1}',
                                     param_hint='--seeds')
        outdir = opts.outdir if len(paths) == 1 else os.path.join(opts.outdir, kimg_tag(info.nimg))
        sampler_kwargs = dict(num_steps=opts.steps, sigma_min=opts.sigma_min, sigma_max=opts.sigma_max, rho=opts.rho,
                              S_churn=opts.S_churn, S_min=opts.S_min, S_max=opts.S_max, S_noise=opts.S_noise,
                              solver=opts.solver, eta=opts.eta, variance=opts.ddpm_variance)
        corruption = sampling_corruption(info, opts)
        if info.ambient:
            sampler_kwargs.update(corruption=corruption, guidance_scale=opts.guidance_scale, clipping=opts.clipping)
        claim_output_dir(outdir, dict(network_sha256=file_digest(path), sampler={k: v for k, v in sampler_kwargs.items() if k != 'corruption'},
                                      corruption=corruption.to_dict() if corruption is not None else None,
                                      data=os.path.realpath(opts.data)))
        _superres_images(net, dataset, factor, opts.seeds, outdir, opts.batch, sampler_kwargs)
    dist.print0('Done.')


def _superres_images(net, dataset, factor, seeds, outdir, batch, sampler_kwargs):
    """Super-resolve every seed not yet done (split across processes), save the images and their scores."""
    high = dataset.resolution == net.img_resolution
    rank, world_size = dist.get_rank(), dist.get_world_size()
    todo = [s for s in seeds if not os.path.isfile(os.path.join(outdir, 'sr', f'{s:06d}.png'))]
    num_batches = max((len(todo) - 1) // (batch * world_size) + 1, 1) * world_size
    dist.print0(f'Super-resolving {len(todo)} of {len(seeds)} images to "{outdir}" ({len(seeds) - len(todo)} already there)...')
    rows = []
    for batch_seeds in tqdm.tqdm(np.array_split(np.array(todo, dtype=np.int64), num_batches)[rank::world_size],
                                 unit='batch', disable=rank != 0):
        batch_seeds = batch_seeds.tolist()
        if not batch_seeds:
            continue
        images = torch.stack([dataset[s][0] for s in batch_seeds]).to(dist.device())
        lowres = downsample(images, factor) if high else images
        outputs = dict(sr=inverse.superres_batch(net, lowres, batch_seeds, **sampler_kwargs),
                       bicubic=upsample_bicubic(lowres, factor).clamp(-1, 1), lowres=lowres)
        if high:
            outputs['ref'] = images
            ref = metrics.as_saved_unit(images)
            rows += [dict(seed=s, psnr=float(p), ssim=float(q), bicubic_psnr=float(bp), bicubic_ssim=float(bq))
                     for s, p, q, bp, bq in zip(batch_seeds, *(f(metrics.as_saved_unit(outputs[k]), ref) for k in ('sr', 'bicubic')
                                                               for f in (metrics.psnr, metrics.ssim)))]
        for kind in sorted(outputs, key=lambda k: k == 'sr'):  # sr/ last: its image marks the seed as done
            for seed, image in zip(batch_seeds, to_uint8(outputs[kind])):
                save_png(image, os.path.join(outdir, kind, f'{seed:06d}.png'))
    rows = [row for part in dist.all_gather_object(rows) for row in part]
    if dist.get_rank() == 0 and rows:
        with open(os.path.join(outdir, 'metrics.jsonl'), 'a', encoding='utf-8') as f:
            f.writelines(json.dumps(row) + '\n' for row in sorted(rows, key=lambda r: r['seed']))
    if dist.get_rank() == 0 and os.path.isfile(os.path.join(outdir, 'metrics.jsonl')):
        with open(os.path.join(outdir, 'metrics.jsonl'), encoding='utf-8') as f:
            done = {row['seed']: row for row in map(json.loads, f)}
        scored = [done[s] for s in seeds if s in done]
        mean = lambda key: (metrics.mean_psnr if 'psnr' in key else np.mean)([r[key] for r in scored])  # noqa: E731
        click.echo(f'\n{len(scored)} images: SR3 PSNR {mean("psnr"):.2f} dB, SSIM {mean("ssim"):.4f}; bicubic PSNR '
                   f'{mean("bicubic_psnr"):.2f} dB, SSIM {mean("bicubic_ssim"):.4f}')



DEFAULT_SIGMAS = '0.002,0.005,0.01,0.02,0.05,0.1,0.2,0.5,1,2,5,10'


def _parse_sigmas(ctx, param, value):
    try:
        sigmas = sorted({float(item) for item in value.split(',') if item.strip()})
    except ValueError:
        raise click.BadParameter(f'{value!r}: expected comma-separated numbers, e.g. {DEFAULT_SIGMAS}') from None
    low, high = SIGMA_RANGE
    if not sigmas or not all(low <= s <= high for s in sigmas):  # also refuses nan and inf
        raise click.BadParameter(f'{value!r}: noise levels must lie in [{low:g}, {high:g}]')
    return sigmas


def denoising_error_curve(net, info, dataset, seeds, sigmas, corruption, batch, device):
    """Per σ: mean squared error of D on the pixels the network sees and on those hidden from it (NaN if none)."""
    totals = None
    for start in tqdm.tqdm(range(0, len(seeds), batch), unit='batch', desc=f'kimg {info.kimg}', leave=False):
        chunk = seeds[start:start + batch]
        x0 = torch.stack([dataset[s][0] for s in chunk]).to(device)
        part = samplers.denoising_error(net, x0, chunk, sigmas, corruption=corruption)
        totals = part if totals is None else {k: np.add(totals[k], part[k]).tolist() for k in part}
    mean = lambda sums, count: [x / count if count else float('nan') for x in sums]  # noqa: E731
    return dict(network=info.path, kimg=info.kimg, sigmas=sigmas, num_images=len(seeds),
                mse_visible=mean(totals['visible'], totals['num_visible']),
                mse_hidden=mean(totals['hidden'], totals['num_hidden']),
                hidden_fraction=totals['num_hidden'] / (totals['num_hidden'] + totals['num_visible']))


def plot_denoising_error(path, rows):
    """Log-log plot of the errors against σ, one colour per snapshot: hidden pixels solid, visible dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, row in enumerate(rows):
        color = f'C{i % 10}'
        name = f'kimg {row["kimg"]:g}' if row['kimg'] is not None else os.path.basename(row['network'])
        if not all(np.isnan(row['mse_hidden'])):
            ax.plot(row['sigmas'], row['mse_hidden'], '-o', color=color, markersize=3, label=f'{name}, hidden')
        ax.plot(row['sigmas'], row['mse_visible'], '--', color=color, label=f'{name}, visible')
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('noise level σ')
    ax.set_ylabel('mean squared error of D(x; σ)')
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_write(path, 'wb') as f:
        fig.savefig(f, format='png')


def clean_references(dataset, seeds, data):
    """The seeds whose images are clean: a dataset with noise annotations holds noisy or corrupted images with no
    clean version, which cannot serve as references of a denoising error; they are left out, and said."""
    if not dataset.has_annotations:
        return list(seeds)
    clean = [s for s in seeds if dataset.annotation(s)[2] == 'clean']
    if not clean:
        raise click.ClickException(f'none of the {len(seeds)} images of --seeds is clean in {data} (all carry noise '
                                   'annotations): pass --seeds of clean images or a clean dataset')
    click.echo(f'{data} has noise annotations: the error is measured on the {len(clean)} clean images among --seeds; '
               f'{len(seeds) - len(clean)} noisy or corrupted ones have no clean reference and are left out')
    return clean


@cli.command()
@network_options
@click.option('--data',             help='Clean images (folder or zip made by dataset_tool.py; of a dataset with noise annotations, its clean images are used)', metavar='ZIP|DIR', type=str, required=True)
@click.option('--outdir',           help='Where denoising-error.jsonl and denoising-error.png go', metavar='DIR', type=str, required=True)
@click.option('--seeds',            help='Images i (dataset index i, seed i of mask and noise)', metavar='LIST', type=parse_int_list, default='0-63', show_default=True)
@click.option('--sigmas',           help='Noise levels', metavar='LIST', type=str, default=DEFAULT_SIGMAS, show_default=True, callback=_parse_sigmas)
@click.option('--batch',            help='Images per batch', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@sampling_mask_options
@click.option('--corruption_pattern', help='Mask pattern  [default: the training one]', type=click.Choice(['dust', 'box', 'fixed_box', 'keep_patch']))
@command_body(distributed=False)
def denoise(opts):
    """Denoising error per noise level on the pixels the network sees and on those hidden from it.

    For an ambient network, D = c_out(σ)·F on hidden pixels, so it must output x0/c_out there. Where the
    hidden error rises as σ falls, the network no longer predicts them: sample with --sigma_min above it.
    """
    check_output_dir(opts.outdir)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    dataset = ImageFolderDataset(opts.data, mode='clean')
    if max(opts.seeds) >= len(dataset) or min(opts.seeds) < 0:
        raise click.BadParameter(f'{opts.data} holds {len(dataset)} images; pass --seeds within 0-{len(dataset) - 1}',
                                 param_hint='--seeds')
    seeds = clean_references(dataset, opts.seeds, opts.data)
    rows = []
    for path in snapshots.resolve_networks(opts.network, latest=opts.latest):
        net, info = snapshots.load_network(path, device=device, training_options=opts.training_options,
                                             allow_unsafe_pickle=opts.allow_unsafe_pickle)
        channels = net.img_channels // 2 if info.ambient else net.img_channels
        shape = [channels, net.img_resolution, net.img_resolution]
        if dataset.image_shape != shape:
            raise click.ClickException(f'{opts.data} holds images of shape {dataset.image_shape} but {path} '
                                       f'denoises {shape}; convert the data with dataset_tool.py')
        corruption = sampling_corruption(info, opts)
        rows.append(denoising_error_curve(net, info, dataset, seeds, opts.sigmas, corruption, opts.batch, device))
        row = rows[-1]
        click.echo(f'\n{path} (kimg {info.kimg}); {row["hidden_fraction"]:.1%} of pixels hidden from the network')
        click.echo(f'{"sigma":>8} {"MSE visible":>12} {"MSE hidden":>12}')
        for sigma, vis, hid in zip(row['sigmas'], row['mse_visible'], row['mse_hidden']):
            click.echo(f'{sigma:>8g} {vis:>12.5f} {hid:>12.5f}')
    os.makedirs(opts.outdir, exist_ok=True)
    with atomic_write(os.path.join(opts.outdir, 'denoising-error.jsonl'), 'w') as f:
        f.writelines(json.dumps(row) + '\n' for row in rows)
    plot_denoising_error(os.path.join(opts.outdir, 'denoising-error.png'), rows)
    click.echo(f'\nWrote {opts.outdir}/denoising-error.jsonl and denoising-error.png')


@cli.command()
@network_options
@click.option('--data',             help='Test images, 8-bit (zip or folder made by dataset_tool.py)', metavar='ZIP|DIR', type=str, required=True)
@click.option('--outdir',           help='Where bpd.jsonl goes (one row per snapshot; a rerun skips the rows there)', metavar='DIR', type=str, required=True)
@click.option('--seeds',            help='Images i (dataset index i, seed i of its times and noises)  [default: all]', metavar='LIST', type=parse_int_list)
@click.option('--num_t',            help='Time samples per image (low-discrepancy over [0, 1))', metavar='INT', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--batch',            help='Images per batch and process', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--T', 'T',           help='Discrete-time bound with T steps  [default: continuous time]', metavar='INT', type=click.IntRange(min=1))
@click.option('--gamma_min',        help='Networks without a schedule (EDM, VP, DDPM): γ(0) of the fixed linear schedule  [default: -13.3]', metavar='FLOAT', type=float)
@click.option('--gamma_max',        help='Networks without a schedule: γ(1)  [default: 5]', metavar='FLOAT', type=float)
@command_body()
def bpd(opts):
    """Test-set bits/dim: the VDM bound (prior, reconstruction, diffusion) per image, mean ± standard error.

    VDM networks use their own schedule; any other clean network (EDM, VP, VE, DDPM) is scored through the same
    continuous-time bound with its ε̂ = (x − D(x; σ))/σ and the fixed linear schedule --gamma_min..--gamma_max.
    """
    check_output_dir(opts.outdir)
    dataset = ImageFolderDataset(opts.data, mode='clean', normalize=False)
    seeds = opts.seeds if opts.seeds is not None else list(range(len(dataset)))
    if not seeds or max(seeds) >= len(dataset) or min(seeds) < 0:
        raise click.BadParameter(f'{opts.data} holds {len(dataset)} images; pass --seeds within 0-{len(dataset) - 1}',
                                 param_hint='--seeds')
    dest = os.path.join(opts.outdir, 'bpd.jsonl')
    rows = _read_rows(dest)
    seeds_digest = hashlib.sha256(','.join(map(str, seeds)).encode()).hexdigest()
    for path in snapshots.resolve_networks(opts.network, latest=opts.latest):
        net, info = snapshots.load_network(path, device=dist.device(), training_options=opts.training_options,
                                             allow_unsafe_pickle=opts.allow_unsafe_pickle)
        schedule = _bpd_schedule(net, info, dataset, opts, path)
        key = dict(network_sha256=file_digest(path), data=os.path.realpath(opts.data), seeds_sha256=seeds_digest,
                   num_t=opts.num_t, T=opts.T, gamma_min=opts.gamma_min, gamma_max=opts.gamma_max)
        if any(all(row.get(k) == v for k, v in key.items()) for row in rows):
            dist.print0(f'{path}: already in {dest}; skipped')
            continue
        data = ImageFolderDataset(opts.data, mode='clean', normalize=False, use_labels=True) if net.label_dim else dataset
        bits = _image_bits(net, schedule, data, seeds, opts, info)  # conditional networks: bits/dim of p(x | class)
        row = dict(network=os.path.abspath(path), kimg=info.kimg, **key, num_images=len(seeds), schedule=schedule.kind,
                   conditional=bool(net.label_dim))
        for name in (*vdm.TERMS, 'total'):
            values = bits[name]
            row[f'bpd_{name}'] = float(values.mean())
            row[f'bpd_{name}_se'] = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None
        rows.append(row)
        dist.print0(f'{path} (kimg {info.kimg}): {row["bpd_total"]:.4f} ± {row["bpd_total_se"] or 0:.4f} bits/dim = prior '
                    f'{row["bpd_prior"]:.4f} + reconstruction {row["bpd_reconstruction"]:.4f} + diffusion '
                    f'{row["bpd_diffusion"]:.4f} ({len(seeds)} images x {opts.num_t} times)')
        if dist.get_rank() == 0:
            os.makedirs(opts.outdir, exist_ok=True)
            with atomic_write(dest, 'w') as f:
                f.writelines(json.dumps(r) + '\n' for r in rows)
    dist.print0(f'Wrote {dest}')


def _read_rows(path):
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _bpd_schedule(net, info, dataset, opts, path):
    """The schedule of the bound for `net` (its own, or the fixed linear one); one-line errors for what cannot be
    scored."""
    if info.ambient or getattr(net, 'sr_factor', None):
        raise click.ClickException(f'{path} is {"an ambient" if info.ambient else "a super-resolution"} network; bits/dim '
                                   'are scored for clean unconditional or class-conditional networks')
    shape = [net.img_channels, net.img_resolution, net.img_resolution]
    if dataset.image_shape != shape:
        raise click.ClickException(f'{opts.data} holds images of shape {dataset.image_shape} but {path} models {shape}; '
                                   'convert the data with dataset_tool.py')
    own = getattr(net, 'schedule', None)
    if own is not None:
        refuse_ignored(given_options(), [(name, True, f'{path} has its own schedule') for name in ('gamma_min', 'gamma_max')])
        return own
    try:
        schedule = vdm.NoiseSchedule('fixed_linear', opts.gamma_min if opts.gamma_min is not None else -13.3,
                                     opts.gamma_max if opts.gamma_max is not None else 5.0).to(dist.device())
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint='--gamma_min/--gamma_max') from None
    lowest = float(np.exp(schedule.gamma_min / 2) / vdm.DATA_SCALE)
    if lowest < getattr(net, 'sigma_min', 0):
        dist.print0(f'Note: the bound reaches σ = {lowest:.4g}, below the lowest level {path} was trained at '
                    f'({net.sigma_min:.4g}); raise --gamma_min to {2 * np.log(net.sigma_min * vdm.DATA_SCALE):.2f} to '
                    'stay within it (the reconstruction term then grows)')
    return schedule


def _image_bits(net, schedule, dataset, seeds, opts, info):
    """Per-image bits/dim of `seeds`, split over processes and gathered (float64 arrays, in seed order)."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    mine = seeds[rank::world_size]
    parts = {name: [] for name in (*vdm.TERMS, 'total')}
    for start in tqdm.tqdm(range(0, len(mine), opts.batch), unit='batch', desc=f'bpd kimg {info.kimg}',
                           disable=rank != 0):
        chunk = mine[start:start + opts.batch]
        items = [dataset[s] for s in chunk]
        k = torch.stack([item[0] for item in items]).long().to(dist.device())
        labels = torch.stack([torch.as_tensor(item[1]) for item in items]).to(dist.device()) if net.label_dim else None
        bits = vdm.image_bits(net, schedule, k, opts.num_t, [seeded_generator(9, s) for s in chunk], T=opts.T,
                              class_labels=labels)
        for name in parts:
            parts[name] += [(s, float(v)) for s, v in zip(chunk, bits[name])]
    gathered = {name: sorted(pair for part in dist.all_gather_object(values) for pair in part)
                for name, values in parts.items()}
    return {name: np.array([v for _, v in pairs]) for name, pairs in gathered.items()}


@cli.command(hidden=True)
@click.option('--network',          help='Run directory or snapshot (.pkl of the original, .pt of ours); images with --skip_generation', metavar='PATH|DIR', type=str, required=True)
@click.option('--ref',              help='Reference statistics', metavar='NPZ|URL', type=str)
@click.option('--outdir',           help='Where to save the images', metavar='DIR', type=str, required=True)
@click.option('--experiment_name',  help='wandb run name', metavar='STR', type=str)
@click.option('--wandb_id',         help='wandb run id to resume', metavar='STR', type=str, default='')
@click.option('--with_wandb',       help='Log to wandb (online, or as WANDB_MODE says)', metavar='BOOL', type=bool, default=True, show_default=True)
@click.option('--training_options_loc', help='training_options.json of the .pkl snapshots', metavar='JSON', type=str)
@click.option('--seeds',            help='Random seeds, cut to the first --num', metavar='LIST', type=parse_int_list, default='0-63', show_default=True)
@click.option('--subdirs',          help='Subdirectory for every 1000 seeds', is_flag=True)
@click.option('--class', 'class_idx', help='Class label', metavar='INT', type=click.IntRange(min=0))
@click.option('--corruption_probability', help='p of the sampling masks (dust)', metavar='FLOAT', type=click.FloatRange(0, 1, max_open=True), default=0.4, show_default=True)
@click.option('--delta_probability', help='δ of the sampling masks', metavar='FLOAT', type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True)
@click.option('--mask_full_rgb',    help='Share a pixel\'s sampling mask over channels', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--num_masks',        help='Masks per sample', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--guidance_scale',   help='The original\'s guidance λ', metavar='FLOAT', type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option('--num',              help='Images to generate and score', metavar='INT', type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed',             help='Seed of the scored subset', metavar='INT', type=int, default=0, show_default=True)
@click.option('--eval_step',        help='Evaluate every eval_step-th snapshot', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--skip_generation',  help='Score the images in --network', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--skip_calculation', help='Generate only', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--num_classes',      help='Number of classes (checked against the network)', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--steps',            help='Sampling steps', metavar='INT', type=click.IntRange(min=1), default=18, show_default=True)
@click.option('--sigma_min',        help='Lowest noise level', metavar='FLOAT', type=float, default=0.002, show_default=True, callback=sigma_range_check)
@click.option('--sigma_max',        help='Highest noise level', metavar='FLOAT', type=float, default=80, show_default=True, callback=sigma_range_check)
@click.option('--rho',              help='Time step exponent', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=7, show_default=True)
@click.option('--S_churn', 'S_churn', help='Stochasticity strength', metavar='FLOAT', type=click.FloatRange(min=0), default=0, show_default=True)
@click.option('--S_min', 'S_min',   help='Stoch. min noise level', metavar='FLOAT', type=click.FloatRange(min=0), default=0, show_default=True)
@click.option('--S_max', 'S_max',   help='Stoch. max noise level', metavar='FLOAT', type=click.FloatRange(min=0), default='inf', show_default=True)
@click.option('--S_noise', 'S_noise', help='Stoch. noise inflation', metavar='FLOAT', type=float, default=1, show_default=True)
@click.option('--solver',           help='ODE solver', type=click.Choice(['heun', 'euler']), default='heun', show_default=True)
@click.option('--disc', '--schedule', '--scaling', 'unsupported', help='Not supported (the original crashed on them)', type=str)
@detector_options
@command_body()
def original(opts):
    """The original ambient-diffusion eval.py: generate from every --eval_step-th snapshot, then FID/IS."""
    if opts.unsupported is not None:
        raise click.UsageError('--disc/--schedule/--scaling crashed the original sampler; the EDM schedule is the only '
                               'one here: drop the option')
    if opts.skip_generation and opts.skip_calculation:
        raise click.UsageError('--skip_generation and --skip_calculation together leave nothing to do; drop one')
    if not opts.skip_calculation and opts.ref is None:
        raise click.UsageError('--ref is needed to score the images (or pass --skip_calculation=True)')
    wandb_mode = os.environ.get('WANDB_MODE', 'online') if opts.with_wandb else 'off'
    wandb_mode = 'off' if wandb_mode == 'disabled' else wandb_mode
    score = dnnlib.EasyDict(opts, num=opts.num, wandb=wandb_mode, outdir=opts.outdir)
    if opts.skip_generation:
        return score_images(opts.network, score)
    check_output_dir(opts.outdir)
    gen = dnnlib.EasyDict(opts, training_options=opts.training_options_loc, seeds=opts.seeds[:opts.num], latest=False,
        resample_guidance_masks=False, clipping='static', guidance_units='original', corruption_pattern='dust',
        ref=None if opts.skip_calculation else opts.ref, subset_seed=opts.seed, wandb=wandb_mode, watch=False)
    paths = snapshots.resolve_networks(opts.network)[::opts.eval_step]
    detector_cache = {}
    for path in paths:
        _process_snapshot(path, gen, detector_cache, given=given_options())


main = cli

if __name__ == '__main__':
    main()
