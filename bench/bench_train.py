"""Training throughput: images/s of full optimizer steps (ambient loss, backward, Adam, EMA) and peak memory.

    python bench/bench_train.py                          # small and demo configs on CPU
    python bench/bench_train.py --configs=ddpmpp32 --steps=3
    python bench/bench_train.py --device=cuda --configs=ddpmpp32,small --fp16=True
    python bench/bench_train.py --configs=small --variants=eager,compiled,original

Configs are train.py command lines, turned into the network, loss and optimizer exactly as train.py does:
  ddpmpp32  EDM's CIFAR-10 DDPM++ (128 channels, [2,2,2], 4 blocks, attention at 16), gated, RGB 32x32, batch 8
  small     the original's small gated config (cbase 32, cres 1,2,2,2), RGB 32x32, batch 8
  demo      the `make demo` config (see demo.py), grayscale 16x16
Variants:
  eager          our network as train.py builds it (fused gated convolutions, sigmoid gate, C outputs), with
                 train.py's multi-tensor EMA update
  channels_last  the same in channels-last memory format (train.py --channels_last=True)
  compiled       eager under torch.compile (train.py --compile=True)
  compiled_cl    channels_last under torch.compile
  bf16, channels_last_bf16, compiled_cl_bf16  eager, channels_last and compiled_cl with the network in bfloat16
                 (train.py --fp16=bf16; fast on CPUs with AVX512-BF16 or AMX; the original's use_fp16 applies on
                 CUDA only, so on a CPU it has no reduced precision)
  original       the original's formulation on the same machine: double-sigmoid gate computed with two separate
                 convolutions, 2C outputs, a per-parameter EMA loop, and torch.compile, which the original always
                 applies
  original_eager the original's formulation without torch.compile (the eager yardstick)
--flops also counts the floating-point operations of a step (torch.utils.flop_counter) and reports TFLOP/s and
its share of the device's measured matmul rate (float32, or bfloat16 with --fp16=bf16): the GPU-ready mode.
The first step of a compiled variant includes compilation; inductor caches its kernels on disk
(TORCHINDUCTOR_CACHE_DIR), so a rerun on the same machine compiles in seconds. `first s` shows it.
Data are random images with dust masks (p = 0.6, δ = 0.1), so the step cost excludes image decoding.
Each config runs in a fresh process; peak memory is that process's peak RSS (CPU) or peak allocated memory (CUDA).
"""

import contextlib
import os
import resource
import statistics
import sys
import time

import click
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench.isolated import run_isolated  # noqa: E402

# (train.py arguments, channels, batch, resolution)
CONFIGS = {
    'ddpmpp32': (['--arch=ddpmpp'], 3, 8, 32),
    'small': (['--arch=ddpmpp', '--cbase=32', '--cres=1,2,2,2'], 3, 8, 32),
    'demo': (None, 1, None, None),
}


def _config_args(name):
    if name == 'demo':
        import demo
        return demo.TRAIN_ARGS, 1, demo.TRAIN_BATCH, demo.RESOLUTION
    return CONFIGS[name]


VARIANTS = ('eager', 'channels_last', 'compiled', 'compiled_cl', 'bf16', 'channels_last_bf16', 'compiled_cl_bf16',
            'original', 'original_eager')


def matmul_rate(device, dtype, n=4096, repeats=10):
    """The device's measured matmul rate (FLOP/s) for n x n matrices of `dtype`."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    if device.type == 'cuda':
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0)


def measure(name, variant, device, steps, warmup, threads, fp16, flops=False, profile=False):
    import dnnlib
    import train
    from bench.bench_network import separate_gate_convolutions
    from torch_utils.ambient_diffusion import MaskCorruption
    from training.training_loop import _update_ema
    torch.set_num_threads(threads)
    args, channels, batch, resolution = _config_args(name)
    original = variant.startswith('original')
    if original:
        args = [*args, '--gate=double_sigmoid']
    if variant.endswith('bf16'):
        fp16 = 'bf16'
    if original and torch.device(device).type != 'cuda':
        fp16 = False  # the original's use_fp16 applies on CUDA only
    ctx = train.main.make_context('train', ['--outdir=unused', '--data=unused', f'--batch={batch}', f'--fp16={fp16}',
                                            '--augment=0', *args])
    c = train.build_config(dnnlib.EasyDict(ctx.params))
    device = torch.device(device)
    kw = dict(c.network_kwargs, img_resolution=resolution, img_channels=2 * channels, label_dim=0)
    if original:
        kw['out_channels'] = 2 * channels
    net = dnnlib.util.construct_class_by_name(**kw).train().to(device)
    ema = dnnlib.util.construct_class_by_name(**kw).eval().requires_grad_(False).to(device)
    if variant in ('channels_last', 'compiled_cl', 'channels_last_bf16', 'compiled_cl_bf16'):
        net.to(memory_format=torch.channels_last)
        ema.to(memory_format=torch.channels_last)
    model = torch.compile(net) if variant in ('compiled', 'compiled_cl', 'compiled_cl_bf16', 'original') else net
    loss_fn = dnnlib.util.construct_class_by_name(**c.loss_kwargs)
    opt = dnnlib.util.construct_class_by_name(params=net.parameters(), **c.optimizer_kwargs)
    g = torch.Generator().manual_seed(0)
    corruption = MaskCorruption('dust', 0.6, 0.1)
    x0 = torch.rand([batch, channels, resolution, resolution], generator=g) * 2 - 1
    A = corruption.sample_mask(x0.shape, generator=g)
    A_hat = corruption.sample_hat_mask(A, generator=g)
    x0, A, A_hat = x0.to(device), A.to(device), A_hat.to(device)
    gen = torch.Generator(device).manual_seed(1)

    def step():
        opt.zero_grad(set_to_none=True)
        loss, _ = loss_fn(net=model, observation=A * x0, mask=A, hat_mask=A_hat, generator=gen)
        loss.sum().backward()
        opt.step()
        if original:  # EDM's per-parameter EMA loop
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), net.parameters()):
                    p_ema.copy_(p.detach().lerp(p_ema, 0.999))
        else:
            _update_ema(ema, net, cur_nimg=10 ** 6, batch_size=batch, ema_halflife_kimg=500, ema_rampup_ratio=None)

    times = []
    count = None
    with separate_gate_convolutions() if original else contextlib.nullcontext():
        for i in range(1 + warmup + steps):
            if device.type == 'cuda':
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if device.type == 'cuda':
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        if profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                step()
            print(f'--- {name} {variant}: one step, top operators by self time', flush=True)
            print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=12, max_name_column_width=40),
                  flush=True)
        if flops:
            from torch.utils.flop_counter import FlopCounterMode
            with FlopCounterMode(display=False) as counter:
                step()
            count = counter.get_total_flops()
    first, times = times[0], times[1 + warmup:]
    if device.type == 'cuda':
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = sum(p.numel() for p in net.parameters())
    result = dict(config=name, variant=variant, params=params, batch=batch, img_s=batch / statistics.median(times),
                  sec_step=statistics.median(times), first=first, peak_gib=peak / 2**30)
    if count is not None:
        result.update(tflops=count / result['sec_step'] / 1e12,
                      peak_tflops=matmul_rate(device, net.compute_dtype(device)) / 1e12)
    return result




@click.command()
@click.option('--configs', help='Comma-separated configs', default='small,demo', show_default=True)
@click.option('--variants', help='Comma-separated variants (see above)', default='eager', show_default=True)
@click.option('--device', help='cpu or cuda', default='cpu', show_default=True)
@click.option('--steps', help='Timed optimizer steps', type=click.IntRange(min=1), default=5, show_default=True)
@click.option('--warmup', help='Untimed steps first', type=click.IntRange(min=0), default=2, show_default=True)
@click.option('--threads', help='torch threads', type=click.IntRange(min=1), default=os.cpu_count(), show_default=True)
@click.option('--fp16', help='Mixed precision of the variants not named *bf16 (those run bf16; off CUDA the original variants run float32, as the original does): False, True/fp16 (CUDA only) or bf16', type=click.Choice(['False', 'True', 'fp16', 'bf16']), default='False', show_default=True)
@click.option('--flops', help='Also report TFLOP/s and the share of the measured matmul rate', is_flag=True)
@click.option('--profile', help='Also print torch.profiler\'s top operators of one step per variant', is_flag=True)
@click.option('--rounds', help='Measure the variants this many times, alternating (medians per variant)', type=click.IntRange(min=1), default=1, show_default=True)
def main(configs, variants, device, steps, warmup, threads, fp16, flops, profile, rounds):
    """Print a table of training images/s and peak memory."""
    names = [c for c in configs.split(',') if c]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise click.BadParameter(f'unknown config(s) {unknown}; choose from {sorted(CONFIGS)}')
    kinds = [v for v in variants.split(',') if v]
    unknown = [v for v in kinds if v not in VARIANTS]
    if unknown or not kinds:
        raise click.BadParameter(f'variants={variants!r}; choose from {",".join(VARIANTS)}', param_hint='--variants')
    print(f'device={device} threads={threads} steps={steps} warmup={warmup} fp16={fp16}')
    print(f'{"config":<10} {"variant":<18} {"params":>10} {"batch":>5} {"img/s":>8} {"s/step":>8} {"first s":>8} '
          f'{"peak GiB":>9}')
    def show(r):
        extra = f' {r["tflops"]:>8.3f} TFLOP/s = {r["tflops"] / r["peak_tflops"]:.0%} of {r["peak_tflops"]:.2f}' if flops else ''
        print(f'{r["config"]:<10} {r["variant"]:<18} {r["params"] / 1e6:>9.2f}M {r["batch"]:>5} {r["img_s"]:>8.2f} '
              f'{r["sec_step"]:>8.3f} {r["first"]:>8.1f} {r["peak_gib"]:>9.2f}{extra}', flush=True)

    for name in names:
        results = {variant: [] for variant in kinds}
        for _ in range(rounds):  # alternating rounds: drift of the machine hits every variant alike
            for variant in kinds:
                r = run_isolated(measure, name=name, variant=variant, device=device, steps=steps, warmup=warmup,
                                 threads=threads, fp16=fp16, flops=flops, profile=profile)
                if 'error' in r:
                    print(f'{name:<10} {variant:<18} error: {r["error"]}')
                    continue
                results[variant].append(r)
                if rounds > 1:
                    print('  round: ', end='')
                show(r)
        if rounds > 1:
            print(f'medians of {rounds} alternating rounds:')
            for variant, rows in results.items():
                if rows:
                    keys = [k for k in ('img_s', 'sec_step', 'peak_gib', 'first', 'tflops', 'peak_tflops') if k in rows[0]]
                    best = dict(rows[0], **{key: statistics.median(r[key] for r in rows) for key in keys})
                    show(best)


if __name__ == '__main__':
    main()
