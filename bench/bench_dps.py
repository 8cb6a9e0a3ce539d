"""Inverse problems with the demo model: DPS (solve_inverse_problems.py) against the naive baselines.

    make demo && python bench/bench_dps.py                 # the demo's ambient model, digits 0-63
    python bench/bench_dps.py --network=<snapshot> --data=<clean images .zip> --seeds=0-15

Runs solve_inverse_problems.py once per operator (per-sample norm, down to σ_min = 0.002; by default 50 Heun
steps and ζ = 1, the best of ζ ∈ {0.25, 0.5, 1, 2, 5, 20, 60} with 18 and 50 steps on digits 0-31 of the
demo's 16x16 model for random and box inpainting) and prints a table of mean PSNR / SSIM for DPS and for the naive baseline of each
operator (zero-filled image, upsampled image, the blurred image itself, pseudo-inverse). Each operator's
results go to `{outdir}/{operator}/`; finished images are skipped on a rerun. A second table puts the three
inpainting methods side by side on random (dust 40%) and box inpainting, same network, steps and seeds: DPS,
replacement (`--method=replace`) and RePaint (`--method=repaint --jump_length=5 --jump_n_sample=3`).
"""

import glob
import json
import os
import subprocess
import sys
import time

import click
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from training.metrics import mean_psnr  # noqa: E402

# (folder, name, solve_inverse_problems.py options), for 16x16 grayscale digits.
OPERATORS = [
    ('dust40', 'dust, 40% hidden (zero-filled)', ['--corruption_pattern=dust']),
    ('dust70', 'dust, 70% hidden (zero-filled)', ['--corruption_pattern=dust', '--operator_corruption_probability=0.7']),
    ('box40', 'box_masking, 40% box (zero-filled)', ['--corruption_pattern=box_masking']),
    ('avg4', 'averaging x4 (upsampled)', ['--corruption_pattern=averaging', '--downsampling_factor=4']),
    ('gauss', 'gaussian blur 9x9, std 3 (blurred)', ['--corruption_pattern=blurring', '--blur_type=gaussian']),
    ('motion', 'motion blur 9x9 (blurred)', ['--corruption_pattern=blurring', '--blur_type=motion']),
    ('cs64', 'compressed sensing m=64 of 256 (pseudo-inverse)', ['--corruption_pattern=compressed_sensing', '--num_measurements=64']),
]
# (folder suffix, name, solve_inverse_problems.py options) of the inpainting methods compared on dust40 and box40.
METHODS = [('replace', 'replace', ['--method=replace']),
           ('repaint', 'RePaint (jump 5, 3 passes)', ['--method=repaint', '--jump_length=5', '--jump_n_sample=3'])]


def _summary(outdir):
    """Mean scores from the metrics.jsonl in `outdir` (or in its one snapshot folder, for a run directory)."""
    paths = sorted(glob.glob(os.path.join(outdir, 'metrics.jsonl')) + glob.glob(os.path.join(outdir, '*', 'metrics.jsonl')))
    rows = {}
    with open(paths[-1], encoding='utf-8') as f:
        for line in f:
            row = json.loads(line)
            rows[row['seed']] = row
    rows = list(rows.values())
    mean = lambda key: (mean_psnr if 'psnr' in key else np.mean)([r[key] for r in rows])  # noqa: E731
    return dict(psnr=mean('psnr'), ssim=mean('ssim'), baseline_psnr=mean('baseline_psnr'),
                baseline_ssim=mean('baseline_ssim'), seconds=mean('seconds'), num_images=len(rows))


@click.command()
@click.option('--network', help='Snapshot or run directory', metavar='PT|DIR', type=str, default='demo-out/run-ambient', show_default=True)
@click.option('--data',    help='Ground-truth images', metavar='ZIP', type=str, default='demo-out/digits.zip', show_default=True)
@click.option('--outdir',  help='Where results go', metavar='DIR', type=str, default='bench-out/dps', show_default=True)
@click.option('--seeds',   help='Images (dataset index = seed)', metavar='LIST', type=str, default='0-63', show_default=True)
@click.option('--operators', help='Comma-separated indices into the operator list (default: all)', metavar='LIST', type=str)
@click.option('--dps_scale', help='DPS weight ζ', metavar='FLOAT', type=click.FloatRange(min=0), default=1, show_default=True)
@click.option('--steps',   help='Heun steps', metavar='INT', type=click.IntRange(min=1), default=50, show_default=True)
def main(network, data, outdir, seeds, operators, dps_scale, steps):
    """DPS against the naive baseline for every operator; prints a markdown table."""
    chosen = OPERATORS if operators is None else [OPERATORS[int(i)] for i in operators.split(',')]
    lines = ['| operator | DPS PSNR | baseline PSNR | DPS SSIM | baseline SSIM | s/image |', '|---|---|---|---|---|---|']
    start = time.time()
    for folder, name, args in chosen:
        op_dir = os.path.join(outdir, f'{folder}-zeta{dps_scale:g}-steps{steps}')
        cmd = [sys.executable, os.path.join(REPO, 'solve_inverse_problems.py'), f'--network={network}', '--latest',
               f'--measurements_path={data}', f'--seeds={seeds}', '--batch=64', f'--outdir={op_dir}',
               f'--dps_scale={dps_scale}', f'--steps={steps}', *args]
        print(' '.join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        s = _summary(op_dir)
        lines.append(f'| {name} | {s["psnr"]:.2f} | {s["baseline_psnr"]:.2f} | {s["ssim"]:.3f} | {s["baseline_ssim"]:.3f} '
                     f'| {s["seconds"]:.2f} |')
    methods = ['| operator | method | PSNR | SSIM | s/image |', '|---|---|---|---|---|']
    for folder, name, args in [op for op in chosen if op[0] in ('dust40', 'box40')]:
        dps = _summary(os.path.join(outdir, f'{folder}-zeta{dps_scale:g}-steps{steps}'))
        methods.append(f'| {name} | DPS (ζ = {dps_scale:g}) | {dps["psnr"]:.2f} | {dps["ssim"]:.3f} | {dps["seconds"]:.2f} |')
        for suffix, method, method_args in METHODS:
            op_dir = os.path.join(outdir, f'{folder}-{suffix}-steps{steps}')
            cmd = [sys.executable, os.path.join(REPO, 'solve_inverse_problems.py'), f'--network={network}', '--latest',
                   f'--measurements_path={data}', f'--seeds={seeds}', '--batch=64', f'--outdir={op_dir}',
                   f'--steps={steps}', *args, *method_args]
            print(' '.join(cmd[1:]), flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            m = _summary(op_dir)
            methods.append(f'| {name} | {method} | {m["psnr"]:.2f} | {m["ssim"]:.3f} | {m["seconds"]:.2f} |')
    print('\n' + '\n'.join(lines) + '\n\n' + '\n'.join(methods) + f'\n\n{time.time() - start:.0f} s')


if __name__ == '__main__':
    main()
