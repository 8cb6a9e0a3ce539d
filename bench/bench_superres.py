"""Super-resolution bench: an SR3 model against bicubic upsampling and against DPS with an unconditional model.

    python bench/bench_superres.py --docs=docs          # x4 (4x4 -> 16x16), about 12 minutes on 2 CPU cores
    python bench/bench_superres.py --kimg=4 --num_test=64   # a quick look

On the built-in digits (16x16, the science bench's train/test split), the demo's network and budget are trained
three times on the training split:
  sr3            train.py --task=superres --sr_factor=F --precond=edm on the clean images
  sr3-ambient    the same, with 60% of every high-resolution target's pixels missing (--precond=ambient, the
                 low-resolution input is a measurement of the image like the mask)
  unconditional  EDM on the clean images, for DPS
The held-out test digits are downsampled by F (block means) and super-resolved: by `eval.py superres` with each
SR3 model, by `solve_inverse_problems.py --corruption_pattern=averaging --downsampling_factor=F` (DPS, ζ = 1)
with the unconditional model, and by bicubic upsampling. Scores: PSNR and SSIM against the test images and the
digit-feature Fréchet distance of the outputs (`training.digit_score`).

Writes superres.md (the table) and superres.png (rows: low resolution, bicubic, SR3, SR3-ambient, DPS, truth) to
--outdir; --docs copies them there. Every step skips what is on disk.
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo  # noqa: E402
from bench_science import digits_split, publish  # noqa: E402
from dnnlib.util import atomic_write  # noqa: E402
from training import digit_score  # noqa: E402
from training.metrics import mean_psnr  # noqa: E402


def models(factor):
    sr = ['--task=superres', f'--sr_factor={factor}', '--augment=0']
    return {'sr3': sr + ['--precond=edm', '--corruption_probability=0'],
            'sr3-ambient': sr + demo.corruption_args(0.6, 0.1, ambient=True),
            'unconditional': ['--precond=edm', '--corruption_probability=0']}


def run(cmd):
    print(' '.join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def load_pngs(folder, seeds):
    images = [np.array(PIL.Image.open(os.path.join(folder, f'{s:06d}.png'))) for s in seeds]
    return torch.from_numpy(np.stack([x[:, :, None] if x.ndim == 2 else x for x in images])).permute(0, 3, 1, 2)


def scores(folder, seeds, keys):
    """Mean PSNR / SSIM of `keys` from the metrics.jsonl in folder (the last row of each seed)."""
    with open(os.path.join(folder, 'metrics.jsonl'), encoding='utf-8') as f:
        rows = {row['seed']: row for row in map(json.loads, f)}
    return [(mean_psnr if 'psnr' in k else np.mean)([rows[s][k] for s in seeds]) for k in keys]


@click.command()
@click.option('--outdir',   help='Where runs and results go', metavar='DIR', type=str, default='bench-out/superres', show_default=True)
@click.option('--factor',   help='Super-resolution factor', metavar='INT', type=click.IntRange(min=2), default=4, show_default=True)
@click.option('--kimg',     help='Training length of every model', metavar='KIMG', type=click.FloatRange(min=0, min_open=True), default=12, show_default=True)
@click.option('--num_test', help='Held-out test images', metavar='INT', type=click.IntRange(min=70), default=300, show_default=True)
@click.option('--steps',    help='Sampler steps (Heun)', metavar='INT', type=click.IntRange(min=1), default=18, show_default=True)
@click.option('--docs',     help='Also copy superres.md and superres.png here', metavar='DIR', type=str)
def main(outdir, factor, kimg, num_test, steps, docs):
    """Train, super-resolve, score; print and draw the comparison."""
    start = time.time()
    os.makedirs(outdir, exist_ok=True)
    d = digits_split(outdir, num_test)
    train_zip, test_zip, test_images, classifier = d.train_zip, d.test_zip, d.test_images, d.classifier
    seeds = list(range(num_test))
    snapshots = {name: demo.train_model(train_zip, os.path.join(outdir, name), args, kimg)
                 for name, args in models(factor).items()}
    common = [f'--seeds=0-{num_test - 1}', '--batch=100', f'--steps={steps}']
    rows, pictures = [], {}
    for name in ('sr3', 'sr3-ambient'):
        out = os.path.join(outdir, f'{name}-out')
        run([sys.executable, os.path.join(REPO, 'eval.py'), 'superres', f'--network={snapshots[name]}',
             f'--data={test_zip}', f'--outdir={out}', *common])
        pictures[name] = load_pngs(os.path.join(out, 'sr'), seeds)
        rows.append((name, *scores(out, seeds, ('psnr', 'ssim'))))
        if name == 'sr3':
            pictures['bicubic'] = load_pngs(os.path.join(out, 'bicubic'), seeds)
            pictures['low resolution'] = load_pngs(os.path.join(out, 'lowres'), seeds)
            rows.insert(0, ('bicubic', *scores(out, seeds, ('bicubic_psnr', 'bicubic_ssim'))))
    out = os.path.join(outdir, 'dps-out')
    run([sys.executable, os.path.join(REPO, 'solve_inverse_problems.py'), f'--network={snapshots["unconditional"]}',
         f'--measurements_path={test_zip}', f'--outdir={out}', '--corruption_pattern=averaging',
         f'--downsampling_factor={factor}', '--dps_scale=1', *common])
    pictures['DPS (unconditional)'] = load_pngs(os.path.join(out, 'reconstruction'), seeds)
    rows.append(('DPS (unconditional)', *scores(out, seeds, ('psnr', 'ssim'))))
    lines = [f'| method (x{factor}, {num_test} test digits) | PSNR (dB) | SSIM | FD (classifier) |', '|---|---|---|---|']
    for name, psnr, ssim in rows:
        fd = digit_score.score_images(classifier, pictures[name], test_images)['fd']
        lines.append(f'| {name} | {psnr:.2f} | {ssim:.3f} | {fd:.2f} |')
    text = '\n'.join(lines)
    print('\n' + text)
    with atomic_write(os.path.join(outdir, 'superres.md'), 'w') as f:
        f.write(text + '\n')
    picture_rows = [('low resolution', pictures['low resolution']), ('bicubic', pictures['bicubic']),
                    ('SR3', pictures['sr3']), ('SR3, ambient', pictures['sr3-ambient']),
                    ('DPS (unconditional)', pictures['DPS (unconditional)']), ('truth', test_images)]
    demo.draw_summary(picture_rows, os.path.join(outdir, 'superres.png'))
    publish(outdir, ('superres.md', 'superres.png'), docs, start)


if __name__ == '__main__':
    main()
