"""What the mask-aware preconditioning and the noise-label floor each do, on the demo's model.

    python bench/bench_precond.py                 # three models of demo.py's recipe, ~10 minutes on 2 cores

Trains demo.py's ambient model (16x16 digits, dust p = 0.6, δ = 0.1, same network, budget and seed) with
  original      --hidden_precond=original --cond_sigma_min=0   (the original's formulation)
  mask_aware    --hidden_precond=mask_aware --cond_sigma_min=0 (per-pixel c_skip, c_out and loss weights)
  mask_aware+floor  the default: mask-aware, and the network told max(σ, 0.1)
and reports eval.py denoise's error on pixels hidden from the network per σ (on the held-out split of
bench_science.py) and the classifier-feature FD of samples at σ_min = 0.002. Writes {outdir}/precond.md.
"""

import os
import sys
import time

import click

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import demo  # noqa: E402
from bench.bench_science import split_dataset  # noqa: E402
from dnnlib.util import atomic_write  # noqa: E402
from training import digit_score  # noqa: E402

VARIANTS = {
    'original': ['--hidden_precond=original', '--cond_sigma_min=0'],
    'mask_aware': ['--hidden_precond=mask_aware', '--cond_sigma_min=0'],
    'mask_aware+floor': [],
}
SIGMAS = [1, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.002]


@click.command()
@click.option('--outdir',  help='Where runs and results go', metavar='DIR', type=str, default='bench-out/precond', show_default=True)
@click.option('--kimg',    help='Training length of every model', metavar='KIMG', type=click.FloatRange(min=0, min_open=True), default=demo.TRAIN_KIMG, show_default=True)
@click.option('--samples', help='Samples per model', metavar='INT', type=click.IntRange(min=70), default=300, show_default=True)
def main(outdir, kimg, samples):
    """Train the three variants, measure hidden-pixel error per σ and sample quality."""
    start = time.time()
    os.makedirs(outdir, exist_ok=True)
    full, train_zip, test_zip = (os.path.join(outdir, f'digits-{x}.zip') for x in ('all', 'train', 'test'))
    demo.build_dataset(full)
    split_dataset(full, train_zip, test_zip, num_test=300)
    train_images, train_labels = demo.load_clean(train_zip)
    test_images, _ = demo.load_clean(test_zip)
    classifier = digit_score.load_or_train_classifier(os.path.join(outdir, 'digit-classifier.pt'), train_images, train_labels)
    mean_mse = float((digit_score.to_float(test_images) - digit_score.to_float(train_images).mean(0)).square().mean())

    lines = ['| variant | ' + ' | '.join(f'σ = {s:g}' for s in SIGMAS) + ' | FD (samples) |', '|---' * (len(SIGMAS) + 2) + '|']
    for name, args in VARIANTS.items():
        run_dir = os.path.join(outdir, name)
        snapshot = demo.train_model(train_zip, run_dir, demo.corruption_args(0.6, 0.1) + args, kimg)
        row = demo.denoising_error(snapshot, test_zip, os.path.join(outdir, f'{name}-denoise'), seeds='0-299')
        hidden = dict(zip(row['sigmas'], row['mse_hidden']))
        images, _ = demo.sample_model(snapshot, os.path.join(outdir, f'{name}-samples'), num=samples)
        fd = digit_score.score_images(classifier, images, test_images)['fd']
        lines.append(f'| {name} | ' + ' | '.join(f'{hidden[s]:.4f}' for s in SIGMAS) + f' | {fd:.1f} |')
    lines.append(f'\nPredicting the training mean image: MSE {mean_mse:.4f}. {kimg:g} kimg per model; '
                 f'{time.time() - start:.0f} s in all.')
    text = '\n'.join(lines)
    print('\n' + text)
    with atomic_write(os.path.join(outdir, 'precond.md'), 'w') as f:
        f.write(text + '\n')


if __name__ == '__main__':
    main()
