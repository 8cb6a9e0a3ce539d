"""The noisy-data bench: a little clean data plus much noisy data, against the alternatives.

    python bench/bench_noisy.py                      # both settings, about 30 minutes on 2 CPU cores
    python bench/bench_noisy.py --settings=0.5:0.02 --kimg=4 --samples=128   # a quick look
    python bench/bench_noisy.py --memorization_kimg=48   # also ambient_noisy and clean-only of σ_n = 0.5 at 48 kimg

On the built-in digits (16x16, the science bench's train/test split), most training images carry fixed
Gaussian noise of std σ_n (`train.py --noise_sigma`) and a seeded few are clean (`--clean_fraction`). For
each setting σ_n:F the same network and budget (demo.py's model) is trained three ways:
  ambient_noisy   --precond=ambient_noisy --s_max=4 on everything: the σ-first sampler and the Tweedie loss
                  (SPEC §3; s_max = 4 as Ambient Omni, so the ambient factor stays below 16)
  clean-only      EDM on the clean images alone (F of the data)
  noisy-as-clean  EDM on everything, the noisy images treated as clean
and once, for all settings:
  all-clean       EDM on 100% clean data (the reference)
Each model is sampled with eval.py generate at its defaults and scored against the clean test split: the
Fréchet distance in a digit classifier's features and in pixel space (`training.digit_score`), and a
memorization measure: the share of samples closer (pixel L2) to a training image than 95% of the held-out
test digits are (held-out digits score 5% by construction; copies of training images score high).

Writes to --outdir: results.json, noisy.md (the table) and noisy.png (sample rows and the scores); --docs
copies the table and figure there. Every step skips what is on disk.
"""

import io
import json
import os
import sys
import time
import zipfile

import click
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo  # noqa: E402
from bench_science import digits_split, draw_sample_rows, save_results  # noqa: E402
from dnnlib.util import atomic_write  # noqa: E402
from training import digit_score  # noqa: E402
from training.dataset import ImageFolderDataset  # noqa: E402

CLEAN = ['--precond=edm', '--corruption_probability=0']


def parse_settings(text):
    settings = []
    for item in text.split(','):
        try:
            sigma, fraction = (float(x) for x in item.split(':'))
        except ValueError:
            raise click.BadParameter(f'{item!r} is not SIGMA:CLEAN_FRACTION', param_hint='--settings') from None
        settings.append((sigma, fraction))
    return settings


def models_of(sigma, fraction):
    """(name, train.py options, the setting whose clean images alone it trains on, or None) of one setting."""
    noise = [f'--noise_sigma={sigma:g}', f'--clean_fraction={fraction:g}']
    tag = f'σ={sigma:g}, {fraction:.0%} clean'
    return [(f'ambient_noisy ({tag})', ['--precond=ambient_noisy', '--s_max=4', *noise], None),
            (f'clean-only ({tag})', CLEAN, (sigma, fraction)),
            (f'noisy-as-clean ({tag})', CLEAN + noise, None)]


def clean_subset(train_zip, dest, sigma, fraction):
    """A dataset zip of the training images `--noise_sigma/--clean_fraction` leave clean (the same seeded choice)."""
    if os.path.exists(dest):
        return
    dataset = ImageFolderDataset(train_zip, noise_sigma=sigma, clean_fraction=fraction)
    noisy = set(dataset.synthetic_noisy_indices().tolist())
    with zipfile.ZipFile(train_zip) as z:
        labels = dict(json.loads(z.read('dataset.json'))['labels'])
        names = sorted(labels)
        keep = [name for i, name in enumerate(names) if i not in noisy]
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, 'w', zipfile.ZIP_STORED) as out:
            for name in keep:
                out.writestr(name, z.read(name))
            out.writestr('dataset.json', json.dumps(dict(labels=[[name, labels[name]] for name in keep])))
    with atomic_write(dest, 'wb') as f:
        f.write(buffer.getvalue())


def nearest_distance(images, reference, batch=512):
    """Pixel L2 distance (in [-1, 1]) of each image to its nearest reference image."""
    a, b = digit_score.to_float(images).flatten(1).double(), digit_score.to_float(reference).flatten(1).double()
    return torch.cat([torch.cdist(a[i:i + batch], b).min(1).values for i in range(0, len(a), batch)])


def memorization(samples, train_images, threshold):
    return float((nearest_distance(samples, train_images) < threshold).double().mean())


def table(results):
    lines = ['| model | FD (classifier) | FD (pixels) | memorized | classes |', '|---|---|---|---|---|']
    for r in results:
        lines.append(f'| {r["name"]} | {r["fd"]:.2f} | {r["fd_pixel"]:.2f} | {r["memorized"]:.1%} | {r["classes"]}/10 |')
    return '\n'.join(lines)


def draw(results, rows, dest):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    n = len(rows)
    fig = Figure(figsize=(16, 0.75 * n + 1.2), dpi=110)
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(n, 4, width_ratios=[2.4, 1, 1, 1], left=0.17, right=0.98, top=0.92, bottom=0.12, wspace=0.5)
    draw_sample_rows(fig, gs, rows, fontsize=7)
    names = [r['name'] for r in results][::-1]
    colors = [('C1' if r['name'].startswith('ambient_noisy') else 'C0') for r in results][::-1]
    for col, (key, label, log) in enumerate([('fd', 'classifier-feature FD', True), ('fd_pixel', 'pixel FD', True),
                                             ('memorized', 'share memorized', False)], start=1):
        ax = fig.add_subplot(gs[:, col])
        ax.barh(names, [r[key] for r in results][::-1], color=colors)
        if log:
            ax.set_xscale('log')
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(-0.5, len(names) - 0.5)  # one bar per sample row, in the rows' order
        ax.set_xlabel(f'{label} (lower is better)', fontsize=8)
        ax.tick_params(axis='y', left=False, labelleft=False)
    with atomic_write(dest, 'wb') as f:
        fig.savefig(f, format='png')


@click.command()
@click.option('--outdir',   help='Where runs, samples and results go', metavar='DIR', type=str, default='bench-out/noisy', show_default=True)
@click.option('--settings', help='Comma-separated σ_n:clean_fraction settings', metavar='LIST', type=str, default='0.2:0.1,0.5:0.02', show_default=True)
@click.option('--kimg',     help='Training length of every model', metavar='KIMG', type=click.FloatRange(min=0, min_open=True), default=12, show_default=True)
@click.option('--samples',  help='Samples per model', metavar='INT', type=click.IntRange(min=70), default=300, show_default=True)
@click.option('--num_test', help='Held-out test images', metavar='INT', type=click.IntRange(min=70), default=300, show_default=True)
@click.option('--docs',     help='Also copy noisy.md and noisy.png here', metavar='DIR', type=str)
@click.option('--memorization_kimg', help='Also train ambient_noisy and clean-only of the last setting this long (0: not)', metavar='KIMG', type=click.FloatRange(min=0), default=0, show_default=True)
def main(outdir, settings, kimg, samples, num_test, docs, memorization_kimg):
    """Train, sample and score the noisy-data models; print and draw the comparison."""
    settings = parse_settings(settings)
    start = time.time()
    os.makedirs(outdir, exist_ok=True)
    d = digits_split(outdir, num_test)
    train_zip, train_images, test_images, classifier = d.train_zip, d.train_images, d.test_images, d.classifier
    threshold = float(torch.quantile(nearest_distance(test_images, train_images), 0.05))

    models = [('all-clean', CLEAN, None)]
    for sigma, fraction in settings:
        models += models_of(sigma, fraction)
    real_idx = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(0))[:samples]
    real = train_images[real_idx]
    # The floor of the scores at this sample size: clean training images; of memorization: held-out digits.
    results = [dict(name='real', train_s=0, memorized=memorization(test_images, train_images, threshold),
                    **digit_score.score_images(classifier, real, test_images))]
    rows = [('real (training digits)', real)]
    runs = [(name, args, clean_only, kimg) for name, args, clean_only in models]
    if memorization_kimg > 0:  # a longer budget, where the few clean images invite copying
        runs += [(f'{name}, {memorization_kimg:g} kimg', args, clean_only, memorization_kimg)
                 for name, args, clean_only in models_of(*settings[-1])[:2]]
    for name, args, clean_only, run_kimg in runs:
        slug = name.replace(' ', '').replace('(', '-').replace(')', '').replace(',', '-').replace('%', 'pct').replace('σ=', 's')
        run_dir = os.path.join(outdir, slug)
        train_data = train_zip
        if clean_only is not None:
            train_data = os.path.join(outdir, f'digits-clean-{clean_only[0]:g}-{clean_only[1]:g}.zip')
            clean_subset(train_zip, train_data, *clean_only)
        t0 = time.time()
        snapshot = demo.train_model(train_data, run_dir, args, run_kimg)
        train_s = time.time() - t0
        images, _ = demo.sample_model(snapshot, os.path.join(outdir, f'{slug}-samples'), num=samples)
        result = dict(name=name, args=args, snapshot=snapshot, train_s=train_s,
                      memorized=memorization(images, train_images, threshold),
                      **digit_score.score_images(classifier, images, test_images))
        print(f'{name}: FD {result["fd"]:.2f}, pixel FD {result["fd_pixel"]:.2f}, memorized {result["memorized"]:.1%}')
        results.append(result)
        rows.append((f'{name} (FD {result["fd"]:.1f})', images))

    text = table(results)
    print('\n' + text)
    record = dict(kimg=kimg, samples=samples, num_test=num_test, threshold=threshold, settings=settings,
                  results=results, total_s=time.time() - start)
    save_results(outdir, 'noisy', record, text, lambda dest: draw(results, rows, dest), docs, start)


if __name__ == '__main__':
    main()
