"""Sampler speed: seconds per image and network evaluations of the ambient sampler (training/samplers.py), and
the solvers compared on the demo model.

    python bench/bench_sampler.py --configs=small --batch=8 --num_masks=1,3 --guidance_scale=0.1 --variants=ours,ours_cl,original --rounds=3
    python bench/bench_sampler.py --configs=small,ddpmpp32 --num_masks=1,3 --guidance_scale=0.5 --device=cuda
    python bench/bench_sampler.py --solvers=ddpm,ddim,euler,heun --steps=5,10,18,35,60 --docs=docs

With --solvers (needs `make demo`): the demo's ambient model (--network) samples --samples images per solver and
step count from the same initial noise and sampling masks (per-seed generators); each row reports wall time,
network evaluations (NFE) and the digit-feature Fréchet distance against the digits (`training.digit_score`,
the demo's classifier). Writes solvers.md, solvers.png (FD vs NFE per solver) and solvers-samples.png (the
same seeds from every solver at one step count, timings in the labels) to --outdir (and --docs). --precisions=fp32,bf16
runs every solver with the network in float32 and in bfloat16 (rows 'heun bf16'...), on the same seeds.

Networks (random weights: speed does not depend on training), ambient input [image, mask] 2C=6 -> C=3,
32x32, EDMPrecond + SongUNet (DDPM++):
  small     the original's small config: model_channels 32, channel_mult [1,2,2,2], 4 blocks, attention at 16
  ddpmpp32  EDM's CIFAR-10 DDPM++: model_channels 128, channel_mult [2,2,2], 4 blocks, attention at 16
Variants (--variants), measured side by side in alternating --rounds:
  ours      `generate_batch` (per-seed latents and dust masks, p=0.4, δ=0.1) with EDM's Heun sampler on our
            network (single-sigmoid gates from one convolution, C outputs). K = 1 runs without autograd; K > 1
            uses reconstruction guidance (w = --guidance_scale), K masks in one network call per stage.
  ours_cl   the same with the network in channels-last memory format
  ours_compiled  the same under `samplers.compile_for_sampling` (eval.py generate --compile): torch.compile
            with frozen weights; the warm-up compiles (minutes), the timed runs reuse it
  ours_bf16, ours_compiled_bf16  the same with the network in bfloat16 (eval.py generate --precision=bf16; fast
            on CPUs with AVX512-BF16 or AMX); the trajectory stays float64. The original cannot run reduced precision
            off CUDA (its use_fp16 applies on CUDA only), so it stays float32
  original  the original's sampler (`original_sampler`: K network calls per stage on x with requires_grad, the
            guidance gradient through the network at every stage even when zero) on the original's network
            formulation (double-sigmoid gates from two convolutions, 2C outputs), same latents and masks
A forward hook counts network calls and the images they process.
"""

import json
import os
import shutil
import statistics
import sys
import time

import click
import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from dnnlib.util import atomic_write  # noqa: E402
from torch_utils.ambient_diffusion import MaskCorruption  # noqa: E402
from torch_utils.misc import StackedRandomGenerator  # noqa: E402
from training import digit_score, networks, samplers, snapshots  # noqa: E402
from training.dataset import ImageFolderDataset  # noqa: E402

CONFIGS = {
    'small': dict(model_channels=32, channel_mult=[1, 2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.10),
    'ddpmpp32': dict(model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.13),
}
VARIANTS = ('ours', 'ours_cl', 'ours_compiled', 'ours_bf16', 'ours_compiled_bf16', 'original')


def build_net(config, device, original=False, channels_last=False, bf16=False):
    """The config's ambient network: ours (single-sigmoid gates from one convolution, C outputs; in bfloat16 with
    `bf16`) or, `original`, the original's formulation (double-sigmoid gates, 2C outputs; sampled under
    `separate_gate_convolutions`)."""
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=32, img_channels=6, ambient=True, model_type='SongUNet',
                              gate='double_sigmoid' if original else 'sigmoid', out_channels=6 if original else None,
                              use_fp16='bf16' if bf16 else False, **CONFIGS[config])
    net = net.eval().requires_grad_(False).to(device)
    return net.to(memory_format=torch.channels_last) if channels_last else net


def original_sampler(net, latents, masks, num_steps=18, guidance_scale=0.0):
    """The original's sampler loop (ambient-diffusion eval.py; upstream-behaviour §2.13), for timing: at every
    Heun stage the K denoisers run as K network calls on x with requires_grad, and the guidance gradient
    ∇_x[½K·Σ_j‖D_0 − D_j‖²] is taken through the network even when it is zero (K = 1 or λ = 0)."""
    n, k, c = masks.shape[:3]
    t_steps = samplers.edm_time_steps(num_steps, 0.002, 80, 7, net=net, device=latents.device)

    def stage(x, t):
        x = x.detach().requires_grad_(True)
        D = [net(torch.cat([masks[:, j] * x, masks[:, j]], dim=1), t).to(torch.float64)[:, :c].clamp(-1, 1)
             for j in range(k)]
        stacked = torch.stack(D).flatten(1)                                                  # [K, N·C·H·W]
        loss = 0.5 * k * (stacked[:1] - stacked).square().sum()
        return D[0].detach(), torch.autograd.grad(loss, x)[0]

    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        D0, G = stage(x_cur, t_cur)
        d1 = (t_next - t_cur) * (x_cur - D0) / t_cur - guidance_scale * G
        x_next = x_cur + d1
        if i < num_steps - 1:
            D0, G = stage(x_next, t_next)
            d2 = (t_next - t_cur) * (x_next - D0) / t_next - guidance_scale * G
            x_next = x_cur + 0.5 * (d1 + d2)
    return x_next


def run(net, batch, steps, num_masks, guidance_scale, device, original=False):
    """Time one generate_batch call (or, `original`, the original's sampler on the same latents and masks);
    returns (seconds, network calls, images processed by the network)."""
    counts = dict(calls=0, rows=0)

    def hook(module, args, output):
        counts['calls'] += 1
        counts['rows'] += args[0].shape[0]

    handle = net.register_forward_hook(hook)
    corruption = MaskCorruption('dust', corruption_probability=0.4, delta_probability=0.1)
    try:
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        if original:
            from bench.bench_network import separate_gate_convolutions
            rnd = StackedRandomGenerator(device, list(range(batch)))
            latents = rnd.randn([batch, 3, 32, 32], device=device)
            masks = samplers.sample_masks(corruption, latents.shape, num_masks, rnd.generators)
            with separate_gate_convolutions():
                original_sampler(net, latents, masks, steps, guidance_scale if num_masks > 1 else 0.0)
        else:
            samplers.generate_batch(net, list(range(batch)), corruption=corruption, device=device, num_masks=num_masks,
                                    num_steps=steps, guidance_scale=guidance_scale if num_masks > 1 else 0.0)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, counts['calls'], counts['rows']
    finally:
        handle.remove()


def _int_list(ctx, param, value):
    try:
        return [int(v) for v in value.split(',') if v]
    except ValueError as error:
        raise click.BadParameter(f'{value!r}: pass comma-separated integers, e.g. 1,3') from error


def nfe(solver, steps):
    """Network evaluations of one trajectory: Heun 2N − 1, the others N."""
    return 2 * steps - 1 if solver == 'heun' else steps


def compare_solvers(network, data, classifier_path, solvers, step_counts, num_samples, eta, outdir, docs,
                    precisions=('fp32',)):
    """Every solver at every step count (and network precision) on the same seeds; the table, FD-vs-NFE plot and
    sample picture. A solver run in bfloat16 is labelled 'solver bf16'."""
    path = snapshots.resolve_networks(network, latest=True)[-1]
    net, info = snapshots.load_network(path, device='cpu')
    corruption = None
    if info.ambient:
        c = info.corruption
        corruption = MaskCorruption(c['corruption_pattern'], c['corruption_probability'], c['delta_probability'],
                                    mask_full_rgb=c.get('mask_full_rgb', False))
    dataset = ImageFolderDataset(data, mode='clean', normalize=False, use_labels=True)
    reference = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.as_tensor(np.stack([dataset.get_label(i) for i in range(len(dataset))])).argmax(1)
    classifier = digit_score.load_or_train_classifier(classifier_path, reference, labels)
    rows, pictures, row_labels = [], {}, []
    seeds = list(range(num_samples))
    for precision, solver in [(p, s) for p in precisions for s in solvers]:
        net.use_fp16 = 'bf16' if precision == 'bf16' else False
        label = solver if precision == 'fp32' else f'{solver} {precision}'
        row_labels.append(label)
        for steps in step_counts:
            kwargs = dict(num_steps=steps, solver=solver, eta=eta if solver == 'ddim' else 0.0)
            if info.ambient:
                kwargs.update(corruption=corruption)
            start = time.perf_counter()
            images = torch.cat([samplers.generate_batch(net, seeds[i:i + 256], **kwargs) for i in range(0, len(seeds), 256)])
            seconds = time.perf_counter() - start
            score = digit_score.score_images(classifier, images, reference)
            rows.append(dict(solver=label, steps=steps, nfe=nfe(solver, steps), seconds=seconds, fd=score['fd'],
                             fd_pixel=score['fd_pixel'], precision=precision))
            pictures[(label, steps)] = images[:12]
            print(f'{label:>6} {steps:>4} steps  NFE {rows[-1]["nfe"]:>4}  {seconds:7.1f} s  FD {score["fd"]:8.2f}', flush=True)
    os.makedirs(outdir, exist_ok=True)
    lines = [f'| solver | steps | NFE | s / {num_samples} images | FD (classifier) | FD (pixels) |', '|---|---|---|---|---|---|']
    lines += [f'| {r["solver"]}{f" (η = {eta:g})" if r["solver"].startswith("ddim") and eta else ""} | {r["steps"]} | {r["nfe"]} | '
              f'{r["seconds"]:.1f} | {r["fd"]:.2f} | {r["fd_pixel"]:.2f} |' for r in rows]
    with atomic_write(os.path.join(outdir, 'solvers.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    with atomic_write(os.path.join(outdir, 'solvers.json'), 'w') as f:
        json.dump(dict(network=path, samples=num_samples, eta=eta, rows=rows), f, indent=2)
    _draw_solvers(rows, pictures, row_labels, step_counts, os.path.join(outdir, 'solvers.png'))
    print('\n' + '\n'.join(lines))
    if docs:
        os.makedirs(docs, exist_ok=True)
        for name in ('solvers.md', 'solvers.png'):
            shutil.copyfile(os.path.join(outdir, name), os.path.join(docs, name))


def _draw_solvers(rows, pictures, solvers, step_counts, dest):
    """Left: FD vs NFE per solver. Right: the same seeds from every solver at the middle step count."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from torch_utils.images import make_grid

    fig = Figure(figsize=(13, 0.9 * len(solvers) + 2), dpi=110)
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(len(solvers), 2, width_ratios=[1, 1.6], left=0.07, right=0.98, top=0.9, bottom=0.14, wspace=0.25)
    ax = fig.add_subplot(gs[:, 0])
    for i, solver in enumerate(solvers):
        pts = sorted((r['nfe'], r['fd']) for r in rows if r['solver'] == solver)
        style = ('-o', '--x', ':s', '-.^')[i % 4]  # distinct styles: DDIM(η = 0) lies exactly on Euler
        ax.plot(*zip(*pts), style, markersize=4, color=f'C{i}', label=solver)
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('network evaluations per image (NFE)')
    ax.set_ylabel('digit-feature Fréchet distance')
    ax.legend(fontsize=8)
    steps = step_counts[len(step_counts) // 2]
    for i, solver in enumerate(solvers):
        row = [r for r in rows if r['solver'] == solver and r['steps'] == steps][0]
        ax_img = fig.add_subplot(gs[i, 1])
        grid = make_grid(pictures[(solver, steps)], grid_w=12, pad=1)
        ax_img.imshow(grid[:, :, 0] if grid.shape[-1] == 1 else grid, cmap='gray', vmin=0, vmax=255, interpolation='nearest')
        ax_img.set_axis_off()
        ax_img.set_title(f'{solver}, {steps} steps, NFE {row["nfe"]}, {row["seconds"]:.1f} s, FD {row["fd"]:.1f}',
                         fontsize=7, loc='left')
    with atomic_write(dest, 'wb') as f:
        fig.savefig(f, format='png')


@click.command()
@click.option('--configs',        help='Comma-separated network configs', metavar='LIST',     type=str, default='small', show_default=True)
@click.option('--batch',          help='Images per sampler call', metavar='INT',              type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--steps',          help='Sampler steps N (with --solvers: a comma-separated list)', metavar='INT|LIST', type=str, default='18', show_default=True, callback=_int_list)
@click.option('--num_masks',      help='Comma-separated K (masks per sample)', metavar='LIST', type=str, default='1,3', show_default=True, callback=_int_list)
@click.option('--guidance_scale', help='Guidance weight w when K > 1', metavar='FLOAT',       type=click.FloatRange(min=0), default=0.5, show_default=True)
@click.option('--device',         help='Torch device', metavar='STR',                         type=str, default='cpu', show_default=True)
@click.option('--threads',        help='torch.set_num_threads', metavar='INT',                type=click.IntRange(min=1), default=None)
@click.option('--warmup/--no-warmup', help='One untimed 2-step run per network first',        default=True, show_default=True)
@click.option('--variants',       help='Comma-separated: ours, ours_cl (channels-last), ours_compiled (eval.py generate --compile), ours_bf16 and ours_compiled_bf16 (--precision=bf16), original (the original\'s sampler and network formulation)', metavar='LIST', type=str, default='ours,original', show_default=True)
@click.option('--rounds',         help='Alternating rounds per K (medians)', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--solvers',        help='Compare these solvers on the demo model (e.g. ddpm,ddim,euler,heun)', metavar='LIST', type=str)
@click.option('--network',        help='--solvers: the model', metavar='DIR|PT', type=str, default='demo-out/run-ambient', show_default=True)
@click.option('--data',           help='--solvers: the reference digits', metavar='ZIP', type=str, default='demo-out/digits.zip', show_default=True)
@click.option('--classifier',     help='--solvers: the digit classifier (trained if missing)', metavar='PT', type=str, default='demo-out/digit-classifier.pt', show_default=True)
@click.option('--samples',        help='--solvers: images per solver and step count', metavar='INT', type=click.IntRange(min=70), default=300, show_default=True)
@click.option('--eta',            help='--solvers: DDIM η', metavar='FLOAT', type=click.FloatRange(0, 1), default=0, show_default=True)
@click.option('--outdir',         help='--solvers: where the table and figures go', metavar='DIR', type=str, default='bench-out/solvers', show_default=True)
@click.option('--docs',           help='--solvers: also copy solvers.md and solvers.png here', metavar='DIR', type=str)
@click.option('--precisions',     help='--solvers: network precisions to run every solver in (fp32, bf16)', metavar='LIST', type=str, default='fp32', show_default=True)
def main(configs, batch, steps, num_masks, guidance_scale, device, threads, warmup, variants, rounds, solvers, network,
         data, classifier, samples, eta, outdir, docs, precisions):
    """Seconds per image and network evaluations of the ambient sampler; or, with --solvers, the solvers compared."""
    if threads is not None:
        torch.set_num_threads(threads)
    if solvers is not None:
        solvers = [x for x in solvers.split(',') if x]
        unknown = [x for x in solvers if x not in samplers.SOLVERS]
        if unknown:
            raise click.BadParameter(f'{unknown}: solvers are {", ".join(samplers.SOLVERS)}', param_hint='--solvers')
        precisions = [p for p in precisions.split(',') if p]
        if not precisions or any(p not in ('fp32', 'bf16') for p in precisions) or len(set(precisions)) < len(precisions):
            raise click.BadParameter(f'{precisions}: pass fp32 and/or bf16, each once', param_hint='--precisions')
        compare_solvers(network, data, classifier, solvers, steps, samples, eta, outdir, docs, precisions)
        return
    if precisions != 'fp32':
        raise click.BadParameter('applies to --solvers; the speed table takes the ours_bf16 variants', param_hint='--precisions')
    if len(steps) != 1:
        raise click.BadParameter('one step count without --solvers', param_hint='--steps')
    steps = steps[0]
    names = [c for c in configs.split(',') if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise click.BadParameter(f'{unknown}: known configs are {", ".join(CONFIGS)}', param_hint='--configs')
    variants = [v for v in variants.split(',') if v]
    if not variants or any(v not in VARIANTS for v in variants):
        raise click.BadParameter(f'{variants}: variants are {", ".join(VARIANTS)}', param_hint='--variants')
    if any(k < 1 for k in num_masks):
        raise click.BadParameter(f'{num_masks}: every K must be >= 1', param_hint='--num_masks')
    device = torch.device(device)
    print(f'torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, batch {batch}, '
          f'{steps} steps')
    header = (f'{"config":<9} {"variant":<18} {"K":>2} {"w":>5} {"net calls":>9} {"imgs/call":>9} {"NFE/image":>9} '
              f'{"s/image":>8} {"original/this":>13}')
    print(header)
    print('-' * len(header))
    for name in names:
        nets = {variant: build_net(name, device, original=variant == 'original', channels_last=variant == 'ours_cl',
                                   bf16=variant.endswith('_bf16'))
                for variant in variants}
        for variant in [v for v in nets if v.startswith('ours_compiled')]:
            nets[variant] = samplers.compile_for_sampling(nets[variant])
        if warmup:  # every K, so that compiled variants compile before the timed runs
            for variant, net in nets.items():
                for k in num_masks:
                    start = time.perf_counter()
                    run(net, batch, 2, k, guidance_scale, device, original=variant == 'original')
                    if variant.startswith('ours_compiled'):
                        print(f'{name} {variant} K={k}: warm-up (compilation) {time.perf_counter() - start:.0f} s', flush=True)
        for k in num_masks:
            times = {variant: [] for variant in variants}
            for _ in range(rounds):  # alternating rounds: the machine's drift hits every variant alike
                for variant, net in nets.items():
                    seconds, calls, rows = run(net, batch, steps, k, guidance_scale, device, original=variant == 'original')
                    times[variant].append((seconds, calls, rows))
            w = guidance_scale if k > 1 else 0.0
            reference = statistics.median(t[0] for t in times['original']) / batch if 'original' in times else None
            for variant, runs in times.items():
                seconds, calls, rows = statistics.median(t[0] for t in runs), runs[0][1], runs[0][2]
                per_image = seconds / batch
                ratio = f'{reference / per_image:.2f}x' if reference is not None else ''
                print(f'{name:<9} {variant:<18} {k:>2} {w:>5.2f} {calls:>9} {rows / calls:>9.0f} {rows / batch:>9.0f} '
                      f'{per_image:>8.3f} {ratio:>13}', flush=True)


if __name__ == '__main__':
    main()
