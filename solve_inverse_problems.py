"""Solve inverse problems with a trained model: DPS posterior sampling (Chung et al. 2023) as in Ambient
Diffusion (Daras et al. 2023, Sec. 5), scored with PSNR and SSIM against the ground truth.

    python solve_inverse_problems.py --network=runs/00000-... --latest --measurements_path=test.zip \
        --outdir=out --corruption_pattern=averaging --downsampling_factor=4 --seeds=0-63
    torchrun --standalone --nproc_per_node=8 solve_inverse_problems.py ...

Image i of the run is dataset index i measured with the operator parameters of seed i and sampled with the
latents of seed i, so results do not depend on batch size or process count. Per image it writes
`{outdir}/{ref,measurement,reconstruction,baseline}/{seed:06d}.png` (measurement only when y is image-shaped,
baseline = the operator's naive inverse), grids `{outdir}/grid-*.png`, and one line per image in
`{outdir}/metrics.jsonl`. A run directory with several snapshots gets one such folder per snapshot,
`{outdir}/{kimg}/`. Images whose reconstruction exists are skipped; the summary still counts them.

Options that differ from the original: `--operator_corruption_probability` defaults to 0.4 for the masks (as
the original) but 1 for averaging (every image downsampled); the motion blur intensity is `--intensity`
(the original read it from --kernel_std and crashed at its default); `--norm` picks the DPS norm.
"""

import json
import os
import time

import click
import numpy as np
import PIL.Image
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils.ambient_diffusion import get_operator
from torch_utils.images import save_image_grid, save_png, to_uint8
from torch_utils.misc import parse_int_list
from training import cli, inverse, metrics, samplers, snapshots
from training.dataset import ImageFolderDataset
from training.metrics import psnr, ssim  # noqa: F401 (scores of this command; tests use them from here)
from training.snapshots import kimg_tag

KINDS = ('ref', 'measurement', 'reconstruction', 'baseline')
# Which operators (--corruption_pattern) use each operator option.
OPERATOR_OPTIONS = dict(operator_corruption_probability=('dust', 'box_masking', 'averaging'),
                        operator_mask_full_rgb=('dust',), downsampling_factor=('averaging',),
                        blur_type=('blurring',), kernel_size=('blurring',), kernel_std=('blurring',),
                        intensity=('blurring',), num_measurements=('compressed_sensing',))
# The options that decide the outputs (recorded in the output directory's provenance.json with the network).
OUTPUT_OPTIONS = ('corruption_pattern', 'operator_corruption_probability', 'operator_mask_full_rgb', 'downsampling_factor',
                  'blur_type', 'kernel_size', 'kernel_std', 'intensity', 'num_measurements', 'dps_scale', 'norm',
                  'corruption_probability', 'delta_probability', 'mask_full_rgb', 'steps', 'sigma_min', 'sigma_max',
                  'rho', 'S_churn', 'S_min', 'S_max', 'S_noise', 'solver', 'num_masks', 'guidance_scale', 'clipping',
                  'guidance_units', 'subdirs', 'class_idx', 'eta', 'ddpm_variance', 'cfg_scale', 'method', 'jump_length',
                  'jump_n_sample')

# ---------------------------------------------------------------------------------------------
# Solving.


def _sampler_corruption(info, opts):
    """The sampling masks of an ambient network: the snapshot's training corruption with the overrides."""
    return cli.sampling_corruption(info, dnnlib.EasyDict(corruption_pattern=None,
        corruption_probability=opts.corruption_probability, delta_probability=opts.delta_probability,
        mask_full_rgb=opts.mask_full_rgb, num_masks=opts.num_masks))


def build_operator(opts):
    p = opts.operator_corruption_probability
    if p is None and opts.corruption_pattern in ('dust', 'box_masking'):
        p = 0.4
    return get_operator(opts.corruption_pattern, corruption_probability=p, mask_full_rgb=opts.operator_mask_full_rgb,
        downsampling_factor=opts.downsampling_factor, blur_type=opts.blur_type, kernel_size=opts.kernel_size,
        kernel_std=opts.kernel_std, num_measurements=opts.num_measurements, intensity=opts.intensity)


def _load_refs(dataset, seeds, net, device):
    """Ground truth x0 [N, C, H, W] in [−1, 1]: dataset index s for seed s."""
    if min(seeds) < 0 or max(seeds) >= len(dataset):
        raise ValueError(f'seeds {min(seeds)}..{max(seeds)} are dataset indices, but {dataset.name} holds '
                         f'{len(dataset)} images; pass --seeds within 0-{len(dataset) - 1}')
    channels = net.img_channels // 2 if getattr(net, 'ambient', False) else net.img_channels
    shape = [channels, net.img_resolution, net.img_resolution]
    if dataset.image_shape != shape:
        raise ValueError(f'{dataset.name} holds images of shape {dataset.image_shape} but the network makes {shape}; '
                         f'convert the measurements with dataset_tool.py')
    return torch.stack([dataset[s][0] for s in seeds]).to(device)


def solve_images(net, info, operator, dataset, seeds, outdir, opts, device=None):
    """Reconstruct, save and score every seed not yet done (seeds split across processes); returns the count."""
    device = torch.device(device) if device is not None else dist.device()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    corruption = _sampler_corruption(info, opts)
    sampler_kwargs = dict(num_steps=opts.steps, sigma_min=opts.sigma_min, sigma_max=opts.sigma_max, rho=opts.rho,
        S_churn=opts.S_churn, S_min=opts.S_min, S_max=opts.S_max, S_noise=opts.S_noise, solver=opts.solver,
        guidance_scale=opts.guidance_scale, clipping=opts.clipping, guidance_units=opts.guidance_units,
        eta=opts.eta, variance=opts.ddpm_variance)
    if opts.get('cfg_scale') is not None:
        net = samplers.ClassifierFreeGuidance(net, opts.cfg_scale)
    if info.ambient:
        sampler_kwargs.update(corruption=corruption, num_masks=opts.num_masks)
    subdirs = opts.get('subdirs', False)
    todo = [s for s in seeds if not os.path.isfile(cli.image_path(os.path.join(outdir, 'reconstruction'), s, subdirs))]
    num_batches = max((len(todo) - 1) // (opts.batch * world_size) + 1, 1) * world_size
    rank_batches = np.array_split(np.array(todo, dtype=np.int64), num_batches)[rank::world_size]
    dist.print0(f'Solving {len(todo)} of {len(seeds)} images to "{outdir}" ({len(seeds) - len(todo)} already there)...')
    count = 0
    for batch_seeds in rank_batches:
        batch_seeds = batch_seeds.tolist()
        if not batch_seeds:
            continue
        x0 = _load_refs(dataset, batch_seeds, net, device)
        y, params = inverse.measure(operator, x0, batch_seeds)
        start = time.time()
        x_hat = inverse.solve_batch(net, operator, y, params, batch_seeds,
                                     opts.dps_scale if opts.method == 'dps' else 0.0, norm=opts.norm, method=opts.method,
                                     jump_length=opts.jump_length, jump_n_sample=opts.jump_n_sample,
                                     class_labels=opts.get('class_idx'),
                                     device=device, **sampler_kwargs)
        seconds = (time.time() - start) / len(batch_seeds)
        baseline = operator.naive_inverse(y, params).clamp(-1, 1)
        images = dict(ref=x0, reconstruction=x_hat, baseline=baseline)
        if operator.measurement_is_image:
            images['measurement'] = y.clamp(-1, 1)
        ref = metrics.as_saved_unit(x0)
        scores = {kind: (psnr(metrics.as_saved_unit(images[kind]), ref), ssim(metrics.as_saved_unit(images[kind]), ref))
                  for kind in ('reconstruction', 'baseline')}
        lines = [json.dumps(dict(seed=seed, psnr=float(scores['reconstruction'][0][i]),
                                 ssim=float(scores['reconstruction'][1][i]), baseline_psnr=float(scores['baseline'][0][i]),
                                 baseline_ssim=float(scores['baseline'][1][i]), seconds=seconds)) + '\n'
                 for i, seed in enumerate(batch_seeds)]
        # The reconstruction is written last: its presence means the image and its metrics line are complete.
        for kind in ('ref', 'measurement', 'baseline'):
            if kind in images:
                for seed, image in zip(batch_seeds, to_uint8(images[kind])):
                    save_png(image, _path(outdir, kind, seed, subdirs))
        with open(os.path.join(outdir, 'metrics.jsonl'), 'a', encoding='utf-8') as f:
            f.write(''.join(lines))
        for seed, image in zip(batch_seeds, to_uint8(x_hat)):
            save_png(image, _path(outdir, 'reconstruction', seed, subdirs))
        count += len(batch_seeds)
        dist.print0(f'seeds {batch_seeds[0]}..{batch_seeds[-1]}: {seconds:.2f} s/image')
    dist.barrier()
    return count


def _path(outdir, kind, seed, subdirs=False):
    path = cli.image_path(os.path.join(outdir, kind), seed, subdirs)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def save_grids(outdir, seeds, subdirs=False):
    """`{outdir}/grid-{kind}.png`: the first 64 seeds of each kind, 8 per row."""
    for kind in KINDS:
        paths = [cli.image_path(os.path.join(outdir, kind), s, subdirs) for s in seeds[:64]]
        paths = [p for p in paths if os.path.isfile(p)]
        if paths:
            grid = np.stack([np.array(PIL.Image.open(p)) for p in paths])
            grid = grid[..., None] if grid.ndim == 3 else grid
            save_image_grid(torch.from_numpy(grid).permute(0, 3, 1, 2), os.path.join(outdir, f'grid-{kind}.png'), grid_w=8)


def summarize(outdir, seeds):
    """Mean scores over the requested seeds from `{outdir}/metrics.jsonl` (the last line of each seed)."""
    rows = {}
    metrics_path = os.path.join(outdir, 'metrics.jsonl')
    if os.path.isfile(metrics_path):
        with open(metrics_path, encoding='utf-8') as f:
            for line in f:
                row = json.loads(line)
                rows[row['seed']] = row
    rows = [rows[s] for s in seeds if s in rows]
    keys = ('psnr', 'ssim', 'baseline_psnr', 'baseline_ssim', 'seconds')
    average = lambda k: metrics.mean_psnr([r[k] for r in rows]) if 'psnr' in k else float(np.mean([r[k] for r in rows]))  # noqa: E731
    summary = {k: average(k) if rows else float('nan') for k in keys}
    summary['num_images'] = len(rows)
    return summary


def _print_summary(summary, outdir):
    dist.print0(f'\nSummary of {summary["num_images"]} images in {outdir}')
    dist.print0(f'{"method":<10} {"PSNR (dB)":>10} {"SSIM":>8}')
    dist.print0(f'{summary.get("method", "dps"):<10} {summary["psnr"]:>10.3f} {summary["ssim"]:>8.4f}')
    dist.print0(f'{"baseline":<10} {summary["baseline_psnr"]:>10.3f} {summary["baseline_ssim"]:>8.4f}')
    dist.print0(f'seconds per image: {summary["seconds"]:.3f}')


def solve(opts):
    """Run every requested snapshot; returns {snapshot path: summary}."""
    pattern = opts.corruption_pattern
    cli.refuse_ignored(cli.given_options(), cli.guidance_rules(opts) + [
        ('num', opts.ref is None, 'it is the number of images --ref scores'),
        ('seed', opts.ref is None, 'it picks the subset --ref scores'),
        ('detector', opts.ref is None, 'it scores the images for --ref'),
        ('dps_scale', opts.method != 'dps', f'--method={opts.method} replaces known pixels instead of a DPS term'),
        ('norm', opts.method != 'dps', f'--method={opts.method} has no DPS term'),
        ('jump_length', opts.method != 'repaint', 'it is RePaint\'s; add --method=repaint'),
        ('jump_n_sample', opts.method != 'repaint', 'it is RePaint\'s; add --method=repaint')] + [
        (name, pattern not in users, f'--corruption_pattern={pattern} does not use it')
        for name, users in OPERATOR_OPTIONS.items()] + [
        ('kernel_std', opts.blur_type != 'gaussian', f'--blur_type={opts.blur_type} does not use it'),
        ('intensity', opts.blur_type != 'motion', f'--blur_type={opts.blur_type} does not use it')])
    if opts.method != 'dps' and pattern not in ('dust', 'box_masking'):
        raise click.UsageError(f'--method={opts.method} replaces known pixels: it needs an inpainting operator '
                               f'(--corruption_pattern=dust or box_masking), not {pattern}')
    if opts.method != 'dps' and opts.solver == 'dpmpp2m':
        raise click.UsageError(f'--solver=dpmpp2m reuses the previous step, which --method={opts.method} breaks by '
                               'replacing pixels; use heun, euler, ddim or ddpm')
    cli.check_output_dir(opts.outdir)
    operator = build_operator(opts)
    dataset = ImageFolderDataset(opts.measurements_path, mode='clean')
    paths = snapshots.resolve_networks(opts.network, latest=opts.latest)
    summaries = {}
    for path in paths:
        net, info = snapshots.load_network(path, device=dist.device(), training_options=opts.training_options,
                                             allow_unsafe_pickle=opts.allow_unsafe_pickle)
        cli.refuse_ignored(cli.given_options(), cli.discrete_grid_rules(net, opts, path))
        tag = kimg_tag(info.nimg) if info.nimg is not None else os.path.splitext(os.path.basename(path))[0]
        outdir = opts.outdir if len(paths) == 1 else os.path.join(opts.outdir, tag)
        # Inputs that do not fit fail here, before anything is written.
        if opts.num_classes and opts.num_classes != info.label_dim:
            raise click.UsageError(f'--num_classes={opts.num_classes} but {path} has {info.label_dim} classes')
        _sampler_corruption(info, opts)
        inverse.measure(operator, _load_refs(dataset, [min(opts.seeds), max(opts.seeds)], net, 'cpu')[:1], opts.seeds[:1])
        cli.claim_output_dir(outdir, dict(network_sha256=cli.file_digest(path), **{key: opts[key] for key in OUTPUT_OPTIONS},
                                          measurements=os.path.realpath(opts.measurements_path)))
        dist.print0(f'Network {path} ({info.format}, kimg {info.kimg}); operator {operator}')
        solve_images(net, info, operator, dataset, opts.seeds, outdir, opts)
        if dist.get_rank() == 0:
            save_grids(outdir, opts.seeds, opts.subdirs)
            summaries[path] = dict(summarize(outdir, opts.seeds), method=opts.method)
            _print_summary(summaries[path], outdir)
        if opts.ref is not None:  # the original's FID of the reconstructions, into {outdir}/fid/metrics.jsonl
            cli.score_images(os.path.join(outdir, 'reconstruction'), dnnlib.EasyDict(opts, num=opts.num or len(opts.seeds),
                             workers=0, wandb='off', outdir=os.path.join(outdir, 'fid')), extra=dict(network=path))
    return summaries

# ---------------------------------------------------------------------------------------------
# Command line.


@click.command()
@cli.network_options
@click.option('--outdir',             help='Where to save the results', metavar='DIR', type=str, required=True)
@click.option('--measurements_path',  help='Ground-truth images (folder or zip made by dataset_tool.py)', metavar='DIR|ZIP', type=str, required=True)
@click.option('--seeds',              help='Images i (dataset index i, seed i), e.g. 0-15', metavar='LIST', type=parse_int_list, default='0-15', show_default=True)
@click.option('--batch',              help='Images per batch and process', metavar='INT', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--corruption_pattern', help='Measurement operator', type=click.Choice(['dust', 'box_masking', 'averaging', 'blurring', 'compressed_sensing']), default='averaging', show_default=True)
@click.option('--operator_corruption_probability', help='p of the operator  [default: 0.4 for dust/box_masking, 1 for averaging]', metavar='FLOAT', type=click.FloatRange(0, 1))
@click.option('--operator_mask_full_rgb', help='Dust operator: share a pixel\'s mask over channels', metavar='BOOL', type=bool, default=True, show_default=True)
@click.option('--downsampling_factor', help='Averaging: downsampling factor', metavar='INT', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--blur_type',          help='Blurring: kernel type', type=click.Choice(['gaussian', 'motion']), default='gaussian', show_default=True)
@click.option('--kernel_size',        help='Blurring: kernel size (odd)', metavar='INT', type=click.IntRange(min=1), default=9, show_default=True)
@click.option('--kernel_std',         help='Gaussian blur: std in pixels', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=3.0, show_default=True)
@click.option('--intensity',          help='Motion blur: intensity', metavar='FLOAT', type=click.FloatRange(0, 1), default=0.5, show_default=True)
@click.option('--num_measurements',   help='Compressed sensing: measurements m', metavar='INT', type=click.IntRange(min=2), default=32, show_default=True)
@click.option('--method',             help='dps (any operator), or for inpainting replace (known pixels noised to each level) or repaint (replace plus RePaint\'s resampling jumps)', type=click.Choice(['dps', 'replace', 'repaint']), default='dps', show_default=True)
@click.option('--jump_length',        help='RePaint: levels to go back up at each jump', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--jump_n_sample',      help='RePaint: passes through each jump (1 = no resampling)', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--dps_scale',          help='DPS weight ζ', metavar='FLOAT', type=click.FloatRange(0, 100), default=5.0, show_default=True)
@click.option('--norm',               help='DPS residual norm (batch = the original\'s, couples samples)', type=click.Choice(list(inverse.DPS_NORMS)), default='per_sample', show_default=True)
@click.option('--ref',                help='Also score the reconstructions (FID/IS) against these statistics, as the original could', metavar='NPZ|URL', type=str)
@click.option('--num', '--num_images', 'num', help='Reconstructions to score  [default: all seeds]', metavar='INT', type=click.IntRange(min=2))
@click.option('--seed',               help='Seed of the scored subset when there are more', metavar='INT', type=int, default=0, show_default=True)
@click.option('--detector',           help='Inception detector for --ref', metavar='PATH|URL', type=str, default=metrics.INCEPTION_URL, show_default=True)
@click.option('--subdirs',            help='Put images in subdirectories of 1000 seeds', is_flag=True)
@click.option('--class', 'class_idx', help='Class label of a conditional network  [default: random]', metavar='INT', type=click.IntRange(min=0))
@click.option('--num_classes',        help='Number of classes the network must have (checked)', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@cli.sampling_mask_options
@cli.sampler_options
@cli.command_body()
def main(opts):
    """Solve inverse problems (inpainting, super-resolution, deblurring, compressed sensing) with DPS."""
    solve(opts)
    dist.print0('Done.')


if __name__ == '__main__':
    main()
