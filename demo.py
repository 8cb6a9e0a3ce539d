"""End-to-end demo on the built-in digits dataset: build it, corrupt it, train an ambient model on it, sample.

    python demo.py --outdir=demo-out

Every step skips work already on disk, so a rerun picks up where the last one stopped.
"""

import os
import subprocess
import sys
import time

import click
import numpy as np
import PIL.Image
import torch

from torch_utils import checkpoints
from training.dataset import ImageFolderDataset
from torch_utils.images import make_grid, save_image_grid, save_png

REPO = os.path.dirname(os.path.abspath(__file__))

# The demo model: a small DDPM++ that trains on 2 CPU cores in a few minutes (bench/bench_train.py --configs=demo).
TRAIN_BATCH = 32
TRAIN_KIMG = 5
TRAIN_ARGS = ['--arch=ddpmpp', '--cbase=32', '--cres=1,2,2', '--num_blocks=2', '--attn=8', '--dropout=0', '--augment=0',
              '--lr=2e-3', '--lr_rampup=1', '--ema=0.002', '--max_grad_norm=1', '--seed=0']
# Sampling stops at σ = 0.1 instead of 0.002. On pixels the network cannot see, D = c_out(σ)·F with c_out ≈ σ
# for small σ (the skip term carries only observed pixels), so F must reach x0/σ there; a model trained for a
# few kimg does that well down to σ ≈ 0.1 but not at the σ < 0.05 it has hardly seen, and sampling to 0.002
# leaves the hidden pixels as speckle.
SAMPLE_SIGMA_MIN = 0.1


def build_dataset(dest):
    if os.path.exists(dest):
        print(f'Dataset: {dest} (already built)')
        return
    cmd = [sys.executable, os.path.join(REPO, 'dataset_tool.py'), '--source=builtin:digits', f'--dest={dest}']
    print('Building the dataset:', ' '.join(cmd[1:]))
    subprocess.run(cmd, check=True)


def train_model(data, run_dir, corruption):
    """Train the demo model on the corrupted digits; a rerun resumes or skips a finished run."""
    final = _final_snapshot(run_dir)
    if final is not None:
        print(f'Model: {final} (already trained)')
        return final
    cmd = [sys.executable, os.path.join(REPO, 'train.py'), f'--outdir={run_dir}', '--nosubdir', f'--data={data}',
           f'--batch={TRAIN_BATCH}', f'--duration={TRAIN_KIMG / 1000}', '--tick=1', '--snap=5', '--dump=1',
           '--corruption_pattern=dust', f"--corruption_probability={corruption['corruption_probability']}",
           f"--delta_probability={corruption['delta_probability']}", *TRAIN_ARGS]
    if os.path.isdir(run_dir) and any(f.startswith('training-state-') for f in os.listdir(run_dir)):
        cmd.append(f'--resume={run_dir}')
    print('Training:', ' '.join(cmd[1:]))
    subprocess.run(cmd, check=True)
    return _final_snapshot(run_dir)


def _final_snapshot(run_dir):
    """The snapshot written at the end of training (kimg >= TRAIN_KIMG), or None."""
    if not os.path.isdir(run_dir):
        return None
    done = [path for nimg, path in checkpoints.list_snapshots(run_dir) if nimg is not None and nimg >= TRAIN_KIMG * 1000]
    return done[-1] if done else None


def sample_model(snapshot, outdir, seeds='0-63'):
    """64 samples with the fixed-mask ambient sampler (eval.py generate skips images already there)."""
    cmd = [sys.executable, os.path.join(REPO, 'eval.py'), 'generate', f'--network={snapshot}', f'--outdir={outdir}',
           f'--seeds={seeds}', '--batch=64', f'--sigma_min={SAMPLE_SIGMA_MIN}']
    print('Sampling:', ' '.join(cmd[1:]))
    subprocess.run(cmd, check=True)
    tag = os.path.basename(snapshot)[len('network-snapshot-'):-len('.pt')]
    return os.path.join(outdir, f'grid-{tag}.png')


def denoising_error(snapshot, data, outdir):
    """Error of the denoiser per σ on visible and hidden pixels (why sampling stops at SAMPLE_SIGMA_MIN)."""
    if os.path.exists(os.path.join(outdir, 'denoising-error.png')):
        print(f'Denoising error: {outdir}/denoising-error.png (already there)')
        return
    cmd = [sys.executable, os.path.join(REPO, 'eval.py'), 'denoise', f'--network={snapshot}', f'--data={data}',
           f'--outdir={outdir}', '--seeds=0-63']
    print('Denoising error per noise level:', ' '.join(cmd[1:]))
    subprocess.run(cmd, check=True)


def draw_summary(data, samples_grid, dest, corruption, num=64):
    """The corrupted training data (left) next to samples of the model trained on it (right)."""
    dataset = ImageFolderDataset(data, **corruption)
    observations = torch.stack([dataset[(i, 0)][0] for i in range(num)])
    left = make_grid(observations, grid_w=8)
    right = np.array(PIL.Image.open(samples_grid))
    right = right[:, :, None] if right.ndim == 2 else right
    gap = np.full((left.shape[0], 8, left.shape[2]), 255, dtype=np.uint8)
    summary = np.concatenate([left, gap, right], axis=1).repeat(2, axis=0).repeat(2, axis=1)
    save_png(summary, dest)
    print(f'Corrupted training data (left) and samples (right): {dest}')


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
@click.option('--delta_probability', help='Further corruption (δ)', metavar='FLOAT', type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True)
def main(outdir, corruption_probability, delta_probability):
    """Run the demo pipeline on the built-in digits dataset."""
    os.makedirs(outdir, exist_ok=True)
    data = os.path.join(outdir, 'digits.zip')
    build_dataset(data)
    corruption = dict(corruption_pattern='dust', corruption_probability=corruption_probability,
        delta_probability=delta_probability)
    draw_corruption(data, os.path.join(outdir, 'dataset-corruption.png'), corruption)
    start = time.time()
    run_dir = os.path.join(outdir, 'run')
    snapshot = train_model(data, run_dir, corruption)
    print(f'Training run: {run_dir} ({time.time() - start:.0f} s): loss.png (loss curves), training-data.png '
          '(what the model saw), stats.jsonl, network snapshots')
    samples_grid = sample_model(snapshot, os.path.join(outdir, 'samples'))
    draw_summary(data, samples_grid, os.path.join(outdir, 'summary.png'), corruption)
    denoising_error(snapshot, data, os.path.join(outdir, 'denoising-error'))
    print(f'Samples: {samples_grid}')


if __name__ == '__main__':
    main()
