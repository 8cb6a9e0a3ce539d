"""Solvers: the time grids and the integration loop every sampler shares (`training.samplers` builds the samplers).

A solver integrates from latents with a denoiser `denoise(x, t) -> D` (float64) over a grid of noise levels t_0 >
... > t_N in σ-form (x = x0 + σ·n):
- 'euler', 'heun': EDM's Algorithm 2 (Karras et al. 2022), with churn; Heun costs 2N − 1 evaluations.
- 'ddim' (η), 'ddpm' (β̃ or β): `ddim_step`, one evaluation per step; 'vdm': VDM's ancestral step on a VDM
  network's own schedule (`vdm.sampling_sigmas`), the same posterior step between its levels.
- 'dpmpp2m': DPM-Solver++(2M) (Lu et al. 2022), a second-order multistep solver of the same ODE as Euler and
  Heun at one evaluation per step (`dpmpp_2m_step`).
"""

import math
import numbers

import torch

from training import vdm

SOLVERS = ('euler', 'heun', 'ddim', 'ddpm', 'vdm', 'dpmpp2m')
ANCESTRAL = ('ddim', 'ddpm', 'vdm')  # one network evaluation per step (`ddim_step`), no churn
MULTISTEP = ('dpmpp2m',)  # one evaluation per step, reusing the previous step's D; no churn
DDPM_VARIANCES = ('beta_tilde', 'beta')


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f'{name}={value!r} is invalid; pass an integer >= {minimum}')
    return int(value)



#----------------------------------------------------------------------------
# Time steps and the shared integration loop.


def edm_time_steps(num_steps, sigma_min, sigma_max, rho, net=None, dtype=torch.float64, device=None):
    """EDM time steps (Karras et al. 2022, Eq. 5) with t_N = 0 appended: [num_steps + 1] tensor.

    t_i = (σmax^(1/ρ) + i/(N−1)·(σmin^(1/ρ) − σmax^(1/ρ)))^ρ, i = 0..N−1 (N = 1 gives t_0 = σmax). With a
    `net`, σmin and σmax are first clamped to [net.sigma_min, net.sigma_max] and the steps are rounded with
    `net.round_sigma`; a net without these attributes accepts every σ > 0 unrounded. `device=None`: CPU.
    """
    num_steps = _check_int('num_steps', num_steps, 1)
    if net is not None:
        sigma_min = max(sigma_min, getattr(net, 'sigma_min', 0))
        sigma_max = min(sigma_max, getattr(net, 'sigma_max', math.inf))
    if not 0 < sigma_min <= sigma_max < math.inf:
        raise ValueError(f'sigma_min={sigma_min!r}, sigma_max={sigma_max!r} (after clamping to the network\'s '
                         f'range) are invalid; pass 0 < sigma_min <= sigma_max < inf')
    if not rho > 0:
        raise ValueError(f'rho={rho!r} is invalid; pass rho > 0 (EDM uses 7)')
    step_indices = torch.arange(num_steps, dtype=dtype, device=device)
    ramp = step_indices / max(num_steps - 1, 1)
    t_steps = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    if net is not None and hasattr(net, 'round_sigma'):
        t_steps = torch.as_tensor(net.round_sigma(t_steps)).to(dtype)
    return torch.cat([t_steps, torch.zeros_like(t_steps[:1])])


def sampling_time_steps(net, num_steps, sigma_min, sigma_max, rho, solver, device=None):
    """The time steps of a sampler run (with t_N = 0): EDM's (`edm_time_steps`), except for DDIM/DDPM steps on a
    discrete network (`net.discrete_sigmas`, e.g. DDPMPrecond): DDIM's uniformly skipped grid of `num_steps` of
    its T levels, from the highest to the lowest (Song et al. 2021, Sec. 4.2)."""
    if solver == 'vdm':
        return vdm.sampling_sigmas(net.schedule, _check_int('num_steps', num_steps, 1), device=device)
    levels = getattr(net, 'discrete_sigmas', None)
    if solver not in ('ddim', 'ddpm') or levels is None:
        return edm_time_steps(num_steps, sigma_min, sigma_max, rho, net=net, device=device)
    num_steps = _check_int('num_steps', num_steps, 1)
    if num_steps > len(levels):
        raise ValueError(f'num_steps={num_steps} is more than the network\'s T = {len(levels)} levels; pass at most {len(levels)}')
    index = torch.linspace(len(levels) - 1, 0, num_steps, dtype=torch.float64).round().long()
    t_steps = levels.detach().to('cpu', torch.float64)[index].to(device)
    return torch.cat([t_steps, torch.zeros_like(t_steps[:1])])


def _t_hat(t_cur, num_steps, S_churn, S_min, S_max, round_sigma):
    """t̂ = t_i·(1 + γ), γ = min(S_churn/N, √2 − 1) where S_min ≤ t_i ≤ S_max (EDM's churn), rounded."""
    gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
    return torch.as_tensor(round_sigma(t_cur + gamma * t_cur), dtype=torch.float64, device=t_cur.device)


def ddim_step(x_cur, D, t_cur, t_next, eta=0.0, variance='beta_tilde', randn_like=torch.randn_like):
    """One DDIM(η) or DDPM step in σ-form (Song et al. 2021 "DDIM", Eq. 12; Ho et al. 2020), from x at t_cur to t_next.

    With x_σ = x_t/sqrt(ᾱ_t) and σ² = (1 − ᾱ)/ᾱ, DDIM's x_prev = sqrt(ᾱ')·x̂0 + sqrt(1 − ᾱ' − σ_η²)·ε̂ + σ_η·z
    divided by sqrt(ᾱ') is x' = D + sqrt(t'² − s²)·ε̂ + s·z with ε̂ = (x − D)/t and s = σ_η/sqrt(ᾱ')
    = η·t'·sqrt(t² − t'²)/t. η = 0: x' = D + (t'/t)(x − D), EDM's Euler step. η = 1: the DDPM posterior
    q(x' | x, x̂0) with variance β̃, mean D + (t'²/t²)(x − D). variance='beta' (DDPM's other choice, η ignored):
    the same mean with variance β = 1 − ᾱ/ᾱ', i.e. (t² − t'²)(1 + t'²)/(1 + t²) in σ-form. No noise at t' = 0.
    """
    if t_next == 0:
        return D
    if variance == 'beta':
        std = ((t_cur ** 2 - t_next ** 2) * (1 + t_next ** 2) / (1 + t_cur ** 2)).sqrt()
        return D + (t_next ** 2 / t_cur ** 2) * (x_cur - D) + std * randn_like(x_cur)
    s = eta * t_next * (t_cur ** 2 - t_next ** 2).sqrt() / t_cur
    x_next = D + (t_next ** 2 - s ** 2).sqrt() * (x_cur - D) / t_cur
    return x_next + s * randn_like(x_cur) if eta > 0 else x_next


def dpmpp_2m_step(x_cur, D, D_prev, t_prev, t_cur, t_next):
    """One DPM-Solver++(2M) step (Lu et al. 2022, "DPM-Solver++", Alg. 2) in σ-form, where α = 1 and λ = −log σ.

    With h = log(t_cur/t_next) and r = log(t_prev/t_cur)/h, D̃ = (1 + 1/(2r))·D − (1/(2r))·D_prev (D alone on the
    first step, D_prev None), and x' = (t_next/t_cur)·x + (1 − t_next/t_cur)·D̃: the paper's
    x_t = (σ_t/σ_s)·x_s − α_t(e^{−h} − 1)·D̃ with α = 1. The step to t_next = 0 returns D (first order there).
    Grids rounded to a discrete network's levels can repeat a level: a step of h = 0 leaves x as it is, and the
    step after it is first order (its previous step has no length to extrapolate over).
    """
    if t_next == 0:
        return D
    if t_next == t_cur:
        return x_cur
    D_tilde = D
    if D_prev is not None and t_prev > t_cur:
        r = torch.log(t_prev / t_cur) / torch.log(t_cur / t_next)
        D_tilde = (1 + 1 / (2 * r)) * D - (1 / (2 * r)) * D_prev
    return (t_next / t_cur) * x_cur + (1 - t_next / t_cur) * D_tilde


def solver_step(denoise, x_cur, t_cur, t_next, solver='heun', eta=0.0, variance='beta_tilde',
                randn_like=torch.randn_like):
    """One step from t_cur to t_next < t_cur without churn: Euler or Heun (EDM Algorithm 2; no correction at
    t_next = 0), or `ddim_step` (solver 'ddim' with η = `eta`, 'ddpm' with `variance`). A multistep solver
    needs the previous step and is refused here."""
    if solver in MULTISTEP:
        raise ValueError(f'solver={solver!r} is a multistep solver: it needs the previous step, which replacement and '
                         'RePaint moves break; use heun, euler, ddim or ddpm with them')
    D = denoise(x_cur, t_cur)
    if solver in ANCESTRAL:
        return ddim_step(x_cur, D, t_cur, t_next, eta if solver == 'ddim' else 1.0,
                         variance if solver == 'ddpm' else 'beta_tilde', randn_like)
    d_cur = (x_cur - D) / t_cur
    x_next = x_cur + (t_next - t_cur) * d_cur
    if solver == 'heun' and t_next > 0:
        d_prime = (x_next - denoise(x_next, t_next)) / t_next
        x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def _integrate(denoise, latents, t_steps, randn_like, round_sigma, S_churn, S_min, S_max, S_noise, solver,
               begin_step=None, eta=0.0, variance='beta_tilde'):
    """EDM Algorithm 2 for a denoiser `denoise(x, t) -> D` (float64); returns x_N (float64).

    `begin_step(i)` runs before the evaluations of step i. Churn noise is drawn at every step when
    S_churn > 0 (also where γ = 0), so the random stream matches EDM's generate.py. solver='ddim' (with `eta`)
    and 'ddpm' (η = 1, or `variance`='beta') take `ddim_step`s on the same time steps instead, and 'dpmpp2m'
    `dpmpp_2m_step`s: one network evaluation per step.
    """
    num_steps = len(t_steps) - 1
    x_next = initial_state(latents, t_steps, solver)
    D_prev = None
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):   # 0, ..., N−1
        if begin_step is not None:
            begin_step(i)
        x_cur = x_next
        if solver in ANCESTRAL:
            x_next = solver_step(denoise, x_cur, t_cur, t_next, solver, eta, variance, randn_like)
            continue
        if solver in MULTISTEP:
            D = denoise(x_cur, t_cur)
            x_next = dpmpp_2m_step(x_cur, D, D_prev, t_steps[i - 1] if i > 0 else None, t_cur, t_next)
            D_prev = D
            continue

        # Increase the noise level temporarily (churn).
        t_hat = _t_hat(t_cur, num_steps, S_churn, S_min, S_max, round_sigma)
        x_hat = x_cur
        if S_churn > 0:
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)

        # Euler step from x̂.
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Second-order (Heun) correction, except at the last step where t_{i+1} = 0.
        if solver == 'heun' and i < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def initial_state(latents, t_steps, solver):
    """x at the first level from standard-normal latents: σ_0·latents, or z_1/α_1 = sqrt(1 + σ_0²)·latents for VDM's
    variance-preserving prior (solver 'vdm'), float64."""
    return latents.to(torch.float64) * (t_steps[0] if solver != 'vdm' else (1 + t_steps[0] ** 2).sqrt())


def _round_sigma(net):
    return getattr(net, 'round_sigma', lambda sigma: sigma)
