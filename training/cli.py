"""What the commands share: the command preamble, click option bundles, one-line errors, output paths, sampling masks.

The commands (eval.py, solve_inverse_problems.py, find_dataset_neighbors.py, train_text_to_image.py,
if_inference.py) import these instead of each other. Nothing here parses a command line: the option bundles
are decorators the commands apply, and the helpers take the values click parsed.
"""

import contextlib
import functools
import hashlib
import json
import os
import re
import time

import click

import dnnlib
from torch_utils import distributed as dist
from torch_utils.ambient_diffusion import MaskCorruption
from training import metrics


WANDB_PROJECT = 'ambient_diffusion'


def _options(*decorators):
    """Bundle click options so several commands (fid, ref, and later ones) share one definition."""
    def apply(func):
        for decorator in reversed(decorators):
            func = decorator(func)
        return func
    return apply


detector_options = _options(
    click.option('--detector',            help='Inception detector: TorchScript file, .pkl, or URL', metavar='PATH|URL', type=str, default=metrics.INCEPTION_URL, show_default=True),
    click.option('--allow_unsafe_pickle', help='Let a network or detector pickle run the code it embeds (trusted files only)', is_flag=True),
    click.option('--batch',               help='Images per batch and process',                metavar='INT',      type=click.IntRange(min=1), default=64, show_default=True),
    click.option('--workers',             help='Data loading worker processes per process',    metavar='INT',      type=click.IntRange(min=0), default=2, show_default=True),
)

score_options = _options(
    click.option('--ref',                 help='Reference statistics (.npz with mu, sigma)',   metavar='NPZ|URL',  type=str, required=True),
    # torchrun's parser takes '--num' for an abbreviation of its --numa-binding; '--num_images' passes through.
    click.option('--num', '--num_images', 'num', help='Number of images to score, error if fewer (under torchrun: --num_images)', metavar='INT', type=click.IntRange(min=2), default=50000, show_default=True),
    click.option('--seed',                help='Seed of the random subset when there are more', metavar='INT',      type=int, default=0, show_default=True),
    click.option('--outdir',              help='Where metrics.jsonl goes [default: the images folder\'s parent]', metavar='DIR', type=str),
    click.option('--wandb',               help='Weights & Biases logging',                     type=click.Choice(['off', 'offline', 'online']), default='off', show_default=True),
)


# Noise levels a sampler or denoiser accepts: below 1e-5 float32 images no longer change, above 1e4 the
# network sees nothing but noise; either end gives black or saturated images rather than an error.
SIGMA_RANGE = (1e-5, 1e4)


def sigma_range_check(ctx, param, value):
    """Click callback: a noise level within SIGMA_RANGE."""
    if value is not None and not SIGMA_RANGE[0] <= value <= SIGMA_RANGE[1]:
        raise click.BadParameter(f'{value:g} is outside [{SIGMA_RANGE[0]:g}, {SIGMA_RANGE[1]:g}], the noise levels '
                                 'the networks are trained on (EDM: 0.002 to 80)')
    return value


# The sampler's options, shared by eval.py generate and solve_inverse_problems.py.
sampler_options = _options(
    click.option('--steps',            help='Number of sampling steps', metavar='INT', type=click.IntRange(min=1), default=18, show_default=True),
    click.option('--sigma_min',        help='Lowest noise level', metavar='FLOAT', type=float, default=0.002, show_default=True, callback=sigma_range_check),
    click.option('--sigma_max',        help='Highest noise level', metavar='FLOAT', type=float, default=80, show_default=True, callback=sigma_range_check),
    click.option('--rho',              help='Time step exponent', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=7, show_default=True),
    click.option('--S_churn', 'S_churn', help='Stochasticity strength', metavar='FLOAT', type=click.FloatRange(min=0), default=0, show_default=True),
    click.option('--S_min', 'S_min',   help='Stoch. min noise level', metavar='FLOAT', type=click.FloatRange(min=0), default=0, show_default=True),
    click.option('--S_max', 'S_max',   help='Stoch. max noise level', metavar='FLOAT', type=click.FloatRange(min=0), default='inf', show_default=True),
    click.option('--S_noise', 'S_noise', help='Stoch. noise inflation', metavar='FLOAT', type=float, default=1, show_default=True),
    click.option('--solver',           help='heun, euler (EDM ODE), dpmpp2m (DPM-Solver++(2M): the same ODE, second order at one evaluation per step), ddim (DDIM with --eta), ddpm (ancestral) or vdm (VDM\'s ancestral sampler over its schedule, --steps=T; VDM networks)', type=click.Choice(['heun', 'euler', 'dpmpp2m', 'ddim', 'ddpm', 'vdm']), default='heun', show_default=True),
    click.option('--eta',              help='DDIM η: 0 deterministic (Euler), 1 DDPM-like (--solver=ddim)', metavar='FLOAT', type=click.FloatRange(0, 1), default=0, show_default=True),
    click.option('--ddpm_variance',    help='DDPM step variance: beta_tilde (posterior) or beta (--solver=ddpm)', type=click.Choice(['beta_tilde', 'beta']), default='beta_tilde', show_default=True),
    click.option('--cfg_scale',        help='Classifier-free guidance w: D = D_uncond + w·(D_cond − D_uncond) (class-conditional networks trained with --label_dropout)', metavar='FLOAT', type=click.FloatRange(min=0)),
    click.option('--num_masks',        help='Masks per sample (K; >1 adds reconstruction guidance)', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True),
    click.option('--guidance_scale',   help='Reconstruction guidance weight (w, or the original\'s λ with --guidance_units=original)', metavar='FLOAT', type=click.FloatRange(min=0), default=0, show_default=True),
    click.option('--guidance_units',   help='ours: w corrects the denoised image; original: λ moves x by −λ∇[½K·Σ‖D_0 − D_j‖²] per Heun stage, as the original eval.py', type=click.Choice(['ours', 'original']), default='ours', show_default=True),
    click.option('--clipping',         help='Clipping of the denoised image', type=click.Choice(['none', 'static', 'dynamic']), default='static', show_default=True),
)


# The network to load, for commands without a detector (denoise here, solve_inverse_problems.py).
network_options = _options(
    click.option('--network',          help='Snapshot (.pt of ours, .pkl of the original) or run directory', metavar='PATH|DIR', type=str, required=True),
    click.option('--latest',           help='Only the newest snapshot of a run directory', is_flag=True),
    click.option('--training_options', help='training_options.json of an original .pkl  [default: next to it]', metavar='JSON', type=str),
    click.option('--allow_unsafe_pickle', help='Let a network pickle run the code it embeds (trusted files only)', is_flag=True),
)


# Overrides of the sampler's masks (default: the snapshot's training corruption); shared with solve_inverse_problems.py.
sampling_mask_options = _options(
    click.option('--corruption_probability', help='p of the sampling masks  [default: the training one]', metavar='FLOAT', type=click.FloatRange(0, 1, max_open=True)),
    click.option('--delta_probability', help='δ of the sampling masks  [default: the training one]', metavar='FLOAT', type=click.FloatRange(0, 1, max_open=True)),
    click.option('--mask_full_rgb',     help='Share dust sampling masks over channels  [default: the training one]', metavar='BOOL', type=bool),
)


@contextlib.contextmanager
def one_line_errors():
    """Library errors (bad paths, missing files, too few images) as click's one-line `Error: ...`; a DataLoader
    worker's error, whose text is the worker's traceback, is reduced to its last line, the message."""
    try:
        yield
    except (ValueError, FileNotFoundError) as err:
        message = ([line for line in str(err).splitlines() if line.strip()] or [type(err).__name__])[-1]
        raise click.ClickException(re.sub(r'^[\w.]*(Error|Exception): ', '', message)) from None


def command_body(distributed=True):
    """Decorator of a click command's body `func(opts)`, under the command's click decorators.

    It adds `-n/--dry-run` (print the options as JSON and exit), passes the options as an EasyDict, joins the
    torchrun process group when `distributed`, and turns library errors into one-line click errors."""
    def decorate(func):
        @functools.wraps(func)
        def body(dry_run, **kwargs):
            opts = dnnlib.EasyDict(kwargs)
            if dry_run:
                click.echo(json.dumps(opts, indent=2))
                return None
            if distributed:
                dist.init()
            with one_line_errors():
                return func(opts)
        return click.option('-n', '--dry-run', 'dry_run', help='Print the options and exit', is_flag=True)(body)
    return decorate


def given_options(ctx=None):
    """Names of the options given on the command line (not left at their defaults) of the current command."""
    ctx = ctx or click.get_current_context()
    return {name for name in ctx.params if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}


def refuse_ignored(given, rules):
    """One-line error for the first option that was given but would have no effect: `rules` holds
    (option name, whether it is ignored now, why and what to do)."""
    for name, ignored, why in rules:
        if name in given and ignored:
            raise click.UsageError(f'--{name} has no effect here: {why}')


def guidance_rules(opts):
    """Sampler options that do nothing with the others given (for `refuse_ignored`)."""
    no_reconstruction = opts.num_masks == 1 or opts.guidance_scale == 0
    rules = [('guidance_scale', opts.num_masks == 1 and opts.guidance_scale > 0,
              'reconstruction guidance compares K > 1 masks; add --num_masks'),
             ('guidance_units', no_reconstruction and not opts.get('dps_scale'), 'there is no guidance without '
              '--num_masks > 1 and --guidance_scale > 0' + (' or --dps_scale > 0' if 'dps_scale' in opts else ''))]
    rules += [('eta', opts.get('solver') != 'ddim', 'η is the noise of DDIM steps; add --solver=ddim'),
              ('ddpm_variance', opts.get('solver') != 'ddpm', 'it is the variance of DDPM steps; add --solver=ddpm'),
              ('S_churn', opts.get('solver') in ('ddim', 'ddpm', 'vdm', 'dpmpp2m') and opts.get('S_churn', 0) > 0,
               f'--solver={opts.get("solver")} takes no churn; churn applies to heun and euler')]
    if 'resample_guidance_masks' in opts:
        rules.append(('resample_guidance_masks', not opts.resample_guidance_masks or opts.num_masks == 1
                      or opts.guidance_scale == 0, 'there are no guidance masks without --num_masks > 1 and --guidance_scale > 0'))
    return rules


def discrete_grid_rules(net, opts, path):
    """`refuse_ignored` rules for a network's own time grid: DDIM/DDPM steps on a network with discrete levels (DDPM)
    go through its skipped grid, and VDM steps through its schedule, so --sigma_min, --sigma_max and --rho would do
    nothing. --solver=vdm on a network without a schedule is a UsageError."""
    if opts.solver == 'vdm' and not hasattr(net, 'schedule'):
        raise click.UsageError(f'--solver=vdm steps through a VDM network\'s schedule γ(t); {path} has none (train one '
                               'with --precond=vdm, or use --solver=heun, euler, dpmpp2m, ddim or ddpm)')
    if opts.solver == 'vdm':
        return [(name, True, f'--solver=vdm steps through {path}\'s own schedule (T = --steps uniform times)')
                for name in ('sigma_min', 'sigma_max', 'rho')]
    discrete_grid = hasattr(net, 'discrete_sigmas') and opts.solver in ('ddim', 'ddpm')
    return [(name, discrete_grid, f'--solver={opts.solver} steps through {path}\'s own discrete levels (DDIM\'s '
             'skipped grid of --steps)') for name in ('sigma_min', 'sigma_max', 'rho')]


def on_rank0(work):
    """Run `work()` on rank 0 only; every process returns its one-line error message (None if it succeeded), so
    that all of them stop together instead of the others going on (or waiting) without rank 0."""
    error = None
    if dist.get_rank() == 0:
        try:
            work()
        except (ValueError, FileNotFoundError, click.ClickException) as err:
            error = err.format_message() if isinstance(err, click.ClickException) else str(err)
    return dist.broadcast_object(error)


def check_output_dir(path, option='--outdir'):
    """`path` can be a directory the command writes into: an existing writable directory, or a new one under a
    writable directory. Checked before any work, so that a bad path fails at once and nothing is written."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f'{option}={path}: {existing} is a file, not a directory; pass a directory')
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f'{option}={path}: {existing} is not writable; pass a directory you can write to')


def check_output_file(path, option='--dest'):
    """`path` can be written as a file: not a directory, in a directory `check_output_dir` accepts."""
    if os.path.isdir(path):
        raise ValueError(f'{option}={path} is a directory; pass a file name')
    check_output_dir(os.path.dirname(os.path.abspath(path)), option)


def check_subset_seed(opts):
    """`--seed` only picks the `--max_size` subset: giving it alone is a mistake worth a one-line error."""
    if opts.seed != 0 and opts.max_size is None:
        raise click.BadParameter('--seed only chooses the --max_size subset; add --max_size or drop --seed', param_hint='--seed')


PROVENANCE_FILE = 'provenance.json'
# Settings added after outputs were first recorded: a record without the key was made with this value.
PROVENANCE_ABSENT_MEANS = {'sampler.eta': 0.0, 'sampler.variance': 'beta_tilde', 'cfg_scale': None, 'eta': 0.0,
                           'ddpm_variance': 'beta_tilde', 'method': 'dps', 'jump_length': 1, 'jump_n_sample': 1}


def file_digest(path):
    """sha256 of a file (a local path or a URL, through the download cache), in hex."""
    local = dnnlib.util.open_url(path, return_filename=True)
    digest = hashlib.sha256()
    with open(local, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _flatten(record, prefix=''):
    """{'a': {'b': 1}} -> {'a.b': 1}, so that a difference names the setting itself."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f'{prefix}{key}.'))
        else:
            flat[prefix + key] = value
    return flat


def claim_output_dir(outdir, record, absent_means=None):
    """Make `outdir` the output of `record` (a JSON-able dict of what decides its files: the network's digest,
    the sampler and operator settings). The first run writes `{outdir}/provenance.json`; a rerun with the same
    record continues and skips what is done; one with another record is a ValueError naming the differences,
    so outputs of other settings are never reported as this run's. `absent_means`: what a key missing from an
    older record meant for this run (added to PROVENANCE_ABSENT_MEANS)."""
    record = json.loads(json.dumps(record))
    path = os.path.join(outdir, PROVENANCE_FILE)

    def claim():
        if os.path.isfile(path):
            with open(path, encoding='utf-8') as f:
                saved, now = _flatten(json.load(f)), _flatten(record)
            absent = dict(PROVENANCE_ABSENT_MEANS, **(absent_means or {}))
            saved, now = dict(absent, **saved), dict(absent, **now)
            diffs = [f'{key}: {saved.get(key)!r} there, {now.get(key)!r} now' for key in sorted(set(saved) | set(now))
                     if saved.get(key) != now.get(key)]
            if diffs:
                raise ValueError(f'{outdir} holds outputs made with other settings ({"; ".join(diffs)}); choose another '
                                 f'--outdir, or delete {outdir} to redo them')
            return
        if os.path.isdir(outdir) and any(name.endswith('.png') or name == 'metrics.jsonl' or name.isdigit()
                                         for name in os.listdir(outdir)):
            raise ValueError(f'{outdir} already holds outputs but no {PROVENANCE_FILE} saying what made them; '
                             f'choose another --outdir, or delete {outdir} to redo them')
        os.makedirs(outdir, exist_ok=True)
        with dnnlib.util.atomic_write(path, 'w', encoding='utf-8') as f:
            json.dump(record, f, indent=2)

    error = on_rank0(claim)  # rank 0 decides for every process
    if error is not None:
        raise ValueError(error)


def image_path(outdir, seed, subdirs=False):
    return os.path.join(outdir, f'{seed - seed % 1000:06d}', f'{seed:06d}.png') if subdirs else \
        os.path.join(outdir, f'{seed:06d}.png')


def sampling_corruption(info, opts):
    """The sampling corruption: the snapshot's training corruption, with the command-line overrides."""
    if not info.ambient:
        given = [k for k in ('corruption_pattern', 'corruption_probability', 'delta_probability', 'mask_full_rgb')
                 if opts[k] is not None]
        if given or opts.get('num_masks', 1) != 1:
            raise click.ClickException(f'{info.path} is a clean (non-ambient) network: --{", --".join(given or ["num_masks"])} '
                                       'do not apply')
        return None
    cfg = dict(info.corruption or {})
    for key in ('corruption_pattern', 'corruption_probability', 'delta_probability', 'mask_full_rgb'):
        if opts[key] is not None:
            cfg[key] = opts[key]
    missing = [k for k in ('corruption_pattern', 'corruption_probability', 'delta_probability') if k not in cfg]
    if missing:
        raise click.ClickException(f'{info.path} does not record its corruption; pass --{", --".join(missing)}')
    return MaskCorruption(pattern=cfg['corruption_pattern'], corruption_probability=cfg['corruption_probability'],
                          delta_probability=cfg['delta_probability'], mask_full_rgb=cfg.get('mask_full_rgb', False),
                          geometry=cfg.get('geometry', 'ours'))


# ----------------------------------------------------------------------------
# Scoring (eval.py fid/generate, solve_inverse_problems.py --ref).

def load_detector(opts):
    """The detector named by `opts.detector`, on this process's device; rank 0 fetches it first."""
    dist.print0(f'Loading detector {opts.detector} ...')
    with dist.rank0_first():
        return metrics.load_detector(opts.detector, device=dist.device(), allow_unsafe_pickle=opts.allow_unsafe_pickle)


def score_images(images, opts, extra=None, detector=None):
    """FID and IS of the images in `images` against `opts.ref`; prints them and, on rank 0, appends a line to
    `{opts.outdir}/metrics.jsonl` (and logs to wandb). `extra` is merged into that line. Returns the line."""
    ref = metrics.load_stats(opts.ref)
    detector = detector or load_detector(opts)
    dist.print0(f'Computing statistics of {opts.num} images in {images} ...')
    stats = metrics.calculate_inception_stats(images, detector, num_expected=opts.num, seed=opts.seed,
        max_batch_size=opts.batch, device=dist.device(), num_workers=opts.workers)
    if stats.mu.shape != ref['mu'].shape:
        raise ValueError(f'{opts.ref} holds {ref["mu"].shape[0]}-d statistics but {opts.detector} gives '
                         f'{stats.mu.shape[0]}-d features; make the reference with the same detector')
    fid = metrics.calculate_fid(stats.mu, stats.sigma, ref['mu'], ref['sigma'])
    record = dict(fid=fid, inception_score=stats.inception_score, inception_score_std=stats.inception_score_std,
        inception_score_original=stats.inception_score_original, is_num_splits=stats.is_num_splits,
        num_images=stats.num_images, images=os.path.abspath(images), ref=opts.ref, detector=opts.detector,
        seed=opts.seed, batch=opts.batch, world_size=dist.get_world_size(), **(extra or {}), timestamp=time.time())
    dist.print0(f'FID: {fid:.4f}')
    dist.print0(f'IS:  {stats.inception_score:.4f} ± {stats.inception_score_std:.4f} ({stats.is_num_splits} splits)')
    dist.print0(f'IS:  {stats.inception_score_original:.4f} (single split, as the original eval.py)')
    if dist.get_rank() == 0:
        outdir = opts.outdir or os.path.dirname(os.path.abspath(images.rstrip('/\\')))
        os.makedirs(outdir, exist_ok=True)
        with open(os.path.join(outdir, 'metrics.jsonl'), 'a', encoding='utf-8') as f:
            f.write(json.dumps(record) + '\n')
        if opts.wandb != 'off':
            import wandb
            run = wandb.init(mode=opts.wandb, project=WANDB_PROJECT, dir=outdir, job_type='eval', config=dict(opts),
                             name=opts.get('experiment_name'), id=opts.get('wandb_id') or None, resume='allow')
            run.log({key: record[key] for key in ('fid', 'inception_score', 'inception_score_std', 'inception_score_original')})
            run.finish()
    return record
