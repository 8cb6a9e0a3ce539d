"""Samplers: EDM's deterministic/stochastic sampler and Ambient Diffusion's fixed-mask sampler.

Every sampler is a function of a denoiser D(x; σ) and integrates with a solver of `training.solvers`, by default
EDM's Algorithm 2 (Karras et al. 2022):
time steps t_i, optional churn (x̂ = x_i + sqrt(t̂² − t_i²)·S_noise·ε), an Euler step from x̂ and a Heun
correction. The trajectory is float64; the network receives the float64 state and computes in its own
precision (the preconditioners cast to float32 or fp16), and D is cast back to float64.

`ambient_sampler` is the fixed-mask sampler of Ambient Diffusion (Daras et al. 2023, Sec. 4). The caller draws
K masks per trajectory (`sample_masks`): mask 0 is the sampling mask, masks 1..K−1 the guidance masks, all
distributed like Ã. With D_j(x, σ) = net([M_j ⊙ x, M_j], σ)[:, :C] (`ambient_denoiser`), the step uses the
guided estimate

    D̃(x, σ) = D_0 − ∇_x [ w·½ Σ_{j≥1} ‖D_0 − D_j‖² + Σ_terms ℓ(x, σ, D_0) ],

i.e. reconstruction guidance corrects the denoised estimate, as in Ho et al. 2022 ("Video Diffusion
Models", Sec. 3.1), in both Heun stages. The gradient flows through D_0 and every D_j: it is the gradient of
the stated inconsistency. Through x' = x̂ + (t_{i+1} − t̂)(x̂ − D̃)/t̂ it moves x by −w·(t̂ − t_{i+1})/t̂ times
the gradient, a step proportional to the ODE step; the last step returns D̃ itself.
`extra_guidance` terms ℓ (e.g. DPS data consistency ζ‖y − 𝒜(D_0)‖) enter the same sum; the sampler takes
one gradient of the total.

Decisions against the original (giannisdaras/ambient-diffusion `eval.py`):
- the guidance loss is ½Σ_j‖D_0 − D_j‖², without the original's extra factor K, and corrects D instead of
  being added raw to the ODE step, so the push scales with the step. The original's guidance_scale λ
  moved x by about λ·K·∇ per step; ours moves it by w·r·∇ with r = (t̂ − t_{i+1})/t̂ (0.28 to 0.73 for
  EDM's 18 steps, 1 at the last), so w ≈ λ·K/r, i.e. 1.4 to 3.6 times λ·K;
- churn is EDM's: the Euler step starts from x̂ (the original started it from x_i);
- dynamic clipping is real per-sample thresholding (the original's percentile bug made it static);
- guidance masks are resampled as masks 1..K−1 (the original replaced batch elements 1: instead);
- masks come from per-seed generators, so a sample does not depend on its batch or process;
- no autograd graph is built when nothing needs a gradient (K = 1 or w = 0, and no extra terms): the cost
  is exactly the network evaluations, 2N − 1 for Heun and N for Euler. With guidance the K denoisers of a
  stage run as one network call of batch N·K.
"""

import inspect
import math
import numbers

import torch

import dnnlib
from torch_utils.ambient_diffusion import MaskCorruption
from torch_utils.misc import StackedRandomGenerator
from training.solvers import (ANCESTRAL, DDPM_VARIANCES, MULTISTEP, SOLVERS, _check_int, _integrate, _round_sigma,  # noqa: F401
                              _t_hat, ddim_step, dpmpp_2m_step, edm_time_steps, initial_state, sampling_time_steps,
                              solver_step)

GUIDANCE_UNITS = ('ours', 'original')
CLIPPING_MODES = ('none', 'static', 'dynamic')

#----------------------------------------------------------------------------
# Argument checks, in one place: the sampler bodies below read like EDM's Algorithm 2.

def _shape(value):
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def check_sampler_args(net=None, ambient=None, latents=None, masks=None, **options):
    """Check the arguments a sampler or denoiser was given; a ValueError names the argument and the fix.

    net/ambient: the network must be ambient (True) or clean (False). latents [N, C, H, W]; masks
    [N, K, C, H, W] or [N, C, H, W], matching the latents when both are given. options: any of solver,
    S_churn, S_min, S_max, S_noise, clipping, clip_percentile, guidance_scale, extra_guidance, resample_masks.
    """
    if ambient is not None and net is not None and bool(getattr(net, 'ambient', ambient)) != ambient:
        raise ValueError('edm_sampler got an ambient network (input [Ã ⊙ x, Ã]); use ambient_sampler for it' if not ambient
                         else 'ambient_sampler got a clean network (ambient=False); use edm_sampler for it')
    if latents is not None and (not isinstance(latents, torch.Tensor) or latents.ndim != 4):
        raise ValueError(f'latents must be a tensor [N, C, H, W], got {_shape(latents)}')
    if masks is not None:
        if not isinstance(masks, torch.Tensor) or masks.ndim not in (4, 5):
            raise ValueError(f'masks must be a tensor [N, K, C, H, W] (or [N, C, H, W] for K = 1), got {_shape(masks)}')
        if latents is not None and (masks.shape[0] != latents.shape[0] or masks.shape[-3:] != latents.shape[1:]):
            raise ValueError(f'masks {tuple(masks.shape)} do not match latents {tuple(latents.shape)}; pass masks '
                             f'[N, K, C, H, W] for latents [N, C, H, W]')
    o = dnnlib.EasyDict(options)
    if 'solver' in o and o.solver not in SOLVERS:
        raise ValueError(f'solver={o.solver!r} is unknown; pass one of {", ".join(SOLVERS)}')
    if o.get('solver') in ANCESTRAL + MULTISTEP and o.get('S_churn', 0) > 0:
        raise ValueError(f'solver={o.solver!r} takes no churn (ancestral solvers add their own noise, multistep ones '
                         'reuse the previous step); S_churn applies to the euler and heun solvers')
    if o.get('solver') == 'vdm' and net is not None and not hasattr(net, 'schedule'):
        raise ValueError('solver=\'vdm\' steps through a VDM network\'s own schedule γ(t); this network has none '
                         '(train one with --precond=vdm, or use heun, euler, dpmpp2m, ddim or ddpm)')
    if o.get('solver') in MULTISTEP and o.get('guidance_units') == 'original':
        raise ValueError(f'guidance_units=\'original\' converts the original\'s λ for an Euler/Heun step; '
                         f'solver={o.solver!r} combines two steps\' estimates: use guidance_units=\'ours\' or heun')
    if 'eta' in o and (not 0 <= o.eta <= 1 or (o.eta > 0 and o.get('solver') != 'ddim')):
        raise ValueError(f'eta={o.eta!r} is invalid; pass 0 <= eta <= 1 with solver="ddim" (0 otherwise)')
    if 'variance' in o and o.variance not in DDPM_VARIANCES:
        raise ValueError(f'variance={o.variance!r} is unknown; pass one of {", ".join(DDPM_VARIANCES)}')
    if 'S_churn' in o and (not o.S_churn >= 0 or not o.S_noise >= 0 or not o.S_min <= o.S_max):
        raise ValueError(f'S_churn={o.S_churn!r}, S_noise={o.S_noise!r}, S_min={o.S_min!r}, S_max={o.S_max!r} are '
                         f'invalid; pass S_churn >= 0, S_noise >= 0 and S_min <= S_max')
    if 'clipping' in o and o.clipping not in CLIPPING_MODES:
        raise ValueError(f'clipping={o.clipping!r} is unknown; pass one of {", ".join(CLIPPING_MODES)}')
    if o.get('clipping') == 'dynamic' and not 0 < o.clip_percentile <= 1:
        raise ValueError(f'clip_percentile={o.clip_percentile!r} is outside (0, 1]; pass e.g. 0.995')
    if 'guidance_units' in o and o.guidance_units not in GUIDANCE_UNITS:
        raise ValueError(f'guidance_units={o.guidance_units!r} is unknown; pass one of {", ".join(GUIDANCE_UNITS)}')
    if 'guidance_scale' in o and not callable(o.guidance_scale) and not o.guidance_scale >= 0:
        raise ValueError(f'guidance_scale={o.guidance_scale!r} is invalid; pass guidance_scale >= 0')
    if not all(callable(term) for term in o.get('extra_guidance', ())):
        raise ValueError('extra_guidance must be a sequence of callables term(x, sigma, D0) -> loss')
    if o.get('resample_masks') is not None and not callable(o.resample_masks):
        raise ValueError(f'resample_masks={o.resample_masks!r} is not callable; pass a function of the step index')

def compile_for_sampling(net):
    """`torch.compile` for long generations: inductor with frozen weights (folded into the graph as constants,
    convolution weights prepacked) for the gradient-free evaluations, a second graph where guidance needs
    gradients. The first calls compile (minutes on CPU); the compiled module keeps the network's attributes, so
    every sampler takes it. Outputs equal the eager network's up to float32 rounding."""
    return torch.compile(net, options={'freezing': True})


#----------------------------------------------------------------------------
# EDM's sampler for clean models.

@torch.no_grad()
def edm_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18, sigma_min=0.002,
                sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, solver='heun', eta=0.0,
                variance='beta_tilde'):
    """EDM's sampler (Karras et al. 2022, Algorithm 2) for a clean denoiser `net(x, σ, class_labels)`.

    latents: [N, C, H, W] standard normal; returns x_N [N, C, H, W] float64. S_churn = 0 gives the
    deterministic sampler (2N − 1 network evaluations with Heun, N with Euler). solver='ddim' (η = `eta`) or
    'ddpm' (`variance`) steps through the same time steps with `ddim_step` (N evaluations).
    """
    check_sampler_args(net, ambient=False, latents=latents, solver=solver, S_churn=S_churn, S_min=S_min, S_max=S_max,
                       S_noise=S_noise, eta=eta, variance=variance)
    t_steps = sampling_time_steps(net, num_steps, sigma_min, sigma_max, rho, solver, device=latents.device)

    def denoise(x, t):
        return net(x, t, class_labels).to(torch.float64)

    return _integrate(denoise, latents, t_steps, randn_like, _round_sigma(net), S_churn, S_min, S_max, S_noise,
                      solver, eta=eta, variance=variance)

#----------------------------------------------------------------------------
# Inpainting by replacement (Song et al. 2021, App. I.2) and RePaint (Lugmayr et al. 2022).

def replacement_sampler(denoise, latents, y, mask, t_steps, moves, randn_like=torch.randn_like, solver='heun',
                        eta=0.0, variance='beta_tilde'):
    """Inpainting by replacement along `moves` (`inverse.repaint_moves`) over `t_steps`: the known pixels (mask = 1, values
    y) are replaced by y + σ·z after every denoising step (y at σ = 0) and at the start; a move up adds
    sqrt(t_j² − t_i²)·z. `denoise(x, σ)`, any solver (`solver_step`). Returns x [N, C, H, W] float64."""
    y, mask = y.to(torch.float64), mask.to(torch.float64)
    known = lambda t: y + t * randn_like(y)  # noqa: E731
    x = mask * known(t_steps[0]) + (1 - mask) * initial_state(latents, t_steps, solver)
    for i, j in moves:
        if j == i + 1:
            x = solver_step(denoise, x, t_steps[i], t_steps[j], solver, eta, variance, randn_like)
            x = mask * (known(t_steps[j]) if j < len(t_steps) - 1 else y) + (1 - mask) * x
        else:
            x = x + (t_steps[j] ** 2 - t_steps[i] ** 2).sqrt() * randn_like(x)
    return x


#----------------------------------------------------------------------------
# Classifier-free guidance.

class _DenoiserWrapper(torch.nn.Module):
    """A denoiser around a network, with the network's sampling attributes, so that every sampler takes it."""

    _ATTRIBUTES = ('img_resolution', 'img_channels', 'label_dim', 'ambient', 'sigma_min', 'sigma_max', 'hidden_precond',
                   'discrete_sigmas', 'schedule')

    def __init__(self, net):
        super().__init__()
        self.net = net
        for name in self._ATTRIBUTES:
            if hasattr(net, name):
                setattr(self, name, getattr(net, name))
        self.training = bool(getattr(net, 'training', False))  # the network's mode, without changing it

    def round_sigma(self, sigma):
        return _round_sigma(self.net)(sigma)


class LowResConditioned(_DenoiserWrapper):
    """A super-resolution network (SR3, Saharia et al. 2022; `sr_factor`) with its condition fixed:
    D(x, σ) = net(x, σ, condition=c), c [N, C, H, W] the upsampled low-resolution images of the batch's samples.
    One network call per evaluation of the N samples: one mask per sample for ambient networks, and no
    classifier-free guidance (their batches would be N·K or 2N)."""

    def __init__(self, net, condition):
        super().__init__(net)
        if not getattr(net, 'sr_factor', None):
            raise ValueError('this network was not trained for super-resolution (no sr_factor); train one with '
                             'train.py --task=superres')
        self.condition = condition

    def forward(self, x, sigma, class_labels=None, **kwargs):
        if x.shape[0] != self.condition.shape[0]:
            raise ValueError(f'super-resolution sampling evaluates the network on {self.condition.shape[0]} samples at '
                             f'once, got {x.shape[0]}: use one mask per sample (--num_masks=1) and no --cfg_scale')
        return self.net(x, sigma, class_labels, condition=self.condition.to(x.device), **kwargs)


class ClassifierFreeGuidance(_DenoiserWrapper):
    """Classifier-free guidance (Ho & Salimans 2022) as a denoiser: D = D_u + w·(D_c − D_u), D_u = D(x, σ, 0).

    The unconditional estimate is the network with all-zero labels, which is what label dropout
    (`train.py --label_dropout`) trains it on; w = 1 is the conditional network, w = 0 the unconditional one.
    Both run as one network call of batch 2N. The wrapper has the network's sampling attributes, so every
    sampler and solver (and an ambient network's masks) use it unchanged.
    """

    def __init__(self, net, cfg_scale):
        super().__init__(net)
        if not getattr(net, 'label_dim', 0):
            raise ValueError('classifier-free guidance needs a class-conditional network (trained with --cond=True '
                             'and --label_dropout > 0); this one has no labels: drop --cfg_scale')
        if getattr(getattr(net, 'model', None), 'label_dropout', None) == 0:
            raise ValueError('classifier-free guidance needs a network trained with label dropout (train.py '
                             '--label_dropout > 0), whose all-zero labels mean "unconditional"; this one never saw them')
        if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, numbers.Real) or not 0 <= cfg_scale < math.inf:
            raise ValueError(f'cfg_scale={cfg_scale!r} is invalid; pass a guidance weight >= 0')
        self.cfg_scale = float(cfg_scale)

    def forward(self, x, sigma, class_labels=None):
        if class_labels is None:
            raise ValueError('classifier-free guidance needs class labels (a class per sample)')
        sigma = torch.as_tensor(sigma, device=x.device)
        sigma = sigma.reshape(-1).repeat(2) if sigma.numel() > 1 else sigma
        D = self.net(torch.cat([x, x]), sigma, torch.cat([class_labels, torch.zeros_like(class_labels)]))
        D_cond, D_uncond = D.chunk(2)
        return D_uncond + self.cfg_scale * (D_cond - D_uncond)


#----------------------------------------------------------------------------
# Ambient denoisers, clipping and guidance.

def ambient_denoiser(net, mask, class_labels=None):
    """D(x, σ) = net([M ⊙ x, M], σ)[:, :C] for an ambient network (Daras et al. 2023, Sec. 3).

    mask: [N, C, H, W] (D has x's shape) or [N, K, C, H, W] (K masks per sample, evaluated as one network call
    of batch N·K; D is [N, K, C, H, W]). Returns a function of x [N, C, H, W] and σ (scalar or [N]) that
    keeps autograd's current mode, so it serves both gradient-free sampling and guidance; D has x's dtype.
    """
    check_sampler_args(masks=mask)
    per_sample_masks = mask.ndim == 5
    masks = mask if per_sample_masks else mask[:, None]                                  # [N, K, C, H, W]
    n, k, c, h, w = masks.shape
    labels = class_labels
    if labels is not None and k > 1:
        labels = labels.repeat_interleave(k, dim=0)

    def denoise(x, sigma):
        if x.shape != (n, c, h, w):
            raise ValueError(f'x has shape {tuple(x.shape)} but the masks are for images {(n, c, h, w)}')
        m = masks.to(x.dtype)
        net_input = torch.cat([x[:, None] * m, m], dim=2).reshape(n * k, 2 * c, h, w)   # [N·K, 2C, H, W]
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.ndim > 0 and sigma.numel() == n and k > 1:
            sigma = sigma.reshape(n).repeat_interleave(k)
        D = net(net_input, sigma, labels)
        if D.shape[1] < c:
            raise ValueError(f'the network returns {D.shape[1]} channels; its denoised image needs {c}')
        D = D[:, :c].to(x.dtype).reshape(n, k, c, h, w)
        return D if per_sample_masks else D[:, 0]

    return denoise


def clip_denoised(D, clipping='none', clip_percentile=0.995):
    """Clip a denoised estimate D [..., C, H, W] per sample (every leading index is a sample).

    'none': D unchanged. 'static': clamp to [−1, 1]. 'dynamic': Imagen's dynamic thresholding (Saharia et al.
    2022, Sec. 2.3): s = max(quantile(|D|, clip_percentile), 1) over the sample's C·H·W values, then
    D = clamp(D, −s, s)/s.
    """
    check_sampler_args(clipping=clipping, clip_percentile=clip_percentile)
    if clipping == 'none':
        return D
    if clipping == 'static':
        return D.clamp(-1, 1)
    flat = D.reshape(*D.shape[:-3], -1)                                                  # [..., C·H·W]
    s = torch.quantile(flat.abs(), clip_percentile, dim=-1, keepdim=True).clamp_min(1)   # [..., 1]
    return (torch.maximum(torch.minimum(flat, s), -s) / s).reshape(D.shape)


def guided_ambient_denoiser(net, masks, class_labels=None, guidance_scale=0.0, clipping='none',
                            clip_percentile=0.995, extra_guidance=()):
    """The guided estimate D̃(x, σ) of the ambient sampler (see the module docstring), as a function.

    masks [N, K, C, H, W]: D_0 uses mask 0, reconstruction guidance masks 1..K−1 (used only when
    guidance_scale w > 0). Each D_j is clipped (`clip_denoised`) before it enters the guidance loss, so the
    gradient passes through the clipping. `extra_guidance`: callables `term(x, sigma, D0) -> loss` (a scalar,
    or per-sample losses [N] that are summed); x requires grad and D0 = clipped D_0 is attached to the graph,
    so a term differentiates through the network. Without w·(K > 1) and extra terms no gradient is taken
    and the function evaluates D_0 alone (one network call of batch N, under the caller's autograd mode).
    """
    extra_guidance = tuple(extra_guidance)
    check_sampler_args(masks=masks, guidance_scale=guidance_scale, extra_guidance=extra_guidance, clipping=clipping,
                       clip_percentile=clip_percentile)
    masks = masks if masks.ndim == 5 else masks[:, None]
    scale = guidance_scale if callable(guidance_scale) else (lambda sigma: guidance_scale)
    reconstruction = (callable(guidance_scale) or guidance_scale > 0) and masks.shape[1] > 1
    if not reconstruction and not extra_guidance:
        D_0 = ambient_denoiser(net, masks[:, 0], class_labels)
        return lambda x, sigma: clip_denoised(D_0(x, sigma), clipping, clip_percentile)
    D_all = ambient_denoiser(net, masks if reconstruction else masks[:, :1], class_labels)

    def denoise(x, sigma):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            D = clip_denoised(D_all(x, sigma), clipping, clip_percentile)               # [N, K, C, H, W]
            D0 = D[:, 0]
            loss = x.new_zeros([])
            if reconstruction:
                loss = loss + scale(sigma) * 0.5 * (D0[:, None] - D[:, 1:]).square().sum()
            for term in extra_guidance:
                value = term(x, sigma, D0)
                if not isinstance(value, torch.Tensor):
                    raise ValueError(f'guidance term {term!r} returned {type(value).__name__}; return a loss tensor')
                loss = loss + value.sum()
            grad = torch.autograd.grad(loss, x)[0] if loss.requires_grad else torch.zeros_like(x)
        return (D0 - grad).detach()

    return denoise


#----------------------------------------------------------------------------
# The fixed-mask ambient sampler.

@torch.no_grad()
def ambient_sampler(net, latents, masks, class_labels=None, randn_like=torch.randn_like, num_steps=18,
                    sigma_min=0.002, sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1,
                    solver='heun', guidance_scale=0.0, clipping='none', clip_percentile=0.995, resample_masks=None,
                    extra_guidance=(), guidance_units='ours', eta=0.0, variance='beta_tilde'):
    """Fixed-mask sampler of Ambient Diffusion (Daras et al. 2023, Sec. 4) on EDM's Algorithm 2.

    latents: [N, C, H, W] standard normal. masks: [N, K, C, H, W] (K ≥ 1; or [N, C, H, W] for K = 1), drawn
    once per trajectory by the caller (`sample_masks`); mask 0 is the sampling mask, 1..K−1 the guidance
    masks. guidance_scale: w of the reconstruction guidance (needs K > 1). clipping: 'none' | 'static' |
    'dynamic' (`clip_denoised`). resample_masks: optional callable(step_index) -> new guidance masks
    [N, K−1, C, H, W], called at the start of steps 1..N−1 when guidance is on (`masks` serves step 0).
    extra_guidance: terms term(x, sigma, D0) -> loss (see `guided_ambient_denoiser`).
    guidance_units: 'ours' (w as above) or 'original': guidance_scale is the original's λ, whose step moved x by
    −λ·∇[½K·Σ_j‖D_0 − D_j‖²] in each Heun stage; that is w = λ·K·σ/(t̂ − t_{i+1}) at the stage's noise level σ.
    The extra terms scale the same way, so that x moves by −∇ℓ per stage (the original's DPS step).
    solver='ddim' (`eta`) or 'ddpm' (`variance`): `ddim_step`s on the guided estimate D̃ (see `edm_sampler`).
    Returns x_N [N, C, H, W] float64.
    """
    check_sampler_args(net, ambient=True, latents=latents, masks=masks, solver=solver, S_churn=S_churn, S_min=S_min,
                       S_max=S_max, S_noise=S_noise, resample_masks=resample_masks, guidance_units=guidance_units,
                       eta=eta, variance=variance)
    masks = masks if masks.ndim == 5 else masks[:, None]
    n, k = masks.shape[:2]
    t_steps = sampling_time_steps(net, num_steps, sigma_min, sigma_max, rho, solver, device=latents.device)
    step = dict(size=None)  # t̂ − t_{i+1} of the current step, for the original's guidance units
    if guidance_units == 'original':
        to_ours = lambda sigma: sigma / step['size']  # a push of D by g moves x by g·(t̂ − t_{i+1})/σ
        extra_guidance = [lambda x, sigma, D0, term=term: term(x, sigma, D0) * to_ours(sigma) for term in extra_guidance]
        if guidance_scale > 0:
            original_scale = guidance_scale
            guidance_scale = lambda sigma: original_scale * k * to_ours(sigma)
    options = dict(class_labels=class_labels, guidance_scale=guidance_scale, clipping=clipping,
                   clip_percentile=clip_percentile, extra_guidance=extra_guidance)
    current = dict(denoise=guided_ambient_denoiser(net, masks, **options))
    guided = (callable(guidance_scale) or guidance_scale > 0) and k > 1

    def begin_step(i):
        step['size'] = _t_hat(t_steps[i], num_steps, S_churn, S_min, S_max, _round_sigma(net)) - t_steps[i + 1]
        if i == 0 or resample_masks is None or not guided:
            return
        guidance_masks = resample_masks(i)
        expected = (n, k - 1, *masks.shape[2:])
        if not isinstance(guidance_masks, torch.Tensor) or tuple(guidance_masks.shape) != expected:
            raise ValueError(f'resample_masks({i}) returned '
                             f'{tuple(guidance_masks.shape) if isinstance(guidance_masks, torch.Tensor) else guidance_masks!r}; '
                             f'return guidance masks of shape {expected}')
        new_masks = torch.cat([masks[:, :1], guidance_masks.to(masks.device, masks.dtype)], dim=1)
        current['denoise'] = guided_ambient_denoiser(net, new_masks, **options)

    return _integrate(lambda x, t: current['denoise'](x, t), latents, t_steps, randn_like, _round_sigma(net),
                      S_churn, S_min, S_max, S_noise, solver, begin_step=begin_step, eta=eta, variance=variance)

#----------------------------------------------------------------------------
# Per-seed masks and batch generation.

def sample_masks(corruption: MaskCorruption, shape, num_masks, generators):
    """K = num_masks masks distributed like Ã per sample: [N, K, C, H, W] float32.

    `generators`: a list of N torch.Generators (one per seed; sample i is drawn from generator i alone, masks
    0..K−1 in order, so it does not depend on its batch or process), a single generator, or None.
    """
    if not isinstance(corruption, MaskCorruption):
        raise ValueError(f'corruption={corruption!r} is not a MaskCorruption; build one with '
                         f'torch_utils.ambient_diffusion.get_mask_corruption(...)')
    num_masks = _check_int('num_masks', num_masks, 1)
    return torch.stack([corruption.sample_sampling_mask(shape, generators) for _ in range(num_masks)], dim=1)


def _net_device(net):
    if isinstance(net, torch.nn.Module):
        for tensor in list(net.parameters()) + list(net.buffers()):
            return tensor.device
    return torch.device('cpu')


def _class_labels(net, class_labels, rnd, n, device):
    """EDM's generate.py: a random class per seed for conditional nets (always drawn, so the random
    stream does not depend on the option), overridden by a class index or given one-hot labels."""
    label_dim = getattr(net, 'label_dim', 0)
    if not label_dim:
        if class_labels is not None:
            raise ValueError(f'class_labels={class_labels!r} given for an unconditional network (label_dim=0); '
                             f'pass class_labels=None')
        return None
    labels = torch.eye(label_dim, device=device)[rnd.randint(label_dim, size=[n], device=device)]
    if class_labels is None:
        return labels
    if isinstance(class_labels, numbers.Integral) and not isinstance(class_labels, bool):
        if not 0 <= class_labels < label_dim:
            raise ValueError(f'class_labels={class_labels!r} is outside 0..{label_dim - 1}; pass a valid class index')
        return torch.nn.functional.one_hot(torch.full([n], int(class_labels), device=device), label_dim).float()
    class_labels = torch.as_tensor(class_labels, device=device, dtype=torch.float32)
    if tuple(class_labels.shape) != (n, label_dim):
        raise ValueError(f'class_labels has shape {tuple(class_labels.shape)}; pass a class index or one-hot '
                         f'labels [{n}, {label_dim}]')
    return class_labels


def generate_batch(net, seeds, corruption=None, class_labels=None, device=None, num_masks=1,
                   resample_guidance_masks=False, **sampler_kwargs):
    """Images [N, C, H, W] float32 in [−1, 1] for the given seeds, independent of batch and process.

    A `StackedRandomGenerator` over `seeds` draws, per seed and in this order: the latents, a class label
    (conditional nets), the K = num_masks masks (ambient nets, from `corruption`), then the churn noise and
    (with `resample_guidance_masks`) fresh guidance masks at each step. Ambient networks (`net.ambient`)
    go to `ambient_sampler`, clean ones to `edm_sampler`; `sampler_kwargs` are passed on. class_labels: None
    (a random class per seed for conditional nets), a class index, or one-hot labels [N, label_dim].
    device=None: the network's device. The network must be in eval mode (dropout would draw from torch's
    global generator).
    """
    if isinstance(net, torch.nn.Module) and net.training:
        raise ValueError('the network is in training mode (dropout active); call net.eval() before sampling')
    device = torch.device(device) if device is not None else _net_device(net)
    rnd = StackedRandomGenerator(device, seeds)
    n = len(rnd.seeds)
    ambient = bool(getattr(net, 'ambient', False))
    channels = net.img_channels // 2 if ambient else net.img_channels
    shape = [n, channels, net.img_resolution, net.img_resolution]
    latents = rnd.randn(shape, device=device)
    labels = _class_labels(net, class_labels, rnd, n, device)

    if not ambient:
        if corruption is not None or num_masks != 1 or resample_guidance_masks:
            raise ValueError('corruption, num_masks and resample_guidance_masks apply to ambient networks only; '
                             'leave them unset for a clean network')
        unknown = sorted(set(sampler_kwargs) - set(inspect.signature(edm_sampler).parameters))
        if unknown:
            raise ValueError(f'edm_sampler (clean network) has no option(s) {unknown}; they apply to ambient '
                             f'networks only')
        images = edm_sampler(net, latents, labels, randn_like=rnd.randn_like, **sampler_kwargs)
    else:
        if corruption is None:
            raise ValueError('an ambient network needs corruption=MaskCorruption(...) to draw its sampling masks')
        masks = sample_masks(corruption, shape, num_masks, rnd.generators)
        if resample_guidance_masks:
            if 'resample_masks' in sampler_kwargs:
                raise ValueError('pass either resample_guidance_masks=True or resample_masks, not both')
            sampler_kwargs['resample_masks'] = lambda i: sample_masks(corruption, shape, num_masks - 1,
                                                                      rnd.generators)
        images = ambient_sampler(net, latents, masks, labels, randn_like=rnd.randn_like, **sampler_kwargs)
    return _finite_images(images, seeds)

def _finite_images(images, seeds):
    """The sampler's output as float32 images in [−1, 1]; a non-finite sample is an error, not a black image."""
    bad = [s for s, ok in zip(list(seeds), torch.isfinite(images).flatten(1).all(1).tolist()) if not ok]
    if bad:
        raise ValueError(f'the sampler diverged (non-finite values) for seed(s) {bad[:5]}; lower the guidance '
                         '(--guidance_scale, --dps_scale) or raise --steps')
    return images.clamp(-1, 1).to(torch.float32)


def denoising_error(net, images, seeds, sigmas, corruption=None, class_labels=None):
    """Mean squared error of D(x0 + σn; σ) against x0 at each σ, split into the pixels the network sees and, for
    ambient networks, those it cannot see: how far down in σ a network predicts hidden pixels (pick the
    sampler's sigma_min above where the hidden error rises).

    images: clean x0 [N, C, H, W] in [−1, 1]; seeds: N seeds, whose `StackedRandomGenerator` draws the sampling
    mask M (from `corruption`, ambient networks only) and then one noise image per σ, so the result does not
    depend on the batch. class_labels as for `generate_batch`. Returns {'visible': [S], 'hidden': [S]}: per σ
    the sums of squared errors over the N images on pixels with M = 1 and M = 0, and 'num_visible' /
    'num_hidden' (pixel counts), so that batches can be added up; clean networks see every pixel.
    """
    if isinstance(net, torch.nn.Module) and net.training:
        raise ValueError('the network is in training mode (dropout active); call net.eval() first')
    sigmas = [float(s) for s in sigmas]
    if not sigmas or min(sigmas) <= 0:
        raise ValueError(f'sigmas={sigmas}: pass one or more positive noise levels')
    x0 = images.to(torch.float32)
    rnd = StackedRandomGenerator(x0.device, seeds)
    if len(rnd.seeds) != x0.shape[0]:
        raise ValueError(f'{len(rnd.seeds)} seeds for {x0.shape[0]} images; pass one seed per image')
    labels = _class_labels(net, class_labels, rnd, x0.shape[0], x0.device)
    if getattr(net, 'ambient', False):
        if corruption is None:
            raise ValueError('an ambient network needs corruption=MaskCorruption(...) to draw its masks')
        mask = sample_masks(corruption, x0.shape, 1, rnd.generators)[:, 0].to(x0.device)
        denoise = ambient_denoiser(net, mask, labels)
    else:
        mask = torch.ones_like(x0)
        denoise = lambda x, sigma: net(x, sigma, labels).to(torch.float32)  # noqa: E731
    visible, hidden = [], []
    with torch.no_grad():
        for sigma in sigmas:
            noise = rnd.randn(x0.shape, device=x0.device)
            error = (denoise(x0 + sigma * noise, torch.full([x0.shape[0]], sigma, device=x0.device)) - x0).square()
            visible.append(float((error * mask).sum()))
            hidden.append(float((error * (1 - mask)).sum()))
    return dict(visible=visible, hidden=hidden, num_visible=float(mask.sum()), num_hidden=float((1 - mask).sum()))
