"""End-to-end demo on the built-in digits dataset: build it, corrupt it, train an ambient model on it.

    python demo.py --outdir=demo-out

Every step skips work already on disk, so a rerun picks up where the last one stopped.
"""

import os
import subprocess
import sys
import time

import click
import torch

from training.dataset import ImageFolderDataset
from torch_utils.images import save_image_grid

REPO = os.path.dirname(os.path.abspath(__file__))

# The demo model: a small DDPM++ that trains on 2 CPU cores in a few minutes (bench/bench_train.py --configs=demo).
TRAIN_BATCH = 32
TRAIN_KIMG = 5
TRAIN_ARGS = ['--arch=ddpmpp', '--cbase=32', '--cres=1,2,2', '--num_blocks=2', '--attn=8', '--dropout=0', '--augment=0',
              '--lr=2e-3', '--lr_rampup=1', '--ema=0.002', '--seed=0']


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
    snaps = [(float(f[len('network-snapshot-'):-3]), f) for f in os.listdir(run_dir)
             if f.startswith('network-snapshot-') and f.endswith('.pt')]
    done = [f for kimg, f in sorted(snaps) if kimg >= TRAIN_KIMG]
    return os.path.join(run_dir, done[-1]) if done else None


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
    train_model(data, run_dir, corruption)
    print(f'Training run: {run_dir} ({time.time() - start:.0f} s): loss.png (loss curves), training-data.png '
          '(what the model saw), stats.jsonl, network snapshots')


if __name__ == '__main__':
    main()
