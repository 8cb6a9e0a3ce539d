"""The science bench: does a model trained only on corrupted digits learn the clean distribution?

    python bench/bench_science.py                       # all models, ~30 minutes on 2 CPU cores
    python bench/bench_science.py --models=ambient-0.6,naive-0.6 --kimg=4 --samples=128   # a quick look

On the built-in digits (16x16) with a held-out test split, the same network and training budget
(demo.py's model) is trained five times:
  ambient-0.6         ambient, 60% of pixels missing, δ = 0.1 (the demo's setting)
  ambient-0.8         ambient, 80% of pixels missing, δ = 0.1
  ambient-0.6-delta0  ambient, 60% missing, δ = 0: no pixel is ever hidden from the network and in the loss,
                      so by Theorem 1 it cannot learn to predict hidden pixels
  naive-0.6           EDM on the same corrupted images, missing pixels read as 0
  clean               EDM on the clean images (the ceiling)
Each model is sampled with eval.py generate at its defaults (18 Heun steps, σ_min = 0.002) and scored
against the clean test split (`training.digit_score`): Fréchet distance in the features of a digit classifier
trained on the clean training split (cached), pixel-space Fréchet distance, classifier confidence and the
number of digit classes among the samples. `real` scores clean training images the same way (the floor of
the metric at this sample size). Ambient models also get eval.py denoise on the test split: the error of
D(x; σ) on the pixels hidden from the network, next to the error of predicting the training mean image.

Writes to --outdir: results.json, science.md (the table) and science.png (sample rows, FD bars,
hidden-pixel error curves); --docs copies the table and figure there. Every step skips what is on disk.
"""

import io
import json
import os
import shutil
import sys
import time
import zipfile

import click
import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import demo  # noqa: E402
import dnnlib  # noqa: E402
from dnnlib.util import atomic_write  # noqa: E402
from training import digit_score  # noqa: E402

MODELS = {
    'ambient-0.6': demo.corruption_args(0.6, 0.1, ambient=True),
    'ambient-0.8': demo.corruption_args(0.8, 0.1, ambient=True),
    'ambient-0.6-delta0': demo.corruption_args(0.6, 0, ambient=True),
    'naive-0.6': demo.corruption_args(0.6, 0, ambient=False),
    'clean': ['--precond=edm', '--corruption_probability=0', '--delta_probability=0'],
}


def split_dataset(full, train_path, test_path, num_test, seed=0):
    """Split a dataset zip into a training and a held-out test zip (seeded; labels kept)."""
    if os.path.exists(train_path) and os.path.exists(test_path):
        return
    with zipfile.ZipFile(full) as z:
        labels = json.loads(z.read('dataset.json'))['labels']
        order = np.random.RandomState(seed).permutation(len(labels))
        for path, part in ((test_path, order[:num_test]), (train_path, order[num_test:])):
            entries = [labels[i] for i in sorted(part)]
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, 'w', zipfile.ZIP_STORED) as out:
                for name, _ in entries:
                    out.writestr(name, z.read(name))
                out.writestr('dataset.json', json.dumps(dict(labels=entries)))
            with atomic_write(path, 'wb') as f:
                f.write(buffer.getvalue())


def digits_split(outdir, num_test):
    """The built-in digits split into training and held-out test zips under `outdir`, their clean images and labels,
    and the digit classifier trained on the training split (cached). Shared by the benches on digits."""
    full, train_zip, test_zip = (os.path.join(outdir, f'digits-{x}.zip') for x in ('all', 'train', 'test'))
    demo.build_dataset(full)
    split_dataset(full, train_zip, test_zip, num_test)
    train_images, train_labels = demo.load_clean(train_zip)
    test_images, test_labels = demo.load_clean(test_zip)
    classifier = digit_score.load_or_train_classifier(os.path.join(outdir, 'digit-classifier.pt'), train_images, train_labels)
    print(f'Digit classifier: {digit_score.accuracy(classifier, test_images, test_labels):.1%} accuracy on the test split')
    return dnnlib.EasyDict(train_zip=train_zip, test_zip=test_zip, train_images=train_images, train_labels=train_labels,
                           test_images=test_images, test_labels=test_labels, classifier=classifier)


def publish(outdir, names, docs, start):
    """Copy the bench's table and figure to `docs` (if given); print where the figure is and the total time."""
    if docs:
        os.makedirs(docs, exist_ok=True)
        for name in names:
            shutil.copyfile(os.path.join(outdir, name), os.path.join(docs, name))
    print(f'\n{os.path.join(outdir, names[-1])}; {time.time() - start:.0f} s in all')


def save_results(outdir, stem, record, text, draw_figure, docs, start, json_name='results.json'):
    """Write the bench's record (`json_name`), its table ({stem}.md) and figure ({stem}.png, drawn by
    `draw_figure(dest)`) to `outdir`, atomically; then `publish` them."""
    with atomic_write(os.path.join(outdir, json_name), 'w') as f:
        json.dump(record, f, indent=2)
    with atomic_write(os.path.join(outdir, f'{stem}.md'), 'w') as f:
        f.write(text + '\n')
    draw_figure(os.path.join(outdir, f'{stem}.png'))
    publish(outdir, (f'{stem}.md', f'{stem}.png'), docs, start)


def hidden_error(row):
    return dict(zip(row['sigmas'], row['mse_hidden']))


def run_model(name, outdir, train_zip, test_zip, test_images, classifier, kimg, num_samples, num_test):
    run_dir = os.path.join(outdir, name)
    start = time.time()
    snapshot = demo.train_model(train_zip, run_dir, MODELS[name], kimg)
    train_s = time.time() - start
    samples, _ = demo.sample_model(snapshot, os.path.join(outdir, f'{name}-samples'), num=num_samples)
    result = dict(name=name, snapshot=snapshot, train_s=train_s, **digit_score.score_images(classifier, samples, test_images))
    if MODELS[name][0] == '--precond=ambient':
        row = demo.denoising_error(snapshot, test_zip, os.path.join(outdir, f'{name}-denoise'), seeds=f'0-{num_test - 1}')
        result['hidden_mse'] = hidden_error(row)
        result['visible_mse'] = dict(zip(row['sigmas'], row['mse_visible']))
    return result, samples


def table(results, mean_mse):
    sigmas = [1, 0.2, 0.05, 0.01, 0.002]
    lines = ['| model | FD (classifier) | FD (pixels) | confidence | classes | hidden MSE σ=' + ' / '.join(f'{s:g}' for s in sigmas) + ' |',
             '|---|---|---|---|---|---|']
    for r in results:
        hidden = ' / '.join(f'{r["hidden_mse"][s]:.3f}' for s in sigmas) if 'hidden_mse' in r else '–'
        lines.append(f'| {r["name"]} | {r["fd"]:.2f} | {r["fd_pixel"]:.2f} | {r["confidence"]:.2f} | {r["classes"]}/10 | {hidden} |')
    lines.append(f'\nPredicting the training mean image: MSE {mean_mse:.3f} per pixel on the test split.')
    return '\n'.join(lines)


def draw_sample_rows(fig, gs, rows, fontsize=8):
    """Rows of 16 samples (name, uint8 images) in the first column of the grid spec `gs`, names on the left."""
    from torch_utils.images import make_grid
    for i, (name, images) in enumerate(rows):
        ax = fig.add_subplot(gs[i, 0])
        grid = make_grid(images[:16], grid_w=16, pad=1)
        ax.imshow(grid[:, :, 0], cmap='gray', vmin=0, vmax=255, interpolation='nearest')
        ax.set_axis_off()
        ax.text(-0.01, 0.5, name, transform=ax.transAxes, ha='right', va='center', fontsize=fontsize)


def draw(results, rows, mean_mse, dest):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(rows)
    fig = Figure(figsize=(15, 0.75 * n + 1.2), dpi=110)
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(n, 3, width_ratios=[2.4, 1, 1], left=0.15, right=0.98, top=0.9, bottom=0.12, wspace=0.45)
    draw_sample_rows(fig, gs, rows, fontsize=8)
    ax = fig.add_subplot(gs[:, 1])
    names = [r['name'] for r in results]
    ax.barh(names[::-1], [r['fd'] for r in results][::-1], color='C0')
    ax.set_xscale('log')
    ax.set_xlabel('classifier-feature FD to held-out digits (lower is better)')
    ax.tick_params(axis='y', labelsize=8)
    ax = fig.add_subplot(gs[:, 2])
    for i, r in enumerate(r for r in results if 'hidden_mse' in r):
        sig = sorted(r['hidden_mse'])
        ax.plot(sig, [r['hidden_mse'][s] for s in sig], '-o', markersize=3, color=f'C{i}', label=r['name'])
    ax.axhline(mean_mse, color='gray', linestyle='--', label='training mean image')
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('noise level σ')
    ax.set_ylabel('MSE of D on hidden pixels')
    ax.legend(fontsize=7)
    with atomic_write(dest, 'wb') as f:
        fig.savefig(f, format='png')


@click.command()
@click.option('--outdir',  help='Where runs, samples and results go', metavar='DIR', type=str, default='bench-out/science', show_default=True)
@click.option('--models',  help='Comma-separated models', metavar='LIST', type=str, default=','.join(MODELS), show_default=True)
@click.option('--kimg',    help='Training length of every model', metavar='KIMG', type=click.FloatRange(min=0, min_open=True), default=20, show_default=True)
@click.option('--samples', help='Samples per model', metavar='INT', type=click.IntRange(min=70), default=300, show_default=True)
@click.option('--num_test', help='Held-out test images', metavar='INT', type=click.IntRange(min=70), default=300, show_default=True)
@click.option('--docs',    help='Also copy science.md and science.png here', metavar='DIR', type=str)
def main(outdir, models, kimg, samples, num_test, docs):
    """Train the five models on the built-in digits, sample, score; print and draw the comparison."""
    models = [m.strip() for m in models.split(',') if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise click.ClickException(f'--models: unknown {", ".join(unknown)}; choose from {", ".join(MODELS)}')
    start = time.time()
    os.makedirs(outdir, exist_ok=True)
    d = digits_split(outdir, num_test)
    train_zip, test_zip, train_images, test_images, classifier = d.train_zip, d.test_zip, d.train_images, d.test_images, d.classifier
    mean_mse = float((digit_score.to_float(test_images) - digit_score.to_float(train_images).mean(0)).square().mean())

    real_idx = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(0))[:samples]
    real = train_images[real_idx]
    results = [dict(name='real', train_s=0, **digit_score.score_images(classifier, real, test_images))]
    rows = [('real (clean training images)', real)]
    for name in models:
        result, images = run_model(name, outdir, train_zip, test_zip, test_images, classifier, kimg, samples, num_test)
        results.append(result)
        rows.append((f'{name} (FD {result["fd"]:.1f})', images))

    text = table(results, mean_mse)
    print('\n' + text)
    save_results(outdir, 'science', dict(kimg=kimg, samples=samples, num_test=num_test, mean_mse=mean_mse, results=results),
                 text, lambda dest: draw(results, rows, mean_mse, dest), docs, start)


if __name__ == '__main__':
    main()
