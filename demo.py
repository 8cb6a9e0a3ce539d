"""End-to-end demo on the built-in digits dataset: build it, corrupt it, and show what the model will see.

    python demo.py --outdir=demo-out

Every step skips work already on disk, so a rerun picks up where the last one stopped.
"""

import os
import subprocess
import sys

import click
import torch

from training.dataset import ImageFolderDataset
from torch_utils.images import save_image_grid

REPO = os.path.dirname(os.path.abspath(__file__))


def build_dataset(dest):
    if os.path.exists(dest):
        print(f'Dataset: {dest} (already built)')
        return
    cmd = [sys.executable, os.path.join(REPO, 'dataset_tool.py'), '--source=builtin:digits', f'--dest={dest}']
    print('Building the dataset:', ' '.join(cmd[1:]))
    subprocess.run(cmd, check=True)


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


if __name__ == '__main__':
    main()
