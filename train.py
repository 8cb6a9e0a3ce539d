"""Train diffusion models on corrupted data (Ambient Diffusion) or on clean data (EDM).

    python train.py --outdir=runs --data=data.zip --precond=ambient --corruption_probability=0.8
    torchrun --standalone --nproc_per_node=8 train.py --outdir=runs --data=data.zip ...

The command turns options into a config (`build_config`, no I/O) and hands it to
`training.training_loop.training_loop`. `--resume=<run dir or training-state file>` continues that run
in place, exactly where its last state dump left it.
"""

import contextlib
import json
import math
import os
import re
import secrets
import traceback

import click
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils.misc import parse_int_list
from training import sigma_first, snapshots, training_loop
from training.cli import check_output_dir, given_options, on_rank0, one_line_errors, refuse_ignored

ARCHS = ('ddpmpp', 'ncsnpp', 'adm')
PRECONDS = ('ambient', 'ambient_vp', 'edm', 'vp', 've', 'ddpm', 'ambient_ddpm', 'ambient_noisy', 'ambient_noisy_vp', 'vdm')
AMBIENT_PRECONDS = ('ambient', 'ambient_vp', 'ambient_ddpm')  # masked data: [image, mask] input, loss on A
DDPM_PRECONDS = ('ddpm', 'ambient_ddpm')  # discrete DDPM schedule: --beta_schedule, --beta_start, --beta_end, --T
DDPM_DEFAULTS = dict(beta_schedule='linear', beta_start=1e-4, beta_end=0.02, T=1000)
NOISY_PRECONDS = ('ambient_noisy', 'ambient_noisy_vp')  # images trusted at some noise levels: σ-first, Tweedie loss
VDM_OPTIONS = dict(schedule='learned', gamma_min=-13.3, gamma_max=5.0, t_sampling='low_discrepancy', fourier_features=None)
DATA_KEYS = ('path', 'max_size', 'xflip', 'use_labels', 'noise_sigma', 'clean_fraction')  # what a resume may not change silently
# --preset=original: the original code's network and objective (options given explicitly still win).
ORIGINAL_PRESET = dict(gate='double_sigmoid', hidden_precond='original', cond_sigma_min=0.0, augment_set='edm',
                       fixed_hat_mask=True, mask_geometry='original')
DEFAULT_CORRUPTION_PROBABILITY = 0.4
DEFAULT_AUGMENT = 0.12
MASK_AWARE_COND_SIGMA_MIN = 0.1  # about the 18th percentile of EDM's training σ (ln σ ~ N(-1.2, 1.2²))


class ConfigError(click.ClickException):
    """An inconsistent set of options; the message names the options and the fix."""


def _precision(value):
    """--fp16's value: False, True (float16) or 'bf16'."""
    text = str(value).strip().lower()
    if text in ('false', '0', 'no', 'off'):
        return False
    if text in ('true', '1', 'yes', 'on', 'fp16'):
        return True
    if text == 'bf16':
        return 'bf16'
    raise click.BadParameter(f'{value!r}: pass False, True (float16), fp16 or bf16', param_hint='--fp16')


def _network_kwargs(opts):
    precond_class = {'ambient': 'EDMPrecond', 'edm': 'EDMPrecond', 'ambient_vp': 'VPPrecond', 'vp': 'VPPrecond',
        've': 'VEPrecond', 'ambient_noisy': 'EDMPrecond', 'ambient_noisy_vp': 'VPPrecond', 'ddpm': 'DDPMPrecond',
        'ambient_ddpm': 'DDPMPrecond', 'vdm': 'VDMPrecond'}[opts.precond]
    kw = dnnlib.EasyDict(class_name=f'training.networks.{precond_class}')
    if opts.arch == 'ddpmpp':
        kw.update(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
            channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2])
    elif opts.arch == 'ncsnpp':
        kw.update(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
            channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2])
    else:
        kw.update(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4])
    if opts.cbase is not None:
        kw.model_channels = opts.cbase
    if opts.cres is not None:
        kw.channel_mult = opts.cres
    if opts.num_blocks is not None:
        kw.num_blocks = opts.num_blocks
    if opts.attn is not None:
        kw.attn_resolutions = opts.attn
    if opts.precond in DDPM_PRECONDS:
        kw.update(_ddpm_schedule(opts))
    if opts.precond == 'vdm':
        vdm = _vdm_options(opts)
        kw.update(schedule=vdm.schedule, gamma_min=vdm.gamma_min, gamma_max=vdm.gamma_max)
        if vdm.fourier_features:
            kw.fourier_features = list(vdm.fourier_features)
    if opts.get('label_dropout'):
        kw.label_dropout = opts.label_dropout
    kw.update(dropout=opts.dropout, use_fp16=opts.fp16, ambient=opts.precond in AMBIENT_PRECONDS,
        gate=opts.gate if opts.gated else 'none')
    if opts.precond in AMBIENT_PRECONDS:
        kw.hidden_precond = opts.hidden_precond or 'mask_aware'
        if opts.get('preset') == 'original':
            kw.outputs = 'image_and_mask'  # 2C output channels, so that the original's checkpoints fit
    # The floor comes with the mask-aware preconditioning, where hidden pixels are F itself.
    cond_sigma_min = opts.cond_sigma_min
    if cond_sigma_min is None:
        cond_sigma_min = MASK_AWARE_COND_SIGMA_MIN if kw.get('hidden_precond') == 'mask_aware' else 0
    if cond_sigma_min > 0:
        kw.cond_sigma_min = cond_sigma_min
    return kw


def build_config(opts, world_size=1):
    """Options (an EasyDict of the click values) -> training_loop kwargs. Pure: no I/O, no randomness."""
    ambient = opts.precond in AMBIENT_PRECONDS
    if not ambient:
        if opts.hidden_precond is not None:
            raise ConfigError(f'--hidden_precond only applies to ambient networks (pixels hidden from the network); '
                f'--precond={opts.precond} sees every pixel: drop --hidden_precond or use --precond=ambient')
        if opts.norm != 2:
            raise ConfigError(f'--norm={opts.norm} only applies to the ambient losses; use --precond=ambient or ambient_vp')
        if opts.clean_diagnostics and opts.precond not in NOISY_PRECONDS:
            raise ConfigError(f'--clean_diagnostics reports the ambient loss on every pixel; --precond={opts.precond} '
                'already trains on every pixel: use --precond=ambient or ambient_vp')
        if (opts.delta_probability or 0) > 0 or opts.fixed_hat_mask:
            raise ConfigError(f'--delta_probability/--fixed_hat_mask only affect the ambient losses, but --precond={opts.precond} '
                'trains on the observations as if they were clean; use --precond=ambient or set --delta_probability=0')
    _check_noisy_options(opts)
    _ddpm_schedule(opts)
    vdm = _vdm_options(opts)
    sr_factor = _check_superres(opts)
    delta_probability = opts.delta_probability if opts.delta_probability is not None else (0.1 if ambient else 0.0)
    batch_gpu = opts.batch_gpu or opts.batch // world_size
    if opts.batch % world_size != 0 or (opts.batch // world_size) % batch_gpu != 0:
        raise ConfigError(f'--batch={opts.batch} must be divisible by processes ({world_size}) x --batch-gpu ({batch_gpu})')

    c = dnnlib.EasyDict()
    c.dataset_kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=opts.data,
        use_labels=opts.cond, xflip=opts.xflip, cache=opts.cache, max_size=opts.max_size,
        corruption_pattern=opts.corruption_pattern, corruption_probability=opts.corruption_probability,
        delta_probability=delta_probability, mask_full_rgb=opts.mask_full_rgb,
        corruption_seed=opts.corruption_seed, hat_seed=opts.seed, fixed_hat_mask=opts.fixed_hat_mask,
        with_clean=opts.clean_diagnostics)
    if opts.get('noise_sigma') is not None:
        c.dataset_kwargs.update(noise_sigma=opts.noise_sigma, clean_fraction=opts.clean_fraction or 0.0)
    if opts.precond in NOISY_PRECONDS:
        c.dataset_kwargs.noise_items = True
    if sr_factor:
        c.dataset_kwargs.sr_factor = sr_factor
    if opts.get('mask_geometry', 'ours') != 'ours':
        c.dataset_kwargs.mask_geometry = opts.mask_geometry
    c.data_loader_kwargs = dnnlib.EasyDict(num_workers=opts.workers, pin_memory=torch.cuda.is_available())
    if opts.workers > 0:
        c.data_loader_kwargs.prefetch_factor = 2
    c.network_kwargs = _network_kwargs(opts)
    if sr_factor:
        c.network_kwargs.sr_factor = sr_factor
    loss_class = {'ambient': 'AmbientLoss', 'ambient_vp': 'AmbientVPLoss', 'edm': 'EDMLoss', 'vp': 'VPLoss',
        've': 'VELoss', 'ambient_noisy': 'NoisyAmbientLoss', 'ambient_noisy_vp': 'NoisyAmbientVPLoss', 'ddpm': 'DDPMLoss',
        'ambient_ddpm': 'AmbientDDPMLoss', 'vdm': 'VDMLoss'}[opts.precond]
    c.loss_kwargs = dnnlib.EasyDict(class_name=f'training.{"vdm" if opts.precond == "vdm" else "loss"}.{loss_class}')
    if vdm:
        c.loss_kwargs.update(t_sampling=vdm.t_sampling, T=vdm.T, strata=opts.batch)
    if opts.precond in DDPM_PRECONDS:
        c.loss_kwargs.update(_ddpm_schedule(opts))
    if opts.precond in NOISY_PRECONDS:
        c.loss_kwargs.update(s_max=opts.get('s_max'), ambient_factor=opts.get('ambient_factor', True))
    if ambient:
        c.loss_kwargs.update(norm=opts.norm, hidden_precond=c.network_kwargs.hidden_precond)
    optimizer = 'AdamW' if opts.weight_decay > 0 else 'Adam'
    # fused=True: one kernel for the whole update (fastest on CPU and CUDA alike).
    c.optimizer_kwargs = dnnlib.EasyDict(class_name=f'torch.optim.{optimizer}', lr=opts.lr, betas=[0.9, 0.999], eps=1e-8,
        fused=True)
    if opts.weight_decay > 0:
        c.optimizer_kwargs.weight_decay = opts.weight_decay
    c.augment_kwargs = None
    if resolve_augment(opts) > 0:
        augment_set = opts.augment_set or ('blit' if opts.corruption_pattern == 'dust' or opts.precond in NOISY_PRECONDS
                                           else 'edm')
        c.augment_kwargs = dnnlib.EasyDict(class_name='training.augment.AugmentPipe', p=opts.augment, xflip=1e8, yflip=1)
        if augment_set == 'edm':
            c.augment_kwargs.update(scale=1, rotate_frac=1, aniso=1, translate_frac=1)
        else:
            c.augment_kwargs.update(rotate_int=1, translate_int=1)
        c.network_kwargs.augment_dim = dnnlib.util.construct_class_by_name(**c.augment_kwargs).label_dim

    c.update(seed=opts.seed, batch_size=opts.batch, batch_gpu=batch_gpu, total_kimg=max(opts.duration * 1000, 1e-3),
        ema_halflife_kimg=opts.ema * 1000, lr_rampup_kimg=opts.lr_rampup, loss_scaling=opts.ls,
        max_grad_norm=opts.max_grad_norm, kimg_per_tick=opts.tick, snapshot_ticks=opts.snap, state_dump_ticks=opts.dump,
        cudnn_benchmark=opts.bench, deterministic=opts.deterministic, compile=opts.compile, wandb_mode=opts.wandb,
        channels_last=opts.get('channels_last', False),
        tensorboard=opts.tensorboard)
    if opts.wandb != 'off':
        c.wandb_kwargs = dnnlib.EasyDict(project='ambient_diffusion', name=opts.experiment_name)
        if opts.get('wandb_id'):
            c.wandb_kwargs.id = opts.wandb_id  # continue that wandb run (resume='allow')
    if opts.transfer is not None:
        c.transfer = opts.transfer
    return c


def resolve_augment(opts):
    """--augment's value: 0.12 by default, 0 for super-resolution (its condition is not augmented with the image) and
    for VDM (a likelihood of the images themselves)."""
    if opts.get('augment') is None:
        opts.augment = 0.0 if opts.get('task', 'generate') == 'superres' or opts.precond == 'vdm' else DEFAULT_AUGMENT
    return opts.augment


def _check_superres(opts):
    """--task=superres (SR3): the network sees the upsampled low-resolution image as extra channels."""
    if opts.get('task', 'generate') != 'superres':
        if opts.get('sr_factor') is not None:
            raise ConfigError('--sr_factor is the super-resolution factor; add --task=superres')
        return None
    if opts.precond in NOISY_PRECONDS:
        raise ConfigError(f'--task=superres is not available with --precond={opts.precond}; use edm, vp, ve, ddpm or '
                          'the mask losses')
    if resolve_augment(opts) > 0:
        raise ConfigError('--task=superres trains without augmentation (the low-resolution condition would not follow '
                          'the augmented image); pass --augment=0')
    return opts.get('sr_factor') or 4


def _ddpm_schedule(opts):
    """The discrete schedule of the DDPM preconditioner and loss (the same for both); refused for other preconds."""
    values = dict(beta_schedule=opts.get('beta_schedule'), beta_start=opts.get('beta_start'),
                  beta_end=opts.get('beta_end'), T=opts.get('T'))
    given = {name: value for name, value in values.items() if value is not None}
    if opts.precond == 'vdm':
        given.pop('T', None)  # --T: VDM's discrete-time bound
    if opts.precond not in DDPM_PRECONDS:
        if given:
            raise ConfigError(f'--{next(iter(given))} sets the discrete DDPM schedule; use --precond=ddpm or ambient_ddpm')
        return {}
    if given.get('T', 2) < 2:
        raise ConfigError(f'--T={given["T"]}: a DDPM schedule needs at least 2 steps')
    if opts.get('beta_schedule') == 'cosine' and ('beta_start' in given or 'beta_end' in given):
        raise ConfigError('--beta_start/--beta_end set the linear schedule; the cosine schedule has none: drop them')
    return dict(DDPM_DEFAULTS, **given)


def _vdm_options(opts):
    """--precond=vdm's options (VDM_OPTIONS, and --T: discrete time) completed with defaults; refused for other
    preconds, and VDM refuses what would change the 8-bit images it is a likelihood of. Returns {} without vdm."""
    given = {name for name in VDM_OPTIONS if opts.get(name) is not None}
    if opts.precond != 'vdm':
        if given:
            raise ConfigError(f'--{sorted(given)[0]} is an option of the VDM likelihood model; use --precond=vdm')
        return {}
    vdm = dnnlib.EasyDict({name: opts.get(name) if opts.get(name) is not None else default
                           for name, default in VDM_OPTIONS.items()}, T=opts.get('T'))
    if not (math.isfinite(vdm.gamma_min) and math.isfinite(vdm.gamma_max) and vdm.gamma_min < vdm.gamma_max):
        raise ConfigError(f'--gamma_min={vdm.gamma_min} must be below --gamma_max={vdm.gamma_max}, both finite (γ '
                          'increases from t = 0, the data, to t = 1, the noise; VDM uses -13.3 and 5)')
    if opts.get('cond_sigma_min') is not None:
        raise ConfigError('--cond_sigma_min floors the noise label of EDM-style networks; a VDM network is told γ(t) '
                          'itself: drop it')
    for name, what in (('corruption_probability', 'masks'), ('noise_sigma', 'synthetic noise')):
        if opts.get(name):
            raise ConfigError(f'--precond=vdm is a likelihood model of the clean 8-bit images; {what} (--{name}) would '
                              'change them: drop it')
    if resolve_augment(opts) > 0:
        raise ConfigError('--precond=vdm is a likelihood of the 8-bit images themselves; augmentation would change '
                          'them: pass --augment=0 (dataset --xflip is exact and allowed)')
    if opts.get('task', 'generate') != 'generate':
        raise ConfigError('--precond=vdm trains unconditional (or class-conditional) generation; drop --task')
    return vdm


def _check_noisy_options(opts):
    """The noisy-data options: the σ-first Tweedie losses train on whole images (no masks); synthetic noise is
    trained on by them or, as a baseline, by the clean-data losses; the loss options need a noisy-data loss."""
    noisy = opts.precond in NOISY_PRECONDS
    if opts.corruption_probability is None:  # no masks on noisy data unless asked for
        opts.corruption_probability = (0.0 if noisy or opts.get('noise_sigma') is not None or opts.precond == 'vdm'
                                       else DEFAULT_CORRUPTION_PROBABILITY)
    if noisy and opts.corruption_probability > 0:
        raise ConfigError(f'--precond={opts.precond} trains on whole images trusted at some noise levels; masks '
                          '(--corruption_probability) are for --precond=ambient: drop one of them')
    if opts.get('noise_sigma') is not None and opts.precond in AMBIENT_PRECONDS:
        raise ConfigError(f'--noise_sigma makes noisy images, which the mask loss of --precond={opts.precond} does not '
                          'model: use --precond=ambient_noisy (or edm for the baseline that treats them as clean)')
    if opts.get('clean_fraction') is not None and opts.get('noise_sigma') is None:
        raise ConfigError('--clean_fraction is the share of images --noise_sigma leaves clean; give --noise_sigma too')
    if noisy and opts.get('augment_set') == 'edm' and resolve_augment(opts) > 0:
        raise ConfigError(f'--precond={opts.precond} trusts each image\'s noise to be white Gaussian of std sigma_min; '
                          'EDM\'s warps (--augment_set=edm) interpolate and filter it: use --augment_set=blit')
    if not noisy and (opts.get('s_max') is not None or not opts.get('ambient_factor', True)):
        raise ConfigError('--s_max and --ambient_factor apply to the noisy-data losses; use --precond=ambient_noisy or '
                          'ambient_noisy_vp, or drop them')
    if noisy and opts.clean_diagnostics and opts.get('noise_sigma') is None:
        raise ConfigError('--clean_diagnostics needs the clean images, which only synthetic noisy data '
                          '(--noise_sigma) has; drop it')


def run_dir_name(outdir, dataset_name, opts, world_size):
    """EDM's run directory: NNNNN-<dataset>-<cond>-<arch>-<precond>-gpus<N>-batch<B>-<fp>[-desc]."""
    desc = (f'{dataset_name}-{"cond" if opts.cond else "uncond"}-{opts.arch}-{opts.precond}-gpus{world_size}'
            f'-batch{opts.batch}-{"bf16" if opts.fp16 == "bf16" else "fp16" if opts.fp16 else "fp32"}')
    if opts.desc is not None or opts.get('experiment_name') is not None:
        desc += f'-{opts.desc or opts.experiment_name}'
    ids = [int(m.group()) for m in (re.match(r'^\d+', x) for x in (os.listdir(outdir) if os.path.isdir(outdir) else [])) if m]
    return os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')


def _resolve_resume(resume):
    if os.path.isdir(resume):
        state = snapshots.find_latest_state(resume)
        if state is None:
            raise click.ClickException(f'--resume={resume}: no training-state-*.pt in that directory')
        return state
    if not os.path.isfile(resume):
        raise click.ClickException(f'--resume={resume}: no such file or directory')
    return resume


@click.command()
# Main options.
@click.option('--outdir',       help='Where to save the results', metavar='DIR',                  type=str, required=True)
@click.option('--data',         help='Path to the dataset (folder or zip)', metavar='ZIP|DIR',   type=str, required=True)
@click.option('--cond',         help='Train class-conditional model', metavar='BOOL',            type=bool, default=False, show_default=True)
@click.option('--arch',         help='Network architecture',                                     type=click.Choice(ARCHS), default='ddpmpp', show_default=True)
@click.option('--precond',      help='Preconditioning & loss',                                   type=click.Choice(PRECONDS), default='ambient', show_default=True)
# Corruption.
@click.option('--corruption_pattern',     help='Mask pattern of the dataset',                     type=click.Choice(['dust', 'box', 'fixed_box', 'keep_patch']), default='dust', show_default=True)
@click.option('--corruption_probability', help='p: how much of each image is missing  [default: 0.4; 0 for the noisy-data preconds and with --noise_sigma]', metavar='FLOAT', type=click.FloatRange(0, 1, max_open=True))
@click.option('--delta_probability',      help='δ: further corruption of the observed pixels  [default: 0.1 for ambient losses, else 0]', metavar='FLOAT', type=click.FloatRange(0, 1, max_open=True))
@click.option('--mask_full_rgb',          help='One dust mask per pixel, shared by its channels', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--mask_geometry',          help='Box patterns: ours, or original (B of A\'s size for box, fixed_box short of the last row with δ an on/off switch, keep_patch sub-boxes short of the far edge)', type=click.Choice(['ours', 'original']), default='ours', show_default=True)
@click.option('--fixed_hat_mask',         help='Fix the further corruption per image (original behaviour)', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--corruption_seed',        help='Seed of the dataset corruption A', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--hidden_precond',         help='Preconditioning of pixels hidden from the network: mask_aware (per pixel, unit-variance targets) or original (the original code\'s)  [default: mask_aware]', type=click.Choice(['mask_aware', 'original']))
@click.option('--cond_sigma_min',         help='Smallest noise level the network is told: c_noise uses max(σ, this); 0 = σ itself  [default: 0.1 with mask_aware, else 0]', metavar='FLOAT', type=click.FloatRange(min=0))
@click.option('--clean_diagnostics',      help='Also report the loss on every pixel (Loss/loss_all; the original\'s loss_test) from the clean images of a synthetically corrupted dataset; never trained on', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--task',                   help='generate: unconditional (or class-conditional) images; superres: SR3, the low-resolution image as extra input', type=click.Choice(['generate', 'superres']), default='generate', show_default=True)
@click.option('--sr_factor',              help='--task=superres: the downsampling factor  [default: 4]', metavar='INT', type=click.IntRange(min=2))
@click.option('--beta_schedule',          help='DDPM preconds: β schedule, linear (Ho et al.) or cosine (Nichol & Dhariwal)  [default: linear]', type=click.Choice(['linear', 'cosine']))
@click.option('--beta_start',             help='DDPM preconds: first β of the linear schedule  [default: 1e-4]', metavar='FLOAT', type=click.FloatRange(0, 1, min_open=True, max_open=True))
@click.option('--beta_end',               help='DDPM preconds: last β of the linear schedule  [default: 0.02]', metavar='FLOAT', type=click.FloatRange(0, 1, min_open=True, max_open=True))
@click.option('--T', 'T',                 help='DDPM preconds: number of diffusion steps  [default: 1000]; vdm: the discrete-time bound with T steps  [default: continuous time]', metavar='INT', type=click.IntRange(min=1))
@click.option('--schedule',               help='vdm: noise schedule γ(t): fixed_linear, learned_linear (learned endpoints) or learned (monotone network, trained for low estimator variance)  [default: learned]', type=click.Choice(['fixed_linear', 'learned_linear', 'learned']))
@click.option('--gamma_min',              help='vdm: γ(0), the lowest log noise-to-signal ratio (initial value when learned)  [default: -13.3]', metavar='FLOAT', type=float)
@click.option('--gamma_max',              help='vdm: γ(1), the highest (initial value when learned)  [default: 5]', metavar='FLOAT', type=float)
@click.option('--t_sampling',             help='vdm: time sampling of the bound: low_discrepancy (stratified over the batch), antithetic (t, 1 − t) or uniform  [default: low_discrepancy]', type=click.Choice(['low_discrepancy', 'antithetic', 'uniform']))
@click.option('--fourier_features',       help='vdm: exponents n of the Fourier input features sin/cos(2^n·π·z), e.g. 7,8  [default: none]', metavar='LIST', type=parse_int_list)
@click.option('--noise_sigma',            help='Synthetic noisy data: fixed Gaussian noise of this std on every image but a --clean_fraction (annotated (S, 0), kind noisy)', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--clean_fraction',         help='Share of images --noise_sigma leaves clean (seeded by --corruption_seed)  [default: 0]', metavar='FLOAT', type=click.FloatRange(0, 1))
@click.option('--s_max',                  help='Noisy-data losses: an image with sigma_min is used at σ > sigma_min·sqrt(1 + 1/(s_max − 1)) only, which caps the ambient factor below s_max²', metavar='FLOAT', type=click.FloatRange(min=1, min_open=True))
@click.option('--ambient_factor',         help='Noisy-data losses: weigh ‖x̂_tn − x_tn‖² by σ_t⁴/(σ_t² − σ_tn²)² (False: EDM\'s weight only, as ambient-laws)', metavar='BOOL', type=bool, default=True, show_default=True)
@click.option('--preset',                 help='original: the original code\'s defaults at once (double-sigmoid gates, its hidden-pixel preconditioning, EDM\'s augmentations, a fixed B per image); explicit options still win', type=click.Choice(['ours', 'original']), default='ours', show_default=True)
@click.option('--norm',                   help='Loss norm: 2 squared, 1 absolute', metavar='INT', type=click.Choice(['1', '2']), default='2', show_default=True, callback=lambda c, p, v: int(v))
# Hyperparameters.
@click.option('--duration',     help='Training duration', metavar='MIMG',                        type=click.FloatRange(min=0, min_open=True), default=200, show_default=True)
@click.option('--batch',        help='Total batch size', metavar='INT',                          type=click.IntRange(min=1), default=512, show_default=True)
@click.option('--batch-gpu',    help='Limit batch size per process', metavar='INT',              type=click.IntRange(min=1))
@click.option('--cbase',        help='Channel multiplier  [default: varies]', metavar='INT',     type=click.IntRange(min=1))
@click.option('--cres',         help='Channels per resolution  [default: varies]', metavar='LIST', type=parse_int_list)
@click.option('--num_blocks',   help='Residual blocks per resolution  [default: varies]', metavar='INT', type=click.IntRange(min=1))
@click.option('--attn',         help='Attention resolutions, e.g. 16 or 32,16,8  [default: varies]', metavar='LIST', type=parse_int_list)
@click.option('--gated',        help='Gated convolutions', metavar='BOOL',                       type=bool, default=True, show_default=True)
@click.option('--gate',         help='Gate function (double_sigmoid = original checkpoints)',   type=click.Choice(['sigmoid', 'double_sigmoid']), default='sigmoid', show_default=True)
@click.option('--lr',           help='Learning rate', metavar='FLOAT',                           type=click.FloatRange(min=0, min_open=True), default=10e-4, show_default=True)
@click.option('--lr_rampup',    help='Learning-rate ramp-up (0 = none)', metavar='KIMG',         type=click.FloatRange(min=0), default=10000, show_default=True)
@click.option('--weight_decay', help='AdamW weight decay (0 = Adam)', metavar='FLOAT',           type=click.FloatRange(min=0), default=0, show_default=True)
@click.option('--max_grad_norm', help='Clip the gradient norm of each parameter group (the network; a learned VDM schedule apart)', metavar='FLOAT',          type=click.FloatRange(min=0, min_open=True))
@click.option('--ema',          help='EMA half-life', metavar='MIMG',                            type=click.FloatRange(min=0), default=0.5, show_default=True)
@click.option('--label_dropout', help='Zero each image\'s class label with this probability (for classifier-free guidance, eval.py --cfg_scale)', metavar='FLOAT', type=click.FloatRange(min=0, max=1, max_open=True), default=0, show_default=True)
@click.option('--dropout',      help='Dropout probability', metavar='FLOAT',                     type=click.FloatRange(min=0, max=1), default=0.13, show_default=True)
@click.option('--augment',      help='Augment probability  [default: 0.12; 0 for --task=superres]', metavar='FLOAT', type=click.FloatRange(min=0, max=1))
@click.option('--augment_set',  help='Augmentations: edm = EDM\'s warps (erase observed pixels near hidden ones), blit = exact flips, quarter turns and integer shifts  [default: blit for dust, else edm]', type=click.Choice(['edm', 'blit']))
@click.option('--xflip',        help='Enable dataset x-flips', metavar='BOOL',                   type=bool, default=False, show_default=True)
@click.option('--max_size',     help='Train on a seeded subset of this many images', metavar='INT', type=click.IntRange(min=1))
# Performance-related.
@click.option('--fp16',         help='Mixed precision: True/fp16 (float16, CUDA only) or bf16 (bfloat16, CUDA or CPU; fast on CPUs with AVX512-BF16/AMX)', metavar='BOOL|bf16', type=str, default='False', show_default=True, callback=lambda c, p, v: _precision(v))
@click.option('--channels_last', help='Channels-last memory format for the network and its activations', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--ls',           help='Loss scaling', metavar='FLOAT',                            type=click.FloatRange(min=0, min_open=True), default=1, show_default=True)
@click.option('--bench',        help='Enable cuDNN benchmarking', metavar='BOOL',                type=bool, default=True, show_default=True)
@click.option('--cache',        help='Cache dataset in CPU memory', metavar='BOOL',              type=bool, default=True, show_default=True)
@click.option('--workers',      help='DataLoader worker processes', metavar='INT',               type=click.IntRange(min=0), default=1, show_default=True)
@click.option('--compile',      help='torch.compile the network', metavar='BOOL',                type=bool, default=False, show_default=True)
@click.option('--deterministic', help='Deterministic kernels (exact resumes)', metavar='BOOL',   type=bool, default=False, show_default=True)
# I/O-related.
@click.option('--desc',         help='String to include in result dir name', metavar='STR',     type=str)
@click.option('--nosubdir',     help='Do not create a subdirectory for results',                 is_flag=True)
@click.option('--tick',         help='How often to print progress', metavar='KIMG',              type=click.FloatRange(min=0, min_open=True), default=50, show_default=True)
@click.option('--snap',         help='How often to save snapshots', metavar='TICKS',             type=click.IntRange(min=1), default=50, show_default=True)
@click.option('--dump',         help='How often to dump state', metavar='TICKS',                 type=click.IntRange(min=1), default=500, show_default=True)
@click.option('--seed',         help='Random seed  [default: random]', metavar='INT',            type=click.IntRange(min=0))
@click.option('--transfer',     help='Initialise weights from a network snapshot', metavar='PT', type=str)
@click.option('--resume',       help='Continue a run: its directory or a training-state file (an older state branches into a new run directory)', metavar='DIR|PT', type=str)
@click.option('--check_data',   help='Check every image at start-up: headers (fast), full (decode), none', type=click.Choice(['headers', 'full', 'none']), default='headers', show_default=True)
@click.option('--allow_data_change', help='Let --resume continue on other data than the run trained on', is_flag=True)
@click.option('--allow_world_size_change', help='Let --resume continue a run with dropout on another number of processes (its dropout draws then differ from an uninterrupted run)', is_flag=True)
@click.option('--wandb',        help='Weights & Biases logging',                                 type=click.Choice(['off', 'offline', 'online']), default='off', show_default=True)
@click.option('--tensorboard',  help='Write tensorboard event files', metavar='BOOL',            type=bool, default=False, show_default=True)
@click.option('--wandb_id',     help='Continue this wandb run (its id) instead of starting a new one', metavar='STR', type=str)
@click.option('--experiment_name', help='Run name: the run directory\'s suffix (like --desc) and the wandb run name', metavar='STR', type=str)
@click.option('-n', '--dry-run', help='Print training options and exit',                         is_flag=True)
def main(**kwargs):
    """Train a diffusion model on corrupted (or clean) images."""
    opts = dnnlib.EasyDict(kwargs)
    torch.multiprocessing.set_start_method('spawn', force=True)
    dist.init()
    with one_line_errors():
        train(opts, given_options())


def apply_preset(opts, given=()):
    """Set the preset's option values, except those given on the command line."""
    if opts.preset == 'original':
        if opts.precond not in AMBIENT_PRECONDS:
            raise ConfigError(f'--preset=original is the original\'s ambient network and loss; --precond={opts.precond} '
                              'is not ambient: use --precond=ambient')
        changed = {name: value for name, value in ORIGINAL_PRESET.items() if name not in given}
        opts.update(changed)
        dist.print0('--preset=original: ' + ', '.join(f'--{name}={value}' for name, value in changed.items()))


def _refuse_ignored_options(opts, given):
    refuse_ignored(given, [
        ('experiment_name', opts.wandb == 'off' and opts.nosubdir, 'it names the run directory and the wandb run, '
         'and --nosubdir turns the first off; drop it or add --wandb=offline or online'),
        ('wandb_id', opts.wandb == 'off', 'it names a wandb run to continue; add --wandb=offline or online'),
        ('gate', not opts.gated, '--gated=False builds plain convolutions; drop --gate or --gated=False'),
        ('mask_full_rgb', opts.corruption_pattern != 'dust', f'{opts.corruption_pattern} masks are shared by the '
         'channels already; it applies to --corruption_pattern=dust'),
        ('fp16', opts.fp16 is True and not torch.cuda.is_available(), 'float16 needs a CUDA device; drop --fp16, or '
         'use --fp16=bf16 (bfloat16 runs on CPUs too)'),
        ('augment_set', resolve_augment(opts) == 0, 'augmentation is off (--augment=0)'),
        ('desc', opts.nosubdir, 'it names the run subdirectory, which --nosubdir turns off'),
        ('label_dropout', not opts.cond, 'it drops class labels, and --cond=False trains without them; add --cond=True'),
        ('desc', opts.experiment_name is not None, '--experiment_name names the run directory already; give one of them'),
        ('bench', opts.deterministic, '--deterministic=True turns cuDNN benchmarking off'),
        ('mask_geometry', opts.corruption_pattern == 'dust', 'dust masks have no box geometry'),
    ])


def train(opts, given=()):
    """The command's work: options -> config -> run directory (locked) -> training loop. `given`: the options
    given on the command line, checked for ones that would be ignored."""
    world_size = dist.get_world_size()
    apply_preset(opts, given)
    _refuse_ignored_options(opts, given)

    # Resume: the same run with its own seed unless one is given.
    resume_state, state = None, None
    if opts.resume is not None:
        if opts.transfer is not None:
            raise ConfigError('--resume and --transfer cannot be combined: a resumed run already has its weights')
        resume_state = _resolve_resume(opts.resume)
        state = snapshots.load_state(resume_state)
        if opts.seed is not None and opts.seed != state['config']['seed']:
            raise ConfigError(f'--seed={opts.seed} differs from the run\'s seed {state["config"]["seed"]}: a resume keeps its '
                              'seed (every draw is keyed by it); drop --seed')
        opts.seed = state['config']['seed']
    elif opts.allow_data_change or opts.get('allow_world_size_change'):
        raise ConfigError(f'--{"allow_data_change" if opts.allow_data_change else "allow_world_size_change"} only '
                          'applies with --resume')
    if opts.seed is None:
        opts.seed = int(dist.broadcast(torch.tensor(secrets.randbelow(1 << 31), dtype=torch.int64)).item())

    check_output_dir(opts.outdir)
    c = build_config(opts, world_size)
    c.resume_state = resume_state
    dataset_obj = _check_dataset(c, opts)
    if opts.transfer is not None:
        training_loop.check_transfer(opts.transfer, c.network_kwargs, dataset_obj)  # before any directory is made
    if state is not None:
        _check_resume(state, resume_state, c, opts, world_size)
    del state  # the loop loads what it needs; a whole state (weights, Adam moments) must not stay in memory
    c.run_dir, in_place = _choose_run_dir(opts, dataset_obj.name, world_size, resume_state)
    _print_summary(c, opts, world_size, resume_state, in_place)
    if opts.dry_run:
        dist.print0('Dry run; exiting.')
        return

    with contextlib.ExitStack() as stack:
        logger = None
        # Rank 0 locks and prepares the run directory; every rank learns whether that failed, so none goes on alone.
        error = on_rank0(lambda: (stack.enter_context(dnnlib.util.directory_lock(c.run_dir)),
                                  _prepare_run_dir(c, in_place, opts.allow_data_change)))
        if error is not None:
            raise ConfigError(error)
        if dist.get_rank() == 0:
            logger = dnnlib.util.Logger(file_name=os.path.join(c.run_dir, 'log.txt'), file_mode='a', should_flush=True)
        try:
            training_loop.training_loop(**c)
        except Exception:
            if logger is not None:  # the terminal gets the error from click; log.txt records it too
                logger.write_file(traceback.format_exc())
            raise
        finally:
            if logger is not None:
                logger.close()


def _check_dataset(c, opts):
    """Open the dataset and check its images now (rank 0), for a clear message rather than one deep inside the
    loop; check that the network fits its resolution. Returns the dataset."""
    dataset_obj = dnnlib.util.construct_class_by_name(**c.dataset_kwargs)
    c.dataset_kwargs.resolution = dataset_obj.resolution
    if opts.cond and not dataset_obj.has_labels:
        raise click.ClickException('--cond=True requires labels specified in dataset.json')
    if opts.check_data != 'none':
        error = on_rank0(lambda: dataset_obj.check_images(full=opts.check_data == 'full', progress=True))
        if error is not None:
            raise ConfigError(error)
    check_architecture(c.network_kwargs, dataset_obj.resolution)
    _check_noise_annotations(c, opts, dataset_obj)
    return dataset_obj


def _check_noise_annotations(c, opts, dataset_obj):
    """The noisy-data losses need every noise level of their σ distribution covered by some image (checked now,
    not in the sampler); other losses train on annotated images as they are, which is said."""
    if opts.precond in NOISY_PRECONDS:
        loss_fn = dnnlib.util.construct_class_by_name(**c.loss_kwargs)
        sigma_first.check_coverage(dataset_obj.noise_levels(), sigma_first.admissibility_buffer(loss_fn.s_max),
                                   loss_fn.sigma_support(), describe=f' of {c.dataset_kwargs.path}')
        if not dataset_obj.has_annotations:
            dist.print0(f'Note: {c.dataset_kwargs.path} has no noise annotations (every image is clean): '
                        f'--precond={opts.precond} then trains like EDM, with the σ-first sampler')
    elif dataset_obj.has_annotations:
        config = dataset_obj.noise_config()
        dist.print0(f'Note: --precond={opts.precond} trains on the {config["num_noisy"]} noisy and '
                    f'{config["num_corrupted"]} corrupted images as if they were clean; --precond=ambient_noisy uses '
                    'their annotations')


def check_architecture(network_kwargs, resolution):
    """The levels of `channel_mult` must fit the resolution (each halves it, down to 1x1), and the attention
    resolutions must be levels of the network."""
    sr_factor = network_kwargs.get('sr_factor')
    if sr_factor and resolution % sr_factor:
        raise ConfigError(f'--sr_factor={sr_factor} does not divide the {resolution}x{resolution} images; use a divisor '
                          f'of {resolution}')
    levels = len(network_kwargs.channel_mult)
    if resolution % (1 << (levels - 1)) != 0:
        raise ConfigError(f'--cres has {levels} levels, which halve {resolution}x{resolution} images {levels - 1} times; '
                          f'use at most {int(math.log2(resolution & -resolution)) + 1} levels for this resolution')
    level_resolutions = [resolution >> level for level in range(levels)]
    wrong = [r for r in network_kwargs.get('attn_resolutions', []) if r not in level_resolutions]
    if wrong:
        raise ConfigError(f'--attn={",".join(map(str, network_kwargs.attn_resolutions))}: {wrong[0]} is not a resolution '
                          f'of the network (its levels are {",".join(map(str, level_resolutions))})')


def _check_resume(state, path, c, opts, world_size=1):
    """A resume must continue the run: not past its end, on the data it trained on (unless allowed), and exactly
    on another number of processes (refused where dropout draws come from each process's RNG, unless allowed)."""
    saved_world = len(state.get('rng') or [])
    process_rng = c.network_kwargs.get('dropout', 0) > 0 or c.network_kwargs.get('label_dropout', 0) > 0
    if saved_world and saved_world != world_size and process_rng and not opts.get('allow_world_size_change'):
        raise ConfigError(f'cannot resume {path} exactly: it trained on {saved_world} processes and its dropout draws '
                          f'come from each process\'s RNG, now {world_size}; resume on {saved_world} processes, or pass '
                          '--allow_world_size_change to continue with new dropout draws')
    if state['cur_nimg'] >= c.total_kimg * 1000:
        raise ConfigError(f'{path} is already at {state["cur_nimg"] / 1000:g} kimg, the end of --duration='
                          f'{opts.duration:g} Mimg; pass a longer --duration to train further')
    saved, now = state['config'].get('dataset_kwargs') or {}, c.dataset_kwargs
    same = lambda key, a, b: os.path.realpath(a) == os.path.realpath(b) if key == 'path' and a and b else a == b
    diffs = [f'{key} {saved.get(key)!r} in the state, {now.get(key)!r} now' for key in DATA_KEYS
             if not same(key, saved.get(key), now.get(key))]
    if diffs and not opts.allow_data_change:
        raise ConfigError(f'cannot resume: the run trained on other data ({"; ".join(diffs)}); pass the same --data, '
                          '--max_size, --xflip and --cond, or --allow_data_change to continue on the new data')


def _choose_run_dir(opts, dataset_name, world_size, resume_state):
    """(run directory, whether it continues a run in place). A resume from the run's newest state continues in
    place; one from an older state branches into a new run directory (EDM's behaviour), so nothing the run
    wrote after that state is overwritten or mixed with the branch."""
    if resume_state is not None:
        state_dir = os.path.dirname(os.path.abspath(resume_state))
        newest = snapshots.find_latest_state(state_dir)
        if newest is not None and os.path.samefile(newest, resume_state):
            return state_dir, True
        if opts.nosubdir and os.path.abspath(opts.outdir) == state_dir:
            raise ConfigError(f'--resume={resume_state} is older than the run\'s newest state {newest}; continuing in '
                              f'{state_dir} would overwrite what the run wrote after it. Resume from {newest}, or '
                              'branch from the older state into another directory (drop --nosubdir or change --outdir)')
        dist.print0(f'{resume_state} is older than the run\'s newest state ({newest}): branching into a new run directory')
    return (opts.outdir if opts.nosubdir else run_dir_name(opts.outdir, dataset_name, opts, world_size)), False


def _prepare_run_dir(c, in_place, data_changed):
    """Under the run directory's lock: refuse to start a new run over another one, remove the temporary files
    of killed writes, and record the options (a new run, or a resume on changed data)."""
    if not in_place and any(snapshots.SNAPSHOT_RE.match(f) for f in os.listdir(c.run_dir)):
        if snapshots.find_latest_state(c.run_dir) is None:
            raise ConfigError(f'{c.run_dir} already holds snapshots of a run stopped before its first state dump; '
                              'choose another --outdir, or delete that run')
        raise ConfigError(f'{c.run_dir} already holds a training run; continue it with --resume={c.run_dir} or '
                          'choose another --outdir')
    removed = dnnlib.util.remove_stale_temporaries(c.run_dir)
    if removed:
        print(f'Removed {len(removed)} temporary file(s) left by an interrupted write: {", ".join(removed)}')
    if not in_place or data_changed:
        with dnnlib.util.atomic_write(os.path.join(c.run_dir, 'training_options.json'), 'wt') as f:
            json.dump(c, f, indent=2)


def _print_summary(c, opts, world_size, resume_state, in_place):
    dist.print0()
    dist.print0('Training options:')
    dist.print0(json.dumps(c, indent=2))
    dist.print0()
    dist.print0(f'Output directory:        {c.run_dir}')
    dist.print0(f'Dataset path:            {c.dataset_kwargs.path}')
    dist.print0(f'Corruption:              {opts.corruption_pattern}, p={opts.corruption_probability}, '
                f'δ={c.dataset_kwargs.delta_probability}')
    if c.dataset_kwargs.get('noise_sigma') is not None:
        dist.print0(f'Synthetic noise:         σ_n={c.dataset_kwargs.noise_sigma} on all but '
                    f'{c.dataset_kwargs.clean_fraction:.1%} of the images')
    dist.print0(f'Network architecture:    {opts.arch}, precond {opts.precond}, gate {c.network_kwargs.gate}')
    dist.print0(f'Number of processes:     {world_size}')
    dist.print0(f'Batch size:              {c.batch_size} ({c.batch_gpu} per round)')
    dist.print0(f'Resume:                  {resume_state or "no"}{" (in place)" if in_place else ""}')
    dist.print0()


if __name__ == '__main__':
    main()
