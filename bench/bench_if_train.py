"""Ambient IF fine-tuning: seconds per optimizer step and peak memory of `training.ambient_if.ambient_if_step`.

    python bench/bench_if_train.py --configs=tiny --optimizers=adamw,adamw8bit
    python bench/bench_if_train.py --configs=mid --device=cuda --batch=32 --mixed-precision=bf16

Configs (IF stage-I UNet layout: ResNet + SimpleCrossAttn blocks, text-embedding conditioning, 6 output
channels), random weights, the empty-prompt embedding of the given width:
  tiny  the tests' model: 16x16, block channels (16, 32), 1 layer per block, 24-d text
  mid   64x64, block channels (128, 256, 384, 512), 2 layers per block, 1024-d text (~150 M parameters)
One step: ambient forward (mask p=0.4, δ=0.1), loss, backward, gradient clipping, optimizer step, as in
train_text_to_image.py. Each measurement runs in a fresh process (bench/isolated.py).
"""

import os
import resource
import statistics
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.isolated import run_isolated  # noqa: E402

CONFIGS = {
    'tiny': dict(resolution=16, channels=(16, 32), layers=1, text_dim=24),
    'mid': dict(resolution=64, channels=(128, 256, 384, 512), layers=2, text_dim=1024),
}
OPTIMIZERS = ('adamw', 'adamw8bit')


def _unet(resolution, channels, layers, text_dim):
    from diffusers import UNet2DConditionModel
    n = len(channels)
    return UNet2DConditionModel(sample_size=resolution, in_channels=3, out_channels=6, layers_per_block=layers,
        block_out_channels=channels, down_block_types=['ResnetDownsampleBlock2D'] + ['SimpleCrossAttnDownBlock2D'] * (n - 1),
        up_block_types=['SimpleCrossAttnUpBlock2D'] * (n - 1) + ['ResnetUpsampleBlock2D'],
        mid_block_type='UNetMidBlock2DSimpleCrossAttn', cross_attention_dim=channels[-1], attention_head_dim=64 if channels[0] >= 64 else 8,
        addition_embed_type='text', addition_embed_type_num_heads=2, encoder_hid_dim=text_dim,
        norm_num_groups=min(32, channels[0] // 2), resnet_time_scale_shift='scale_shift', act_fn='gelu')


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def measure(config, optimizer, device, batch, iters, warmup, mixed_precision):
    from torch_utils.ambient_diffusion import MaskCorruption
    from training.ambient_if import if_scheduler, ambient_if_step
    device = torch.device(device)
    cfg = CONFIGS[config]
    torch.manual_seed(0)
    unet = _unet(**cfg).to(device).train()
    scheduler = if_scheduler()
    params = sum(p.numel() for p in unet.parameters())
    if optimizer == 'adamw8bit':
        import bitsandbytes as bnb
        opt = bnb.optim.AdamW8bit(unet.parameters(), lr=1e-5)
    else:
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    r = cfg['resolution']
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch, 3, r, r, generator=gen).to(device) * 2 - 1
    corruption = MaskCorruption('dust', 0.4, 0.1, mask_full_rgb=True)
    mask = corruption.sample_mask(x0.shape, generator=gen, device=device)
    hat = corruption.sample_hat_mask(mask, generator=gen)
    embeds = torch.randn(1, 77, cfg['text_dim'], generator=gen).to(device).expand(batch, -1, -1)
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(mixed_precision)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss, _, _ = ambient_if_step(unet, scheduler, x0 * mask, mask, hat, embeds, generator=gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + iters):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sec = statistics.median(times)
    return dict(config=config, optimizer=optimizer, params=params, sec_per_step=sec, img_per_sec=batch / sec, peak_gb=peak / 2**30)


def _split(choices):
    def parse(ctx, param, value):
        items = [v.strip() for v in value.split(',') if v.strip()]
        if not items or any(v not in choices for v in items):
            raise click.BadParameter(f'{value!r}: expected a comma-separated subset of {",".join(choices)}')
        return items
    return parse


@click.command()
@click.option('--configs',         help='Comma-separated configs', metavar='LIST', default='tiny', show_default=True, callback=_split(tuple(CONFIGS)))
@click.option('--optimizers',      help='Comma-separated optimizers', metavar='LIST', default='adamw,adamw8bit', show_default=True, callback=_split(OPTIMIZERS))
@click.option('--device',          help='Device to run on', metavar='STR', default='cpu', show_default=True)
@click.option('--batch',           help='Images per step', metavar='INT', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--iters',           help='Timed steps', metavar='INT', type=click.IntRange(min=1), default=10, show_default=True)
@click.option('--warmup',          help='Untimed steps first', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True)
@click.option('--mixed-precision', 'mixed_precision', help='Autocast dtype', type=click.Choice(['no', 'bf16', 'fp16']), default='no', show_default=True)
def main(configs, optimizers, device, batch, iters, warmup, mixed_precision):
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise click.BadParameter(f'--device={device}: CUDA is not available here; use --device=cpu', param_hint='--device')
    if mixed_precision == 'fp16' and not device.startswith('cuda'):
        raise click.BadParameter('fp16 autocast needs --device=cuda', param_hint='--mixed-precision')
    print(f'device={device} batch={batch} iters={iters} warmup={warmup} mixed_precision={mixed_precision} '
          f'threads={torch.get_num_threads()}')
    print(f'{"config":<6} {"optimizer":<10} {"params":>10} {"s/step":>8} {"img/s":>8} {"peak GB":>8}')
    for config in configs:
        for optimizer in optimizers:
            r = run_isolated(measure, config=config, optimizer=optimizer, device=device, batch=batch, iters=iters,
                             warmup=warmup, mixed_precision=None if mixed_precision == 'no' else mixed_precision)
            if 'error' in r:
                print(f'{config:<6} {optimizer:<10} error: {r["error"]}')
                continue
            print(f'{config:<6} {optimizer:<10} {r["params"] / 1e6:>9.2f}M {r["sec_per_step"]:>8.3f} '
                  f'{r["img_per_sec"]:>8.1f} {r["peak_gb"]:>8.2f}')


if __name__ == '__main__':
    main()
