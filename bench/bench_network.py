"""Network throughput and memory: forward and forward+backward images/s, peak memory, parameter count.

    python bench/bench_network.py --configs=small --iters=3
    python bench/bench_network.py --configs=ddpmpp32,small --variants=fused,ungated --profile

Configs (ambient input [image, mask] 2C=6 -> C=3 channels, EDMPrecond + SongUNet DDPM++ at 32x32, batch 8):
  ddpmpp32  EDM's CIFAR-10 DDPM++: model_channels 128, channel_mult [2,2,2], 4 blocks, attention at 16, dropout 0.13
  small     the original's small config: model_channels 32, channel_mult [1,2,2,2], 4 blocks, attention at 16
Variants: `fused` (gated, one convolution over [W; Wg]), `separate` (gated, two convolutions, as the
original computed it), `ungated`.

Each measurement runs in a fresh process, so its peak resident memory (CPU) or peak allocated memory
(CUDA) belongs to that network alone. Rates use the median time per step. Forward is timed in eval mode without autograd (sampling);
forward+backward in train mode with a weighted MSE loss and no optimizer step.
"""

import contextlib
import os
import resource
import statistics
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.isolated import run_isolated  # noqa: E402
from training import layers, networks  # noqa: E402

CONFIGS = {
    'ddpmpp32': dict(model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.13),
    'small': dict(model_channels=32, channel_mult=[1, 2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.10),
}
VARIANTS = ('fused', 'separate', 'ungated')

# ----------------------------------------------------------------------------
# The original's formulation of a gated convolution: two convolutions, for the `separate` variant only.


def _two_conv_forward(self, x):
    F = torch.nn.functional
    w = self.weight.to(x.dtype) if self.weight is not None else None
    wg = self.gate_weight.to(x.dtype) if self.gate_weight is not None else None
    b = self.bias.to(x.dtype) if self.bias is not None else None
    f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
    w_pad = w.shape[-1] // 2 if w is not None else 0
    f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0

    def conv(x, padding):
        y = F.conv2d(x, w, padding=padding)
        if wg is None:
            return y
        g = torch.sigmoid(F.conv2d(x, wg, padding=padding))
        return y * (torch.sigmoid(g) if self.gate == 'double_sigmoid' else g)

    if self.fused_resample and self.up and w is not None:
        x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2,
                               padding=max(f_pad - w_pad, 0))
        x = conv(x, max(w_pad - f_pad, 0))
    elif self.fused_resample and self.down and w is not None:
        x = conv(x, w_pad + f_pad)
        x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
    else:
        if self.up:
            x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2,
                                   padding=f_pad)
        if self.down:
            x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
        if w is not None:
            x = conv(x, w_pad)
    return x if b is None else x + b.reshape(1, -1, 1, 1)


@contextlib.contextmanager
def separate_gate_convolutions():
    """Within the block, every layers.Conv2d computes W and Wg with two separate convolutions."""
    original = layers.Conv2d.forward
    layers.Conv2d.forward = _two_conv_forward
    try:
        yield
    finally:
        layers.Conv2d.forward = original


# ----------------------------------------------------------------------------
# One measurement (runs in its own process).


def _rss_bytes():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _timed(fn, iters, warmup, device):
    """Median seconds per call: robust to other processes sharing the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(config, variant, device, batch, iters, warmup, threads, channels_last, use_fp16, profile, seed=0):
    """Returns a dict of results for one (config, variant); prints the profiler table if asked."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    torch.manual_seed(seed)
    gate = 'none' if variant == 'ungated' else 'sigmoid'
    net = networks.EDMPrecond(32, 6, ambient=True, gate=gate, model_type='SongUNet', augment_dim=9,
                              use_fp16=use_fp16, **CONFIGS[config]).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=memory_format)
    gen = torch.Generator(device).manual_seed(seed)
    x = torch.randn([batch, 6, 32, 32], generator=gen, device=device).to(memory_format=memory_format)
    sigma = (torch.randn([batch], generator=gen, device=device) * 1.2 - 1.2).exp()
    target = torch.randn([batch, 3, 32, 32], generator=gen, device=device)
    weight = ((sigma ** 2 + 0.25) / (sigma * 0.5) ** 2).reshape(-1, 1, 1, 1)
    params = sum(p.numel() for p in net.parameters())

    def forward():
        with torch.no_grad():
            net(x, sigma)

    def forward_backward():
        net.zero_grad(set_to_none=True)
        loss = (weight * (net(x, sigma) - target) ** 2).sum() / batch
        loss.backward()

    swap = separate_gate_convolutions() if variant == 'separate' else contextlib.nullcontext()
    with swap:
        net.eval()
        t_fwd = _timed(forward, iters, warmup, device)
        net.train()
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) if device.type == 'cuda' else _rss_bytes()
        t_train = _timed(forward_backward, iters, warmup, device)
        if device.type == 'cuda':
            peak = torch.cuda.max_memory_allocated(device)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        if profile:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == 'cuda':
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities) as prof:
                forward_backward()
                _sync(device)
            sort_by = 'self_cuda_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
            print(f'\n== {config} / {variant}: top-15 ops of one forward+backward ==')
            print(prof.key_averages().table(sort_by=sort_by, row_limit=15))
    return dict(config=config, variant=variant, params=params, fwd=batch / t_fwd, train=batch / t_train,
                peak_mb=peak / 2 ** 20, delta_mb=(peak - base) / 2 ** 20)




# ----------------------------------------------------------------------------


def _split(choices):
    def parse(ctx, param, value):
        items = [item.strip() for item in value.split(',') if item.strip()]
        bad = [item for item in items if item not in choices]
        if bad or not items:
            raise click.BadParameter(f'{value!r}: expected a comma-separated subset of {",".join(choices)}')
        return items
    return parse


@click.command()
@click.option('--configs',       help='Comma-separated configs', metavar='LIST', default='ddpmpp32,small', show_default=True, callback=_split(tuple(CONFIGS)))
@click.option('--variants',      help='Comma-separated variants', metavar='LIST', default=','.join(VARIANTS), show_default=True, callback=_split(VARIANTS))
@click.option('--device',        help='Device to run on', metavar='STR', default='cpu', show_default=True)
@click.option('--batch',         help='Images per step', metavar='INT', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--iters',         help='Timed steps', metavar='INT', type=click.IntRange(min=1), default=10, show_default=True)
@click.option('--warmup',        help='Untimed steps first', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True)
@click.option('--threads',       help='torch.set_num_threads (0: default)', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--channels-last', help='Run in channels_last memory format', is_flag=True)
@click.option('--fp16',          help='float16 network on CUDA', is_flag=True)
@click.option('--profile',       help='Print the torch.profiler top-15 ops', is_flag=True)
def main(configs, variants, device, batch, iters, warmup, threads, channels_last, fp16, profile):
    """Benchmark the ambient DDPM++ networks (gated fused / gated separate / ungated)."""
    if torch.device(device).type == 'cuda' and not torch.cuda.is_available():
        raise click.BadParameter(f'--device={device}: CUDA is not available here; use --device=cpu', param_hint='--device')
    if fp16 and torch.device(device).type != 'cuda':
        raise click.BadParameter('--fp16 needs --device=cuda (the networks run in float32 on CPU)', param_hint='--fp16')
    print(f'device={device} batch={batch} iters={iters} warmup={warmup} threads={threads or torch.get_num_threads()} '
          f'channels_last={channels_last} torch={torch.__version__}')
    memory = 'peak MiB (alloc)' if torch.device(device).type == 'cuda' else 'peak RSS MiB'
    header = f'{"config":<9} {"variant":<9} {"params":>10} {"fwd img/s":>10} {"fwd+bwd img/s":>14} {memory:>17} {"(+ step)":>9}'
    rows = []
    for config in configs:
        for variant in variants:
            rows.append(run_isolated(measure, config=config, variant=variant, device=device, batch=batch, iters=iters,
                                     warmup=warmup, threads=threads, channels_last=channels_last, use_fp16=fp16,
                                     profile=profile))
    print()
    print(header)
    print('-' * len(header))
    for r in rows:
        if 'error' in r:
            print(f'{r["config"]:<9} {r["variant"]:<9} failed: {r["error"]}')
            continue
        print(f'{r["config"]:<9} {r["variant"]:<9} {r["params"] / 1e6:>9.2f}M {r["fwd"]:>10.2f} {r["train"]:>14.2f} '
              f'{r["peak_mb"]:>17.0f} {r["delta_mb"]:>9.0f}')
    print('(+ step): peak memory above the level before the first forward+backward step.')


if __name__ == '__main__':
    main()
