"""End-to-end demo on the built-in digits: a model trained only on corrupted digits generates digits.

    python demo.py --outdir=demo-out

Builds the digits dataset (16x16), hides 60% of every image's pixels, and trains two models on the same
corrupted images with the same network and budget: an ambient model (mask-aware preconditioning) and a
naive EDM model that takes the zero-filled observations for clean images. Both are sampled at the
library's default σ_min = 0.002 and scored with a Fréchet distance in the features of a small digit
classifier trained on the clean digits (`training.digit_score`). `summary.png` shows, row by row: corrupted
training images | ambient samples | naive samples | clean training images.

Every step skips work already on disk, so a rerun picks up where the last one stopped.
`bench/bench_science.py` runs the same recipe with a held-out split and more baselines.
"""

import json
import os
import subprocess
import sys
import time

import click
import numpy as np
import PIL.Image
import torch

from dnnlib.util import atomic_write
from torch_utils.images import make_grid, save_image_grid
from training import digit_score, snapshots
from training.dataset import ImageFolderDataset

REPO = os.path.dirname(os.path.abspath(__file__))

# The demo model: a small gated DDPM++ at 16x16 (the digits are 8x8 originals, so 16x16 loses nothing).
RESOLUTION = 16
TRAIN_BATCH = 32
TRAIN_KIMG = 10
TRAIN_ARGS = ['--arch=ddpmpp', '--cbase=32', '--cres=1,2,2', '--num_blocks=2', '--attn=8', '--dropout=0', '--augment=0',
              '--lr=2e-3', '--lr_rampup=1', '--ema=0.002', '--max_grad_norm=1']
NUM_SAMPLES = 128


def corruption_args(corruption_probability, delta_probability, ambient=True):
    """train.py options of a model trained on the dust-corrupted digits: ambient, or naive EDM (δ unused)."""
    if ambient:
        return ['--precond=ambient', '--corruption_pattern=dust', f'--corruption_probability={corruption_probability}',
                f'--delta_probability={delta_probability}']
    return ['--precond=edm', '--corruption_pattern=dust', f'--corruption_probability={corruption_probability}',
            '--delta_probability=0']


def build_dataset(dest, resolution=RESOLUTION):
    if os.path.exists(dest):
        print(f'Dataset: {dest} (already built)')
        return
    cmd = [sys.executable, os.path.join(REPO, 'dataset_tool.py'), '--source=builtin:digits', f'--dest={dest}',
           f'--resolution={resolution}x{resolution}']
    print('Building the dataset:', ' '.join(cmd[1:]))
    subprocess.run(cmd, check=True)


def train_model(data, run_dir, args, kimg=TRAIN_KIMG, batch=TRAIN_BATCH, seed=0):
    """Train with train.py `args` for `kimg`; a rerun resumes an interrupted run or skips a finished one."""
    final = final_snapshot(run_dir, kimg)
    if final is not None:
        print(f'Model: {final} (already trained)')
        return final
    tick = max(kimg / 4, 0.001)
    cmd = [sys.executable, os.path.join(REPO, 'train.py'), f'--outdir={run_dir}', '--nosubdir', f'--data={data}',
           f'--batch={batch}', f'--duration={kimg / 1000}', f'--tick={tick:g}', '--snap=4', '--dump=1', f'--seed={seed}',
           *TRAIN_ARGS, *args]
    if os.path.isdir(run_dir) and any(f.startswith('training-state-') for f in os.listdir(run_dir)):
        cmd.append(f'--resume={run_dir}')
    print('Training:', ' '.join(cmd[1:]))
    subprocess.run(cmd, check=True)
    return final_snapshot(run_dir, kimg)


def final_snapshot(run_dir, kimg):
    """The snapshot written at the end of training (at least `kimg`), or None."""
    if not os.path.isdir(run_dir):
        return None
    done = [path for nimg, path in snapshots.list_snapshots(run_dir) if nimg is not None and nimg >= kimg * 1000]
    return done[-1] if done else None


def sample_model(snapshot, outdir, num=NUM_SAMPLES, extra_args=()):
    """`num` samples with eval.py generate at its defaults (18 Heun steps down to σ = 0.002; skips images
    already there). Returns (uint8 samples [num, C, H, W], path of the 8x8 grid)."""
    cmd = [sys.executable, os.path.join(REPO, 'eval.py'), 'generate', f'--network={snapshot}', f'--outdir={outdir}',
           f'--seeds=0-{num - 1}', '--batch=256', *extra_args]
    print('Sampling:', ' '.join(cmd[1:]))
    subprocess.run(cmd, check=True)
    tag = os.path.basename(snapshot)[len('network-snapshot-'):-len('.pt')]
    images = [np.array(PIL.Image.open(os.path.join(outdir, tag, f'{seed:06d}.png'))) for seed in range(num)]
    images = torch.from_numpy(np.stack([x[:, :, None] if x.ndim == 2 else x for x in images])).permute(0, 3, 1, 2)
    return images, os.path.join(outdir, f'grid-{tag}.png')


def load_clean(data):
    """All clean images (uint8 [N, C, H, W]) and int labels [N] of a dataset (evaluation only)."""
    dataset = ImageFolderDataset(data, mode='clean', normalize=False, use_labels=True)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.as_tensor(np.stack([dataset.get_label(i) for i in range(len(dataset))])).argmax(1)
    return images, labels


def denoising_error(snapshot, data, outdir, seeds='0-127'):
    """Error of the denoiser per σ on the pixels it sees and on those hidden from it (eval.py denoise)."""
    if not os.path.exists(os.path.join(outdir, 'denoising-error.jsonl')):
        cmd = [sys.executable, os.path.join(REPO, 'eval.py'), 'denoise', f'--network={snapshot}', f'--data={data}',
               f'--outdir={outdir}', f'--seeds={seeds}']
        print('Denoising error per noise level:', ' '.join(cmd[1:]))
        subprocess.run(cmd, check=True)
    with open(os.path.join(outdir, 'denoising-error.jsonl'), encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip()][-1]


def draw_summary(rows, dest, per_row=16):
    """One PNG, one row per (name, uint8 images [N, C, H, W]), names written on the left."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(per_row * 0.5 + 2.2, len(rows) * 0.62 + 0.2), dpi=120)
    FigureCanvasAgg(fig)
    for i, (name, images) in enumerate(rows):
        ax = fig.add_axes([2.2 / (per_row * 0.5 + 2.2), 1 - (i + 1) / len(rows), 1 - 2.2 / (per_row * 0.5 + 2.2), 1 / len(rows) * 0.92])
        grid = make_grid(images[:per_row], grid_w=per_row, pad=1)
        ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap='gray', vmin=0, vmax=255, interpolation='nearest')
        ax.set_axis_off()
        ax.text(-0.01, 0.5, name, transform=ax.transAxes, ha='right', va='center', fontsize=8)
    with atomic_write(dest, 'wb') as f:
        fig.savefig(f, format='png')


def draw_corruption(data, dest, corruption, num=16):
    """Rows: clean images (evaluation view), the training observations A ⊙ x0, and Ã ⊙ x0."""
    clean = ImageFolderDataset(data, mode='clean', **corruption)
    rows = [[], [], []]
    for i in range(num):
        x0, _, A, A_hat = clean[(i, 0)]
        rows[0].append(x0)
        rows[1].append(A * x0)
        rows[2].append(A_hat * x0)
    save_image_grid(torch.stack(rows[0] + rows[1] + rows[2]), dest, grid_w=num, pad=2, scale=2)
    print(f'Corruption picture (rows: clean, observed A*x0, further corrupted Ã*x0): {dest}')


@click.command()
@click.option('--outdir', help='Where the demo writes everything', metavar='DIR', type=str, default='demo-out', show_default=True)
@click.option('--corruption_probability', help='Fraction of pixels missing (p)', metavar='FLOAT', type=click.FloatRange(0, 1, max_open=True), default=0.6, show_default=True)
@click.option('--delta_probability', help='Further corruption (δ) of the ambient model', metavar='FLOAT', type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1, show_default=True)
@click.option('--kimg', help='Training length of each model', metavar='KIMG', type=click.FloatRange(min=0, min_open=True), default=TRAIN_KIMG, show_default=True)
def main(outdir, corruption_probability, delta_probability, kimg):
    """Train an ambient and a naive model on the corrupted built-in digits, sample both, score both."""
    start = time.time()
    os.makedirs(outdir, exist_ok=True)
    data = os.path.join(outdir, 'digits.zip')
    build_dataset(data)
    corruption = dict(corruption_pattern='dust', corruption_probability=corruption_probability,
        delta_probability=delta_probability)
    draw_corruption(data, os.path.join(outdir, 'dataset-corruption.png'), corruption)

    models = dict(ambient=corruption_args(corruption_probability, delta_probability, ambient=True),
                  naive=corruption_args(corruption_probability, delta_probability, ambient=False))
    snapshots = {name: train_model(data, os.path.join(outdir, f'run-{name}'), args, kimg) for name, args in models.items()}
    samples = {name: sample_model(path, os.path.join(outdir, f'samples-{name}'))[0] for name, path in snapshots.items()}

    clean, labels = load_clean(data)
    classifier = digit_score.load_or_train_classifier(os.path.join(outdir, 'digit-classifier.pt'), clean, labels)
    scores = {name: digit_score.score_images(classifier, images, clean) for name, images in samples.items()}
    observed = ImageFolderDataset(data, **corruption)
    corrupted = torch.stack([((observed[i][0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8) for i in range(16)])
    rows = [('corrupted training data', corrupted),
            (f'ambient samples (FD {scores["ambient"]["fd"]:.1f})', samples['ambient']),
            (f'naive samples (FD {scores["naive"]["fd"]:.1f})', samples['naive']),
            ('clean training data', clean[:16])]
    draw_summary(rows, os.path.join(outdir, 'summary.png'))
    denoising_error(snapshots['ambient'], data, os.path.join(outdir, 'denoising-error'))
    with atomic_write(os.path.join(outdir, 'scores.json'), 'w') as f:
        json.dump(scores, f, indent=2)

    print(f'\nClassifier-feature Fréchet distance to the clean digits (lower is better; {NUM_SAMPLES} samples each):')
    for name in samples:
        s = scores[name]
        print(f'  {name:8s} FD {s["fd"]:7.2f}   pixel FD {s["fd_pixel"]:7.2f}   confidence {s["confidence"]:.2f}   '
              f'digit classes {s["classes"]}/10')
    print(f'Summary picture: {os.path.join(outdir, "summary.png")} (rows: corrupted data, ambient samples, naive samples, '
          f'clean data); done in {time.time() - start:.0f} s')


if __name__ == '__main__':
    main()
