"""bfloat16 on a CPU: does a network trained or sampled in bfloat16 still learn the clean digits, and how much
faster is it?

    python bench/bench_precision.py --docs=docs          # ~8 minutes on 2 CPU cores
    python bench/bench_precision.py --kimg=4 --samples=128

The demo's ambient model (60% of pixels missing, δ = 0.1) is trained twice on the science bench's digit training
split, same seed and budget: in float32, and with `train.py --fp16=bf16` (float32 weights and optimizer, the network
in bfloat16). Each model is sampled in both precisions (`eval.py generate --precision=fp32|bf16`, 18 Heun steps,
the same seeds) and scored against the held-out test split (`training.digit_score`). Wall times include each
command's start-up; they are kept in timings.json, so a rerun that skips finished work reports the times of
the run that did it ('–' where that run left none). bfloat16 is fast only on CPUs with AVX512-BF16 or AMX (and on GPUs); elsewhere it is emulated
and slower than float32.

Writes precision.json, precision.md and precision.png (sample rows, FD bars) to --outdir; --docs copies the table
and figure there. Every step skips what is on disk.
"""

import glob
import json
import os
import sys
import time

import click

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo  # noqa: E402
from bench_science import MODELS, digits_split, draw_sample_rows, save_results  # noqa: E402
from dnnlib.util import atomic_write  # noqa: E402
from training import digit_score  # noqa: E402

TRAIN = {'fp32': [], 'bf16': ['--fp16=bf16']}


def cpu_flags():
    """The CPU's bfloat16 instruction sets, from /proc/cpuinfo (empty where unknown)."""
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            flags = next((line.split(':', 1)[1].split() for line in f if line.startswith('flags')), [])
    except OSError:
        return []
    return sorted(flag for flag in flags if flag in ('avx512_bf16', 'amx_bf16', 'avx512f', 'avx2'))


def _seconds(value, digits=0):
    """A wall time for the table; '–' where an earlier run did the work and left no time."""
    return '–' if value is None else f'{value:.{digits}f}'


def draw(results, rows, dest):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 0.75 * len(rows) + 1.4), dpi=110)
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(len(rows), 2, width_ratios=[2.4, 1], left=0.17, right=0.97, top=0.92, bottom=0.18, wspace=0.45)
    draw_sample_rows(fig, gs, rows, fontsize=8)
    ax = fig.add_subplot(gs[:, 1])
    names = [f'train {r["train"]}, sample {r["sample"]}' for r in results]
    ax.barh(names[::-1], [r['fd'] for r in results][::-1], color='C0')
    ax.set_xlabel('FD to held-out digits (lower is better)')
    ax.tick_params(axis='y', labelsize=8)
    with atomic_write(dest, 'wb') as f:
        fig.savefig(f, format='png')


@click.command()
@click.option('--outdir',   help='Where runs, samples and results go', metavar='DIR', type=str, default='bench-out/precision', show_default=True)
@click.option('--kimg',     help='Training length of each model', metavar='KIMG', type=click.FloatRange(min=0, min_open=True), default=demo.TRAIN_KIMG, show_default=True)
@click.option('--samples',  help='Samples per model and precision', metavar='INT', type=click.IntRange(min=70), default=300, show_default=True)
@click.option('--num_test', help='Held-out test images', metavar='INT', type=click.IntRange(min=70), default=300, show_default=True)
@click.option('--docs',     help='Also copy precision.md and precision.png here', metavar='DIR', type=str)
def main(outdir, kimg, samples, num_test, docs):
    """Train in float32 and bfloat16, sample each in both, score; print and draw the comparison."""
    start = time.time()
    os.makedirs(outdir, exist_ok=True)
    d = digits_split(outdir, num_test)
    results, rows = [], []
    timings_path = os.path.join(outdir, 'timings.json')
    timings = json.load(open(timings_path, encoding='utf-8')) if os.path.exists(timings_path) else {}

    def timed(key, fn, done_before):
        t0 = time.time()
        value = fn()
        timings.setdefault(key, None if done_before else time.time() - t0)  # a rerun skips the work: keep the first time
        with atomic_write(timings_path, 'w') as f:
            json.dump(timings, f, indent=2)
        return value, timings[key]

    for train in TRAIN:
        run_dir = os.path.join(outdir, f'train-{train}-{kimg:g}kimg')
        snapshot, train_s = timed(os.path.basename(run_dir), lambda: demo.train_model(
            d.train_zip, run_dir, MODELS['ambient-0.6'] + TRAIN[train], kimg), demo.final_snapshot(run_dir, kimg))
        for sample in ('fp32', 'bf16'):
            sample_dir = f'{run_dir}-sample-{sample}'
            done = os.path.isdir(sample_dir) and len(glob.glob(os.path.join(sample_dir, '*', '*.png'))) >= samples
            (images, _), sample_s = timed(f'{os.path.basename(sample_dir)}-{samples}', lambda: demo.sample_model(
                snapshot, sample_dir, num=samples, extra_args=[f'--precision={sample}']), done)
            score = digit_score.score_images(d.classifier, images, d.test_images)
            results.append(dict(train=train, sample=sample, train_s=train_s, sample_s=sample_s, **score))
            rows.append((f'train {train}, sample {sample} (FD {score["fd"]:.1f})', images))
            print(f'train {train} ({_seconds(train_s)} s), sample {sample} ({_seconds(sample_s)} s): FD {score["fd"]:.2f}',
                  flush=True)
    lines = [f'CPU flags: {" ".join(cpu_flags()) or "unknown"}; {kimg:g} kimg per model, {samples} samples each '
             '(wall times include start-up).', '',
             '| trained in | sampled in | training s | sampling s | FD (classifier) | FD (pixels) | confidence | classes |',
             '|---|---|---|---|---|---|---|---|']
    lines += [f'| {r["train"]} | {r["sample"]} | {_seconds(r["train_s"])} | {_seconds(r["sample_s"], 1)} | {r["fd"]:.2f} | '
              f'{r["fd_pixel"]:.2f} | {r["confidence"]:.2f} | {r["classes"]}/10 |' for r in results]
    text = '\n'.join(lines)
    print('\n' + text)
    save_results(outdir, 'precision', dict(kimg=kimg, samples=samples, num_test=num_test, cpu_flags=cpu_flags(),
                 results=results), text, lambda dest: draw(results, rows, dest), docs, start, json_name='precision.json')


if __name__ == '__main__':
    main()
