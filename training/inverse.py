"""Inverse problems with a trained denoiser: measurements and Diffusion Posterior Sampling (Chung et al. 2023).

Measurements y = 𝒜(x0) take their operator parameters (masks, kernels, Φ) from per-seed generators of their
own (`measurement_generators`), so a measurement depends on its seed alone. DPS adds the data-consistency term
ζ‖y − 𝒜(D0)‖ (`dps_term`) to the guided ambient sampler's `extra_guidance`, for ambient networks (their fixed
sampling masks) and clean ones alike (`_CleanAsAmbient`, an all-ones mask).

Inpainting also by replacement (`method='replace'`; Song et al. 2021, "Score-Based Generative Modeling through
SDEs", App. I.2): after every step to σ', the known pixels are set to the measurement noised to that level,
m ⊙ (y + σ'·z) + (1 − m) ⊙ x (y itself at σ' = 0); and RePaint (`method='repaint'`; Lugmayr et al. 2022), which
also goes back up `jump_length` levels by forward diffusion, `jump_n_sample` − 1 times per jump point, so the
unknown region harmonises with the known one (`repaint_moves`).

Super-resolution with an SR3 network (`superres_batch`; Saharia et al. 2022): the low-resolution image, upsampled
bicubically, is the network's condition; sampling is `generate_batch` on `samplers.LowResConditioned`.
"""

import math
import numbers

import torch

from torch_utils.ambient_diffusion import upsample_bicubic
from torch_utils.misc import StackedRandomGenerator, seeded_generator
from training.samplers import (LowResConditioned, _class_labels, _finite_images, _net_device, _round_sigma,
                               ambient_sampler, check_sampler_args, generate_batch, guided_ambient_denoiser,
                               replacement_sampler, sample_masks, sampling_time_steps)

DPS_NORMS = ('per_sample', 'batch')
_MEASUREMENT_STREAM = 1     # spawn key that separates the measurement stream from the sampler's


def measurement_generators(seeds, device=None):
    """Per-seed CPU generators of the measurement operator's parameters (masks, kernels, Φ).

    Seed s gets `seeded_generator(s, spawn_key=(1,))`: a stream of its own, not the sampler's
    (`StackedRandomGenerator` seeds with s itself; torch's CPU generator keeps only 32 bits of a seed, so an
    offset such as 2**32 + s would give the same stream). A
    measurement depends on its seed alone, not on its batch, process or device. `device`: where the generators
    live (default CPU, so that the parameters are the same on every device).
    """
    return [seeded_generator(s, spawn_key=(_MEASUREMENT_STREAM,), device=device) for s in seeds]


def measure(operator, x0, seeds):
    """(y, params) = (𝒜(x0), params) with params drawn from `measurement_generators(seeds)`, on x0's device."""
    if x0.shape[0] != len(seeds):
        raise ValueError(f'{len(seeds)} seeds for {x0.shape[0]} images; pass one seed per image')
    params = operator.sample_params(x0.shape, measurement_generators(seeds), device=x0.device)
    return operator.apply(x0, params), params


def dps_term(operator, y, params, zeta, norm='per_sample'):
    """DPS data-consistency term for `extra_guidance`: term(x, sigma, D0) -> loss.

    norm='per_sample': ζ‖y_i − 𝒜(D0_i)‖ per sample, [N] (the samples do not interact).
    norm='batch': ζ·√N·‖y − 𝒜(D0)‖_F over the whole batch, a scalar: the original's batch-global norm
    (giannisdaras/ambient-diffusion `solve_inverse_problems.py`), which couples the samples. Its gradient for
    sample i is ζ·√N·J_iᵀr_i/‖r‖_F; the factor √N makes it equal to the per-sample gradient ζ·J_iᵀr_i/‖r_i‖
    when every residual has the same norm (‖r‖_F = √N‖r_i‖). The original's unscaled ζ_orig is therefore
    ζ = ζ_orig/√N here.
    The sampler subtracts the gradient from the denoised estimate, so x moves by ζ·(t̂ − t_{i+1})/t̂ times the
    gradient per Heun stage (see the module docstring), where the original added ζ_orig times it to the
    ODE step: to reproduce a step of the original, divide its ζ by that ratio as well. Norms are not squared.
    """
    if norm not in DPS_NORMS:
        raise ValueError(f'norm={norm!r} is unknown; pass one of {", ".join(DPS_NORMS)}')
    if isinstance(zeta, bool) or not isinstance(zeta, numbers.Real) or not 0 <= zeta < math.inf:
        raise ValueError(f'zeta={zeta!r} is invalid; pass a DPS scale >= 0')

    def term(x, sigma, D0):
        residual = (y.to(D0.device, D0.dtype) - operator.apply(D0, params)).flatten(1)    # [N, m]
        if residual.shape[0] != D0.shape[0]:
            raise ValueError(f'the measurements hold {y.shape[0]} samples but the batch has {D0.shape[0]}')
        if norm == 'per_sample':
            return zeta * residual.norm(dim=1)                                           # [N]
        return zeta * math.sqrt(residual.shape[0]) * residual.norm()

    return term


INPAINT_METHODS = ('dps', 'replace', 'repaint')


def repaint_moves(num_steps, jump_length=1, jump_n_sample=1):
    """The moves (i, j) over a grid t_0 > ... > t_N = 0 of RePaint's jump schedule (Lugmayr et al. 2022, App. B):
    j = i + 1 is a denoising step, j = i − 1 a step back up. Counting τ = N − i down from N, after reaching
    τ ∈ {L, 2L, ...} (τ ≤ N − L, L = jump_length) the walk goes back up L levels, jump_n_sample − 1 times per τ.
    jump_n_sample = 1 gives the plain descent 0 → N (replacement)."""
    if jump_length < 1 or jump_n_sample < 1:
        raise ValueError(f'jump_length={jump_length}, jump_n_sample={jump_n_sample}: both must be >= 1')
    jumps = {tau: jump_n_sample - 1 for tau in range(jump_length, num_steps - jump_length + 1, jump_length)}
    if jump_n_sample > 1 and not jumps:
        raise ValueError(f'jump_length={jump_length} leaves no jump point in {num_steps} steps (RePaint jumps back from '
                         f'L, 2L, ... <= steps − L): use jump_length <= {num_steps // 2} or more steps')
    tau, moves = num_steps, []
    while tau > 0:
        moves.append((num_steps - tau, num_steps - tau + 1))
        tau -= 1
        if jumps.get(tau, 0) > 0:
            jumps[tau] -= 1
            for _ in range(jump_length):
                moves.append((num_steps - tau, num_steps - tau - 1))
                tau += 1
    return moves


class _CleanAsAmbient(torch.nn.Module):
    """A clean denoiser seen as an ambient one: input [M ⊙ x, M], mask channels dropped.

    With all-ones masks it is exactly the clean network, so clean and ambient models share one guided
    integration loop (`ambient_sampler`).
    """

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.ambient = True
        self.img_channels = 2 * net.img_channels
        for name in ('img_resolution', 'label_dim', 'sigma_min', 'sigma_max', 'discrete_sigmas'):
            if hasattr(net, name):
                setattr(self, name, getattr(net, name))

    def round_sigma(self, sigma):
        return _round_sigma(self.net)(sigma)

    def forward(self, x, sigma, class_labels=None):
        return self.net(x[:, :self.net.img_channels], sigma, class_labels)


def solve_batch(net, operator, y, params, seeds, zeta, corruption=None, norm='per_sample', device=None,
                num_masks=1, class_labels=None, method='dps', jump_length=1, jump_n_sample=1, **sampler_kwargs):
    """DPS reconstructions [N, C, H, W] float32 in [−1, 1] of measurements y = 𝒜(x0) with parameters `params`.

    The sampler's random stream is `generate_batch`'s (per seed: latents, class label, masks, churn), so with
    ζ = 0 the result is the unconditional sample of the same seed. Ambient networks use `ambient_sampler` with
    K = num_masks masks from `corruption` (the sampling masks, independent of the operator); clean networks run
    in the same loop with an all-ones mask (`corruption` must be None). The DPS term (`dps_term`, ζ > 0) joins
    any `extra_guidance` in sampler_kwargs. With norm='per_sample' a sample does not depend on its batch.
    device=None: the network's device. method='replace' or 'repaint' (inpainting operators only, ζ = 0):
    `replacement_sampler` on the same guided estimate D̃ and time steps (`jump_length`, `jump_n_sample`: RePaint's).
    """
    if method not in INPAINT_METHODS:
        raise ValueError(f'method={method!r} is unknown; pass one of {", ".join(INPAINT_METHODS)}')
    if method != 'dps' and (not hasattr(operator, 'corruption') or zeta != 0):
        raise ValueError(f'method={method!r} replaces known pixels: it needs an inpainting operator (dust, box_masking) '
                         'and no DPS term (zeta = 0)')
    if method != 'repaint' and (jump_length, jump_n_sample) != (1, 1):
        raise ValueError('jump_length and jump_n_sample are RePaint\'s; pass method="repaint"')
    if isinstance(net, torch.nn.Module) and net.training:
        raise ValueError('the network is in training mode (dropout active); call net.eval() before sampling')
    device = torch.device(device) if device is not None else _net_device(net)
    rnd = StackedRandomGenerator(device, seeds)
    n = len(rnd.seeds)
    if y.shape[0] != n:
        raise ValueError(f'y holds {y.shape[0]} measurements for {n} seeds; pass one seed per measurement')
    ambient = bool(getattr(net, 'ambient', False))
    channels = net.img_channels // 2 if ambient else net.img_channels
    shape = [n, channels, net.img_resolution, net.img_resolution]
    latents = rnd.randn(shape, device=device)
    labels = _class_labels(net, class_labels, rnd, n, device)
    if ambient:
        if corruption is None:
            raise ValueError('an ambient network needs corruption=MaskCorruption(...) to draw its sampling masks')
        masks = sample_masks(corruption, shape, num_masks, rnd.generators).to(device)
    else:
        if corruption is not None or num_masks != 1:
            raise ValueError('corruption and num_masks apply to ambient networks only; leave them unset for a '
                             'clean network')
        net = _CleanAsAmbient(net)
        masks = torch.ones([n, 1, *shape[1:]], device=device)
    params = params.to(device) if isinstance(params, torch.Tensor) else params
    guidance = list(sampler_kwargs.pop('extra_guidance', ()))
    if sampler_kwargs.get('guidance_units') == 'original' and norm == 'batch':
        zeta = zeta / math.sqrt(n)  # the original's ζ·‖y − 𝒜(D0)‖_F, without our √N
    term = dps_term(operator, y.to(device), params, zeta, norm)                          # validates ζ and norm
    if zeta > 0:  # ζ = 0 adds nothing; skipping it also skips the gradient's backward pass.
        guidance.append(term)
    if method == 'dps':
        images = ambient_sampler(net, latents, masks, labels, randn_like=rnd.randn_like, extra_guidance=guidance,
                                 **sampler_kwargs)
    else:
        images = _replace(net, latents, masks, labels, y.to(device), operator.apply(torch.ones_like(y), params).to(device),
                          rnd, jump_length, jump_n_sample if method == 'repaint' else 1, **sampler_kwargs)
    return _finite_images(images, seeds)


@torch.no_grad()
def _replace(net, latents, masks, labels, y, known, rnd, jump_length, jump_n_sample, num_steps=18, sigma_min=0.002,
             sigma_max=80, rho=7, solver='heun', eta=0.0, variance='beta_tilde', guidance_scale=0.0, clipping='none',
             clip_percentile=0.995, guidance_units='ours', S_churn=0, S_min=0, S_max=float('inf'), S_noise=1):
    """`samplers.replacement_sampler` with the ambient sampler's options (no churn; guidance in ours units)."""
    check_sampler_args(net, ambient=True, latents=latents, masks=masks, solver=solver, S_churn=S_churn, S_min=S_min,
                       S_max=S_max, S_noise=S_noise, eta=eta, variance=variance, guidance_units=guidance_units)
    if S_churn > 0 or guidance_units != 'ours':
        raise ValueError('replacement sampling takes no churn (S_churn = 0) and guidance in ours units')
    t_steps = sampling_time_steps(net, num_steps, sigma_min, sigma_max, rho, solver, device=latents.device)
    denoise = guided_ambient_denoiser(net, masks, labels, guidance_scale, clipping, clip_percentile)
    moves = repaint_moves(len(t_steps) - 1, jump_length, jump_n_sample)
    return replacement_sampler(lambda x, t: denoise(x, t).to(torch.float64), latents, y, known, t_steps, moves,
                               rnd.randn_like, solver, eta, variance)


def superres_batch(net, lowres, seeds, corruption=None, device=None, **sampler_kwargs):
    """SR3 samples [N, C, H, W] float32 in [−1, 1] for low-resolution images `lowres` [N, C, H/f, W/f] (f =
    net.sr_factor), with generate_batch's per-seed randomness (a sample depends on its seed and image alone)."""
    factor = getattr(net, 'sr_factor', None)
    if not factor:
        raise ValueError('this network was not trained for super-resolution (no sr_factor); train one with '
                         'train.py --task=superres')
    expected = (net.img_resolution // factor,) * 2
    if tuple(lowres.shape[-2:]) != expected:
        raise ValueError(f'low-resolution images are {tuple(lowres.shape[-2:])}, the network super-resolves {expected} '
                         f'by {factor}')
    device = torch.device(device) if device is not None else _net_device(net)
    condition = upsample_bicubic(lowres.to(device, torch.float32), factor)
    return generate_batch(LowResConditioned(net, condition), seeds, corruption=corruption, device=device,
                          **sampler_kwargs)
