"""Feature-extraction throughput of find_dataset_neighbors.py: images/s through its `extract_features`
(preprocessing of [-1, 1] images, resize to --image_size, DINOv2 forward, L2 normalisation).

    python bench/bench_neighbors.py                                   # tiny DINOv2 on CPU, batches 1,8,32
    python bench/bench_neighbors.py --config=giant --device=cuda --batches=16,64,256

Configs (random weights, built from `Dinov2Config`; nothing is downloaded):
  tiny   hidden 32, 2 layers, 2 heads, patch 14 (the tests' kind of model; measures the pipeline overhead)
  small  ViT-S/14 (facebook/dinov2-small): hidden 384, 12 layers, 6 heads, MLP 1536
  giant  ViT-g/14 (facebook/dinov2-giant, the default --model): hidden 1536, 40 layers, 24 heads, SwiGLU MLP
Each batch size runs in a fresh process (peak memory belongs to it alone); rates use the median time per batch.
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
    'tiny': dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=224),
    'small': dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, image_size=518),
    'giant': dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, mlp_ratio=4, use_swiglu_ffn=True,
                  image_size=518),
}


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def measure(config, device, batch, resolution, image_size, iters, warmup, threads, seed=0):
    """Images/s and peak memory of `extract_features` for one batch size (runs in its own process)."""
    from transformers import Dinov2Config, Dinov2Model

    import dnnlib
    import find_dataset_neighbors as fdn

    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    torch.manual_seed(seed)
    with torch.device(device):
        net = Dinov2Model(Dinov2Config(patch_size=14, **CONFIGS[config])).eval().requires_grad_(False)
    params = dnnlib.EasyDict(image_size=image_size, mean=list(fdn.IMAGENET_MEAN), std=list(fdn.IMAGENET_STD))
    gen = torch.Generator(device).manual_seed(seed)
    images = torch.rand([batch, 3, resolution, resolution], generator=gen, device=device) * 2 - 1
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        fdn.extract_features(net, images, params)
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        fdn.extract_features(net, images, params)
        _sync(device)
        times.append(time.perf_counter() - start)
    if device.type == 'cuda':
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    seconds = statistics.median(times)
    return dict(config=config, batch=batch, params=sum(p.numel() for p in net.parameters()), rate=batch / seconds,
                ms=1000 * seconds, peak_mb=peak / 2 ** 20)


def _int_list(ctx, param, value):
    try:
        items = [int(item) for item in value.split(',') if item.strip()]
    except ValueError:
        items = []
    if not items or min(items) < 1:
        raise click.BadParameter(f'{value!r}: expected comma-separated positive integers')
    return items


@click.command()
@click.option('--config',     help='Model size', type=click.Choice(list(CONFIGS)), default='tiny', show_default=True)
@click.option('--device',     help='Device to run on', metavar='STR', default='cpu', show_default=True)
@click.option('--batches',    help='Comma-separated batch sizes', metavar='LIST', default='1,8,32', show_default=True, callback=_int_list)
@click.option('--resolution', help='Resolution of the input images', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--image_size', help='Model input size (multiple of 14)', metavar='INT', type=click.IntRange(min=14), default=224, show_default=True)
@click.option('--iters',      help='Timed batches', metavar='INT', type=click.IntRange(min=1), default=5, show_default=True)
@click.option('--warmup',     help='Untimed batches first', metavar='INT', type=click.IntRange(min=0), default=1, show_default=True)
@click.option('--threads',    help='torch.set_num_threads (0: default)', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
def main(config, device, batches, resolution, image_size, iters, warmup, threads):
    """Benchmark DINOv2 feature extraction for find_dataset_neighbors.py."""
    if torch.device(device).type == 'cuda' and not torch.cuda.is_available():
        raise click.BadParameter(f'--device={device}: CUDA is not available here; use --device=cpu', param_hint='--device')
    if image_size % 14:
        raise click.BadParameter(f'{image_size} is not a multiple of the patch size 14', param_hint='--image_size')
    print(f'config={config} device={device} {resolution}px -> {image_size}px iters={iters} warmup={warmup} '
          f'threads={threads or torch.get_num_threads()} torch={torch.__version__}')
    rows = [run_isolated(measure, config=config, device=device, batch=batch, resolution=resolution,
                         image_size=image_size, iters=iters, warmup=warmup, threads=threads) for batch in batches]
    memory = 'peak MiB (alloc)' if torch.device(device).type == 'cuda' else 'peak RSS MiB'
    header = f'{"config":<7} {"batch":>6} {"params":>10} {"img/s":>10} {"ms/batch":>10} {memory:>17}'
    print()
    print(header)
    print('-' * len(header))
    for r in rows:
        if 'error' in r:
            print(f'{r["config"]:<7} {r["batch"]:>6} failed: {r["error"]}')
            continue
        print(f'{r["config"]:<7} {r["batch"]:>6} {r["params"] / 1e6:>9.2f}M {r["rate"]:>10.2f} {r["ms"]:>10.1f} '
              f'{r["peak_mb"]:>17.0f}')


if __name__ == '__main__':
    main()
