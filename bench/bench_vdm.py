"""The likelihood bench: VDM on the built-in digits, a fixed against a learned noise schedule, against generic
lossless compressors and an EDM model scored through the same bound.

    python bench/bench_vdm.py                  # about 15 minutes on 2 CPU cores
    python bench/bench_vdm.py --kimg=3 --num_test=100 --repeats=10 --samples=32   # a quick look

On the digits (16x16, 8-bit, the science bench's train/test split) the same network and budget (demo.py's
model, no augmentation) is trained three ways:
  VDM fixed_linear  train.py --precond=vdm --schedule=fixed_linear (γ from -13.3 to 5)
  VDM learned       train.py --precond=vdm --schedule=learned (monotone network; endpoints on the bound, shape on
                    the estimator's variance)
  EDM               train.py --precond=edm, scored by eval.py bpd through ε̂ = (x − D)/σ on the fixed linear schedule
Each is scored on the held-out test split:
  - test bits/dim: eval.py bpd (prior + reconstruction + diffusion, mean ± standard error over images, --num_t
    low-discrepancy times per image);
  - the variance of the bound's estimator: a batch of 32 test images, the batch-mean bits/dim redrawn --repeats
    times with t uniform and independent (the plain estimator), antithetic, or low-discrepancy (VDM's); and the
    per-image variance (one t per image), which is what the learned schedule's shape minimises;
  - samples (eval.py generate; --solver=vdm with 100 steps for VDM, EDM's Heun for EDM) and their Fréchet distance
    to the test digits in a digit classifier's features.
References in the same table: 8 bits/dim (uniform over 256 values), PNG (each test image its own file, as stored),
and lzma (xz, preset 9e) of all test images as one raw byte stream (the strongest generic baseline here).

Writes to --outdir: results.json, vdm.md (the table) and vdm.png (samples, the learned γ(t), and the per-time
diffusion integrand the learned schedule flattens); --docs copies the table and figure there. Every step skips
what is on disk.
"""

import io
import json
import lzma
import os
import subprocess
import sys
import time

import click
import PIL.Image
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo  # noqa: E402
from bench_science import digits_split, draw_sample_rows, publish  # noqa: E402
from dnnlib.util import atomic_write  # noqa: E402
from training import digit_score, snapshots, vdm  # noqa: E402

MODELS = [('VDM, fixed_linear', ['--precond=vdm', '--schedule=fixed_linear'], 'vdm'),
          ('VDM, learned', ['--precond=vdm', '--schedule=learned'], 'vdm'),
          ('EDM (bound via ε̂)', ['--precond=edm', '--corruption_probability=0'], 'heun')]
MODES = ('uniform', 'antithetic', 'low_discrepancy')


def compressor_bits(images):
    """Bits/dim of PNG (each image its own file, optimised) and of lzma over all images as one raw byte stream."""
    dims = images.numel()
    png = 0
    for image in images.numpy():
        buf = io.BytesIO()
        PIL.Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(buf, format='PNG', optimize=True)
        png += len(buf.getvalue())
    xz = lzma.compress(images.numpy().tobytes(), preset=9 | lzma.PRESET_EXTREME)
    return dict(png=png * 8 / dims, lzma=len(xz) * 8 / dims)


def test_bpd(snapshot, test_zip, outdir, num_t):
    dest = os.path.join(outdir, 'bpd.jsonl')
    cmd = [sys.executable, os.path.join(REPO, 'eval.py'), 'bpd', f'--network={snapshot}', f'--data={test_zip}',
           f'--outdir={outdir}', f'--num_t={num_t}']
    print('Bits/dim:', ' '.join(cmd[1:]))
    subprocess.run(cmd, check=True)
    with open(dest, encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip()][-1]


def schedule_of(net):
    return getattr(net, 'schedule', None) or vdm.NoiseSchedule('fixed_linear')


@torch.no_grad()
def estimator_variance(net, k, repeats, seed=0):
    """Per time-sampling mode: the variance of the batch-mean bits/dim over `repeats` redraws (t, ε, ε_0) on the batch
    k, and the per-image variance of the one-sample estimate."""
    schedule, eps_fn, dims = schedule_of(net), vdm.denoiser_eps(net), k[0].numel()
    result = {}
    for mode in MODES:
        gen = torch.Generator().manual_seed(seed)
        means, values = [], []
        for _ in range(repeats):
            t = vdm.sample_times(len(k), mode, generator=gen)
            terms = vdm.vlb_terms(eps_fn, schedule, k, t, torch.randn(k.shape, generator=gen),
                                  torch.randn(k.shape, generator=gen))
            bits = sum(vdm.to_bits(terms[name].double(), dims) for name in vdm.TERMS)
            means.append(bits.mean())
            values.append(bits)
        result[mode] = dict(batch_var=float(torch.stack(means).var()), image_var=float(torch.cat(values).var()))
    return result


@torch.no_grad()
def integrand(net, k, num=24, seed=0):
    """The diffusion term's integrand ½γ'(t)·E‖ε − ε̂‖² (bits/dim) at `num` midpoint times, averaged over k, and γ(t)."""
    schedule, eps_fn, dims = schedule_of(net), vdm.denoiser_eps(net), k[0].numel()
    gen = torch.Generator().manual_seed(seed)
    t_grid = (torch.arange(num, dtype=torch.float64) + 0.5) / num
    values = []
    for t in t_grid:
        terms = vdm.vlb_terms(eps_fn, schedule, k, t.expand(len(k)), torch.randn(k.shape, generator=gen),
                              torch.randn(k.shape, generator=gen))
        values.append(float(vdm.to_bits(terms['diffusion'], dims).mean()))
    fine = torch.linspace(0, 1, 101)
    return dict(t=t_grid.tolist(), diffusion=values, gamma_t=fine.tolist(), gamma=schedule(fine).tolist())


def table(results, references, repeats):
    lines = ['| model | test bits/dim | prior | reconstruction | diffusion | batch-mean variance: uniform t | antithetic | '
             'low-discrepancy | per-image variance | FD (classifier) |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for r in results:
        v = r['variance']
        lines.append(f'| {r["name"]} | **{r["bpd_total"]:.3f}** ± {r["bpd_total_se"]:.3f} | {r["bpd_prior"]:.4f} | '
                     f'{r["bpd_reconstruction"]:.4f} | {r["bpd_diffusion"]:.3f} | {v["uniform"]["batch_var"]:.4f} | '
                     f'{v["antithetic"]["batch_var"]:.4f} | {v["low_discrepancy"]["batch_var"]:.4f} | '
                     f'{v["uniform"]["image_var"]:.2f} | {r["fd"]:.2f} |')
    for name, bits in (('uniform over 256 values', 8.0), ('PNG (one file per test image)', references['png']),
                       ('lzma (xz -9e) of all test images at once', references['lzma'])):
        lines.append(f'| {name} | {bits:.3f} | | | | | | | | |')
    lines.append('')
    lines.append(f'Variances of bits/dim over {repeats} redraws of a batch of 32 test images (batch mean), and of single '
                 'draws per image (per-image, uniform t).')
    return '\n'.join(lines) + '\n'


def draw(results, rows, dest):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(rows)
    fig = Figure(figsize=(16, max(0.8 * n + 1.4, 3.4)), dpi=110)
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(n, 3, width_ratios=[2.4, 1, 1], left=0.13, right=0.98, top=0.88, bottom=0.16, wspace=0.35)
    draw_sample_rows(fig, gs, rows, fontsize=8)
    ax_gamma, ax_int = fig.add_subplot(gs[:, 1]), fig.add_subplot(gs[:, 2])
    for i, r in enumerate(results):
        curve = r['integrand']
        ax_gamma.plot(curve['gamma_t'], curve['gamma'], color=f'C{i}', label=r['name'])
        ax_int.plot(curve['t'], curve['diffusion'], '-o', markersize=3, color=f'C{i}', label=r['name'])
    ax_gamma.set_xlabel('t')
    ax_gamma.set_ylabel('γ(t) = log(σ²/α²)')
    ax_gamma.set_title('noise schedule', fontsize=9)
    ax_int.set_xlabel('t')
    ax_int.set_ylabel('½γ\'(t)·E‖ε − ε̂‖²  (bits/dim)')
    ax_int.set_title('diffusion integrand on test digits\n(flat = low estimator variance)', fontsize=9)
    ax_int.set_yscale('log')
    ax_int.legend(fontsize=7)
    fig.suptitle('VDM on 16x16 digits: test bits/dim ' + ', '.join(f'{r["name"]} {r["bpd_total"]:.2f}' for r in results),
                 fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format='png')
    with atomic_write(dest, 'wb') as f:
        f.write(buf.getvalue())


@click.command()
@click.option('--outdir',   help='Working directory', metavar='DIR', type=str, default='bench-out/vdm', show_default=True)
@click.option('--kimg',     help='Training length of each model', metavar='KIMG', type=click.FloatRange(min=0.1), default=16, show_default=True)
@click.option('--num_test', help='Held-out test digits', metavar='INT', type=click.IntRange(min=32), default=300, show_default=True)
@click.option('--num_t',    help='Times per test image for bits/dim', metavar='INT', type=click.IntRange(min=1), default=16, show_default=True)
@click.option('--repeats',  help='Redraws of the batch for the estimator variance', metavar='INT', type=click.IntRange(min=2), default=100, show_default=True)
@click.option('--samples',  help='Samples per model', metavar='INT', type=click.IntRange(min=16), default=128, show_default=True)
@click.option('--docs',     help='Also copy vdm.md and vdm.png here', metavar='DIR', type=str)
def main(outdir, kimg, num_test, num_t, repeats, samples, docs):
    """Test bits/dim and estimator variance of VDM schedules on the digits, against compressors and EDM."""
    start = time.time()
    os.makedirs(outdir, exist_ok=True)
    split = digits_split(outdir, num_test)
    references = compressor_bits(split.test_images)
    print(f'References on {num_test} test digits: 8 bits/dim uniform, PNG {references["png"]:.3f}, lzma {references["lzma"]:.3f}')
    k = split.test_images[:32].long()
    results, rows = [], []
    for name, args, solver in MODELS:
        tag = name.split(' (')[0].replace(', ', '-').replace(' ', '-').lower()
        snapshot = demo.train_model(split.train_zip, os.path.join(outdir, tag), args, kimg)
        row = test_bpd(snapshot, split.test_zip, os.path.join(outdir, f'{tag}-bpd'), num_t)
        net, _ = snapshots.load_network(snapshot)
        net.eval()
        extra = ['--solver=vdm', '--steps=100'] if solver == 'vdm' else []
        images, _ = demo.sample_model(snapshot, os.path.join(outdir, f'{tag}-samples'), num=samples, extra_args=extra)
        score = digit_score.score_images(split.classifier, images, split.test_images)
        result = dict(name=name, snapshot=snapshot, **{key: row[key] for key in row if key.startswith('bpd_')},
                      variance=estimator_variance(net, k, repeats), integrand=integrand(net, k), fd=score['fd'])
        print(f'{name}: {result["bpd_total"]:.3f} ± {result["bpd_total_se"]:.3f} bits/dim; batch variance uniform '
              f'{result["variance"]["uniform"]["batch_var"]:.4f}, low-discrepancy '
              f'{result["variance"]["low_discrepancy"]["batch_var"]:.4f}; FD {result["fd"]:.2f}')
        results.append(result)
        rows.append((name, images))
    with atomic_write(os.path.join(outdir, 'results.json'), 'w') as f:
        json.dump(dict(results=results, references=references, kimg=kimg, num_test=num_test, num_t=num_t,
                       repeats=repeats), f, indent=1)
    with atomic_write(os.path.join(outdir, 'vdm.md'), 'w') as f:
        f.write(table(results, references, repeats))
    print(table(results, references, repeats))
    fixed, learned = results[0], results[1]
    ratio = fixed['variance']['uniform']['batch_var'] / learned['variance']['low_discrepancy']['batch_var']
    print(f'Targets: learned {learned["bpd_total"]:.3f} <= fixed {fixed["bpd_total"]:.3f} bits/dim: '
          f'{"met" if learned["bpd_total"] <= fixed["bpd_total"] else "NOT met"}; estimator variance, plain (fixed, '
          f'uniform t) / ours (learned, low-discrepancy) = {ratio:.1f}x (target >= 3x)')
    draw(results, rows, os.path.join(outdir, 'vdm.png'))
    publish(outdir, ['vdm.md', 'vdm.png'], docs, start)


if __name__ == '__main__':
    main()
