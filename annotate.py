"""Annotate low-quality images with the noise level above which they can be trusted (Ambient Omni, Daras et al. 2025).

    python annotate.py --data=blurry.zip --clean=trusted.zip --dest=annotated
    python annotate.py --data=digits.zip --corrupt=blur:1.5 --clean_fraction=0.1 --dest=digits-blur
    python annotate.py --data=digits.zip --corrupt=noise:0.2 --clean_fraction=0.1 --dest=digits-noisy
    python annotate.py --data=blurry.zip --fixed_sigma=0.5 --dest=annotated

Each image to annotate gets σ_min, the smallest noise level of a grid at which a noise-conditioned classifier
trained on the --clean images (label 0) and the --data images (label 1) is within --cls_epsilon of chance (or
--fixed_sigma for all; or, for --corrupt=noise:S, the known std S, kind 'noisy'). --dest becomes a dataset folder
in dataset_tool.py's layout (PNGs, labels kept) whose dataset.json holds "annotations" [file, σ_min, 0, kind]:
the --data images (annotated) then the --clean ones (clean, no entry); with --corrupt, the dataset in its order,
a seeded --clean_fraction left clean. The report (annotate.json: options, per-σ held-out accuracy, summary; and
with a classifier classifier-accuracy.png) goes to --report_dir, beside the dataset and not in it, because
every PNG in a dataset folder is read as one of its images. Library: training/annotate.py.
"""

import json
import os

import click

import dnnlib
from training import annotate
from training.cli import check_output_dir, given_options, one_line_errors, refuse_ignored

CLASSIFIER_OPTIONS = ('kimg', 'batch', 'sigma_range', 'num_sigmas', 'num_draws', 'holdout', 'cls_epsilon')


def parse_corrupt(ctx, param, value):
    """Click callback: --corrupt=KIND:LEVEL -> (kind, level)."""
    if value is None:
        return None
    try:
        return annotate.parse_corruption(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


def parse_sigma_range(ctx, param, value):
    """Click callback: 'MIN,MAX' -> (min, max) with 0 < min < max."""
    try:
        lo, hi = (float(v) for v in value.split(','))
    except ValueError:
        raise click.BadParameter(f'{value!r} is not MIN,MAX (e.g. 0.01,10)') from None
    if not 0 < lo < hi < float('inf'):
        raise click.BadParameter(f'{value!r} needs 0 < MIN < MAX (noise levels, images in [-1, 1])')
    return lo, hi


def build_config(opts, given):
    """Options -> the library's config; one-line errors for conflicting or missing options."""
    if int(os.environ.get('WORLD_SIZE', '1') or 1) > 1:
        raise click.UsageError('annotate.py runs as one process (CPU or one GPU); start it with python, not torchrun')
    if opts.clean is not None and opts.corrupt is not None:
        raise click.UsageError('--clean and --corrupt exclude each other: with --corrupt the --clean_fraction share of '
                               '--data is the clean set')
    if opts.corrupt is not None and opts.clean_fraction is None:
        raise click.UsageError('--corrupt needs --clean_fraction (the seeded share of --data left clean; 0 for none)')
    refuse_ignored(given, [('clean_fraction', opts.corrupt is None, 'it is the share of --data that --corrupt leaves '
                                                                  'clean; add --corrupt or drop it')])
    noise = opts.corrupt is not None and opts.corrupt[0] == 'noise'
    if noise and opts.fixed_sigma is not None:
        raise click.UsageError(f'--fixed_sigma has no effect with --corrupt=noise:{opts.corrupt[1]:g}: the noise std '
                               'is known and is the annotation')
    no_classifier = noise or opts.fixed_sigma is not None
    why = 'the noise std of --corrupt=noise is the annotation' if noise else '--fixed_sigma annotates without one'
    refuse_ignored(given, [(name, no_classifier, f'it configures the classifier and {why}') for name in CLASSIFIER_OPTIONS])
    if not no_classifier and opts.clean is None and opts.corrupt is None:
        raise click.UsageError('the classifier needs trusted clean images: add --clean=ZIP|DIR, or --corrupt with '
                               '--clean_fraction for a synthetic experiment, or annotate all with --fixed_sigma')
    classifier = None if no_classifier else dnnlib.EasyDict({name: opts[name] for name in CLASSIFIER_OPTIONS})
    return dnnlib.EasyDict(data=opts.data, clean=opts.clean, dest=opts.dest,
                           report_dir=opts.report_dir or opts.dest.rstrip('/\\') + '-report', corrupt=opts.corrupt,
                           clean_fraction=opts.clean_fraction, fixed_sigma=opts.fixed_sigma, classifier=classifier,
                           seed=opts.seed)


@click.command()
@click.option('--data',           help='Images to annotate, or the clean dataset that --corrupt corrupts', metavar='ZIP|DIR', type=str, required=True)
@click.option('--dest',           help='Output dataset folder (must not exist or be empty)',   metavar='DIR',   type=str, required=True)
@click.option('--clean',          help='Trusted clean images the classifier learns from',      metavar='ZIP|DIR', type=str)
@click.option('--corrupt',        help='Synthetic experiment: corrupt --data with noise|blur|mask|jpeg at LEVEL', metavar='KIND:LEVEL', type=str, callback=parse_corrupt)
@click.option('--clean_fraction', help='Synthetic experiment: seeded share of --data left clean', metavar='FLOAT', type=click.FloatRange(0, 1))
@click.option('--fixed_sigma',    help='Annotate every corrupted image with this σ_min (no classifier)', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--kimg',           help='Classifier training length in thousands of images',    metavar='KIMG',  type=click.FloatRange(min=0, min_open=True), default=50, show_default=True)
@click.option('--batch',          help='Classifier batch size (training and annotation)',      metavar='INT',   type=click.IntRange(min=2), default=256, show_default=True)
@click.option('--sigma_range',    help='Noise levels of training and of the annotation grid',  metavar='MIN,MAX', type=str, default='0.01,10', show_default=True, callback=parse_sigma_range)
@click.option('--num_sigmas',     help='Noise levels in the annotation grid (geometric)',      metavar='INT',   type=click.IntRange(min=2), default=16, show_default=True)
@click.option('--num_draws',      help='Noise draws averaged per image and noise level',       metavar='INT',   type=click.IntRange(min=1), default=4, show_default=True)
@click.option('--holdout',        help='Share of each set held out to measure accuracy vs σ',  metavar='FLOAT', type=click.FloatRange(0, 0.5, min_open=True), default=0.1, show_default=True)
@click.option('--cls_epsilon',    help='σ_min: first grid σ with |P(corrupted) − 0.5| ≤ ε',    metavar='FLOAT', type=click.FloatRange(0, 0.5, min_open=True, max_open=True), default=0.05, show_default=True)
@click.option('--seed',           help='Seed of the corruption, the clean share, the classifier and its noise', metavar='INT', type=int, default=0, show_default=True)
@click.option('--report_dir',     help='Where annotate.json and classifier-accuracy.png go  [default: DEST-report]', metavar='DIR', type=str)
@click.option('-n', '--dry-run', 'dry_run', help='Print the resolved config and exit', is_flag=True)
def main(dry_run, **kwargs):
    """Annotate images with σ_min for training on noisy and low-quality data (SPEC §3, Ambient Omni)."""
    opts = dnnlib.EasyDict(kwargs)
    with one_line_errors():
        cfg = build_config(opts, given_options())
        for path, option in ((cfg.dest, '--dest'), (cfg.report_dir, '--report_dir')):
            check_output_dir(path, option)
            annotate.check_new_folder(path, option)
        if dry_run:
            click.echo(json.dumps(cfg, indent=2))
            return
        annotate.annotate_dataset(cfg)


if __name__ == '__main__':
    main()
