"""Sampler speed: seconds per image and network evaluations of the ambient sampler (training/samplers.py).

    python bench/bench_sampler.py --configs=small --batch=8 --num_masks=1 --threads=1
    python bench/bench_sampler.py --configs=small,ddpmpp32 --num_masks=1,3 --guidance_scale=0.5 --device=cuda

Networks (random weights: speed does not depend on training), ambient input [image, mask] 2C=6 -> C=3,
32x32, EDMPrecond + SongUNet (DDPM++), every convolution gated with the original's double sigmoid:
  small     the original's small config: model_channels 32, channel_mult [1,2,2,2], 4 blocks, attention at 16
  ddpmpp32  EDM's CIFAR-10 DDPM++: model_channels 128, channel_mult [2,2,2], 4 blocks, attention at 16
Images come from `generate_batch` (per-seed latents and dust masks, p=0.4, δ=0.1) with EDM's Heun sampler.
K = 1 runs without autograd; K > 1 uses reconstruction guidance (w = --guidance_scale), K masks in one network
call per stage. A forward hook counts network calls and the images they process.

Reference: the original's sampler (giannisdaras/ambient-diffusion eval.py) took 3.56 s/image for the small
config, 18 steps, K = 1 on the project's CPU machine (it backpropagates through the network at every step).
"""

import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from torch_utils.ambient_diffusion import MaskCorruption  # noqa: E402
from training import networks, samplers  # noqa: E402

CONFIGS = {
    'small': dict(model_channels=32, channel_mult=[1, 2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.10),
    'ddpmpp32': dict(model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.13),
}
ORIGINAL_SMALL_S_PER_IMAGE = 3.56   # original sampler, small config, 18 steps, K = 1, CPU


def build_net(config, device):
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=32, img_channels=6, ambient=True, model_type='SongUNet',
                              gate='double_sigmoid', **CONFIGS[config])
    return net.eval().requires_grad_(False).to(device)


def run(net, batch, steps, num_masks, guidance_scale, device):
    """Time one generate_batch call; returns (seconds, network calls, images processed by the network)."""
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


@click.command()
@click.option('--configs',        help='Comma-separated network configs', metavar='LIST',     type=str, default='small', show_default=True)
@click.option('--batch',          help='Images per sampler call', metavar='INT',              type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--steps',          help='Sampler steps N', metavar='INT',                      type=click.IntRange(min=1), default=18, show_default=True)
@click.option('--num_masks',      help='Comma-separated K (masks per sample)', metavar='LIST', type=str, default='1,3', show_default=True, callback=_int_list)
@click.option('--guidance_scale', help='Guidance weight w when K > 1', metavar='FLOAT',       type=click.FloatRange(min=0), default=0.5, show_default=True)
@click.option('--device',         help='Torch device', metavar='STR',                         type=str, default='cpu', show_default=True)
@click.option('--threads',        help='torch.set_num_threads', metavar='INT',                type=click.IntRange(min=1), default=None)
@click.option('--warmup/--no-warmup', help='One untimed 2-step run per network first',        default=True, show_default=True)
def main(configs, batch, steps, num_masks, guidance_scale, device, threads, warmup):
    """Seconds per image and network evaluations of the ambient sampler."""
    names = [c for c in configs.split(',') if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise click.BadParameter(f'{unknown}: known configs are {", ".join(CONFIGS)}', param_hint='--configs')
    if any(k < 1 for k in num_masks):
        raise click.BadParameter(f'{num_masks}: every K must be >= 1', param_hint='--num_masks')
    if threads is not None:
        torch.set_num_threads(threads)
    device = torch.device(device)
    print(f'torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, batch {batch}, '
          f'{steps} steps')
    header = f'{"config":<9} {"K":>2} {"w":>5} {"net calls":>9} {"imgs/call":>9} {"NFE/image":>9} {"s/image":>8} {"vs original":>11}'
    print(header)
    print('-' * len(header))
    for name in names:
        net = build_net(name, device)
        if warmup:
            run(net, batch, 2, max(num_masks), guidance_scale, device)
        for k in num_masks:
            seconds, calls, rows = run(net, batch, steps, k, guidance_scale, device)
            w = guidance_scale if k > 1 else 0.0
            per_image = seconds / batch
            compare = ''
            if name == 'small' and k == 1 and steps == 18 and device.type == 'cpu':
                compare = f'{ORIGINAL_SMALL_S_PER_IMAGE / per_image:.2f}x faster'
            print(f'{name:<9} {k:>2} {w:>5.2f} {calls:>9} {rows / calls:>9.0f} {rows / batch:>9.0f} '
                  f'{per_image:>8.3f} {compare:>11}')


if __name__ == '__main__':
    main()
