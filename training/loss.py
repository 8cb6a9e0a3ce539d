"""Training losses: EDM's clean-data losses and the ambient losses for corrupted data.

Every loss returns `(loss, diagnostics)`: `loss` is the per-pixel tensor [N, C, H, W] the training loop
sums and optimises; `diagnostics` maps names to detached per-sample means [N] over the pixels each one is
about (the ambient `loss` over A, `loss_hat` over Ã, `loss_all` over every pixel), for `stats.jsonl`.

Randomness: σ and the noise come from `generator` (a `torch.Generator`, a list of one generator per
sample — then a sample's draws do not depend on the batch or process it is in — or None); augmentation
from `augment_generator` (default: `generator` when it is a single generator). σ is drawn before the
noise, in the same order in every loss, so losses can be compared draw for draw.
"""

import torch

from torch_utils import misc
from training.dataset_json import KIND_CODES
from training.networks import HIDDEN_PRECONDS, ddpm_alpha_bar, mask_aware_coefficients, vp_sigma


def _randn(shape, like, generator=None):
    """Standard normal draws (per sample for a list of generators) on `like`'s device and dtype."""
    return misc.randn(shape, generator, None if generator is not None else like.device).to(like.device, like.dtype)


def _rand(shape, like, generator=None):
    return misc.rand(shape, generator, None if generator is not None else like.device).to(like.device, like.dtype)


def _masked_mean(values, mask=None):
    """Per-sample mean [N] of `values` over the pixels where `mask` is 1 (all pixels without a mask)."""
    if mask is None:
        return values.flatten(1).mean(1)
    mask = mask.expand_as(values)
    return (values * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp(min=1)


def _augment_generator(generator, augment_generator):
    if augment_generator is not None or isinstance(generator, (list, tuple)):
        return augment_generator
    return generator


def _sigma_shape(images):
    return [images.shape[0], 1, 1, 1]


def edm_sigma(images, P_mean, P_std, generator=None):
    """ln σ ~ N(P_mean, P_std²) (Karras et al. 2022, Table 1)."""
    return (_randn(_sigma_shape(images), images, generator) * P_std + P_mean).exp()


def edm_weight(sigma, sigma_data):
    """λ(σ) = (σ² + σd²) / (σ σd)² (Karras et al. 2022, Table 1)."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def vp_sample_sigma(images, beta_d, beta_min, epsilon_t, generator=None):
    """t ~ U(ε_t, 1), σ = σ(t) (Karras et al. 2022, Table 1, VP column)."""
    u = _rand(_sigma_shape(images), images, generator)
    return vp_sigma(1 + u * (epsilon_t - 1), beta_d, beta_min)


def _augment(augment_pipe, images, masks=(), generator=None):
    """Run the augmentation pipe (if any); returns (images, augment_labels, masks)."""
    if augment_pipe is None:
        return images, None, tuple(masks)
    images, labels, masks = augment_pipe(images, masks=tuple(masks), generator=generator)
    return images, labels, tuple(masks)


def _augment_with_clean(augment_pipe, images, masks, clean, generator):
    """`_augment`, and the same augmentation replayed on the clean images (the all-pixel diagnostic) when given.
    Returns (images, augment_labels, masks, clean)."""
    if clean is None or augment_pipe is None:
        return (*_augment(augment_pipe, images, masks, generator), clean)
    generator = generator if generator is not None else torch.default_generator
    gens = generator if isinstance(generator, (list, tuple)) else [generator]
    states = [g.get_state() for g in gens]
    images, labels, masks = _augment(augment_pipe, images, masks, generator)
    for g, state in zip(gens, states):
        g.set_state(state)
    return images, labels, masks, _augment(augment_pipe, clean, generator=generator)[0]


def _conditioning(condition):
    """The network's extra keyword for a super-resolution condition (none without one, so any denoiser works)."""
    return {} if condition is None else dict(condition=condition)


def _penalty(residual, norm):
    if norm == 2:
        return residual.square()
    return residual.abs()


def _check_hidden_precond(hidden_precond):
    if hidden_precond not in HIDDEN_PRECONDS:
        raise ValueError(f'hidden_precond={hidden_precond!r}: expected one of {", ".join(HIDDEN_PRECONDS)}')
    return hidden_precond


def _check_norm(norm):
    if norm not in (1, 2):
        raise ValueError(f"norm={norm!r} is not supported: use 2 (squared error) or 1 (absolute error)")
    return norm


# ---------------------------------------------------------------------------------------------
# Clean-data losses (Karras et al. 2022, Sec. 5 and Table 1).

class _CleanLoss:
    """Shared body of the clean-data losses: D(y + n, σ) against the (augmented) clean image y."""

    def sample_sigma(self, images, generator=None):
        raise NotImplementedError

    def weight(self, sigma):
        raise NotImplementedError

    def __call__(self, net, images, labels=None, augment_pipe=None, generator=None, augment_generator=None, sigma=None,
                 condition=None):
        """`sigma`: the noise levels [N, 1, 1, 1] to train at; drawn from `generator` when None. `condition`: the
        super-resolution network's low-resolution input (SR3), if it takes one."""
        if sigma is None:
            sigma = self.sample_sigma(images, generator)
        weight = self.weight(sigma)
        y, augment_labels, _ = _augment(augment_pipe, images, generator=_augment_generator(generator, augment_generator))
        n = _randn(y.shape, y, generator) * sigma
        D = net(y + n, sigma, labels, augment_labels=augment_labels, **_conditioning(condition))
        loss = weight * (D - y).square()
        return loss, dict(loss=_masked_mean(loss.detach()))

    def to_dict(self):
        return dict(class_name=f'{type(self).__module__}.{type(self).__name__}', **self.__dict__)


class EDMLoss(_CleanLoss):
    """EDM training loss (Karras et al. 2022, Table 1)."""

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data

    def sample_sigma(self, images, generator=None):
        return edm_sigma(images, self.P_mean, self.P_std, generator)

    def weight(self, sigma):
        return edm_weight(sigma, self.sigma_data)


class VPLoss(_CleanLoss):
    """Variance-preserving loss (Song et al. 2021, as parameterised by Karras et al. 2022)."""

    def __init__(self, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5):
        self.beta_d, self.beta_min, self.epsilon_t = beta_d, beta_min, epsilon_t

    def sample_sigma(self, images, generator=None):
        return vp_sample_sigma(images, self.beta_d, self.beta_min, self.epsilon_t, generator)

    def weight(self, sigma):
        return 1 / sigma ** 2


class VELoss(_CleanLoss):
    """Variance-exploding loss: σ log-uniform in [σ_min, σ_max] (Song et al. 2021)."""

    def __init__(self, sigma_min=0.02, sigma_max=100):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def sample_sigma(self, images, generator=None):
        u = _rand(_sigma_shape(images), images, generator)
        return self.sigma_min * ((self.sigma_max / self.sigma_min) ** u)

    def weight(self, sigma):
        return 1 / sigma ** 2


class _DDPMSchedule:
    """t uniform in {1..T} and σ_t = sqrt((1 − ᾱ_t)/ᾱ_t) of `training.networks.ddpm_alpha_bar`; weight 1/σ², so
    that the loss is DDPM's ‖ε̂ − ε‖² (ε̂ = (x − D)/σ gives ε̂ − ε = (y − D)/σ)."""

    def _init_schedule(self, beta_schedule, beta_start, beta_end, T):
        self.beta_schedule, self.beta_start, self.beta_end, self.T = beta_schedule, beta_start, beta_end, T
        alpha_bar = ddpm_alpha_bar(beta_schedule, beta_start, beta_end, T)
        self._sigmas = ((1 - alpha_bar) / alpha_bar).sqrt()

    def sample_sigma(self, images, generator=None):
        u = _rand(_sigma_shape(images), images, generator)
        index = (u * self.T).long().clamp(max=self.T - 1)  # t − 1, uniform in 0..T−1
        return self._sigmas.to(images.device)[index].to(images.dtype)

    def weight(self, sigma):
        return 1 / sigma ** 2

    def to_dict(self):
        return dict(class_name=f'{type(self).__module__}.{type(self).__name__}',
                    **{k: v for k, v in self.__dict__.items() if not k.startswith('_')})


class DDPMLoss(_DDPMSchedule, _CleanLoss):
    """DDPM's simple loss ‖ε̂ − ε‖² at t ~ U{1..T} (Ho et al. 2020, Eq. 14), in σ-form."""

    def __init__(self, beta_schedule='linear', beta_start=1e-4, beta_end=0.02, T=1000):
        self._init_schedule(beta_schedule, beta_start, beta_end, T)


# ---------------------------------------------------------------------------------------------
# Ambient losses (Daras et al. 2023, Sec. 3: J_corr).

class _AmbientLoss:
    """Shared body of the ambient losses.

    Input to the network: concat[Ã ⊙ (A ⊙ x0 + σ n), Ã] (2C channels); optimised loss: w(σ) · A ⊙ (D − x0)
    (squared, or absolute for norm=1). The observation is A ⊙ x0, so neither the input nor the loss can
    depend on a pixel outside A. Diagnostics: the same loss on Ã (`loss_hat`), and on every pixel
    (`loss_all`) only when clean images are passed explicitly for evaluation.
    """

    def sample_sigma(self, images, generator=None):
        raise NotImplementedError

    def weight(self, sigma):
        raise NotImplementedError

    def pixel_weight(self, sigma, A_hat):
        """Per-pixel loss weight: w(σ) everywhere ('original'), or λ = 1/c_out² with the per-pixel c_out of the
        mask-aware preconditioning ('mask_aware'; w(σ) = 1/c_out(σ)² for every preconditioner here, so
        λ = w(σ) where Ã = 1 and 1/σd² where Ã = 0)."""
        weight = self.weight(sigma)
        if self.hidden_precond == 'original':
            return weight
        _, c_out = mask_aware_coefficients(0, weight.rsqrt(), A_hat, self.sigma_data)
        return 1 / c_out ** 2

    def __call__(self, net, observation, mask, hat_mask, labels=None, augment_pipe=None, clean=None,
                 generator=None, augment_generator=None, condition=None):
        sigma = self.sample_sigma(observation, generator)
        y, augment_labels, (A, A_hat), clean = _augment_with_clean(augment_pipe, observation, (mask, hat_mask), clean,
            _augment_generator(generator, augment_generator))
        y = y * A  # Keep the observation exactly A ⊙ x0, whatever the caller passed.
        n = _randn(y.shape, y, generator) * sigma
        net_input = torch.cat([A_hat * (y + n), A_hat], dim=1)
        D = net(net_input, sigma, labels, augment_labels=augment_labels, **_conditioning(condition))
        weight = self.pixel_weight(sigma, A_hat)
        residual = D - y
        loss = weight * _penalty(A * residual, self.norm)
        with torch.no_grad():
            diagnostics = dict(loss=_masked_mean(loss, A),
                loss_hat=_masked_mean(weight * _penalty(A_hat * residual, self.norm), A_hat))
            if clean is not None:
                diagnostics['loss_all'] = _masked_mean(weight * _penalty(D - clean, self.norm))
        return loss, diagnostics

    def to_dict(self):
        return dict(class_name=f'{type(self).__module__}.{type(self).__name__}', **self.__dict__)


class AmbientLoss(_AmbientLoss):
    """Ambient loss with EDM's σ distribution and weighting (Daras et al. 2023, Sec. 3)."""

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5, norm=2, hidden_precond='original'):
        self.P_mean, self.P_std, self.sigma_data, self.norm = P_mean, P_std, sigma_data, _check_norm(norm)
        self.hidden_precond = _check_hidden_precond(hidden_precond)

    def sample_sigma(self, images, generator=None):
        return edm_sigma(images, self.P_mean, self.P_std, generator)

    def weight(self, sigma):
        return edm_weight(sigma, self.sigma_data)


class AmbientVPLoss(_AmbientLoss):
    """Ambient loss with the VP σ distribution and weight 1/σ²."""

    def __init__(self, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5, norm=2, hidden_precond='original', sigma_data=0.5):
        self.beta_d, self.beta_min, self.epsilon_t, self.norm = beta_d, beta_min, epsilon_t, _check_norm(norm)
        self.hidden_precond = _check_hidden_precond(hidden_precond)
        self.sigma_data = sigma_data  # c_out of hidden pixels in the mask-aware preconditioning

    def sample_sigma(self, images, generator=None):
        return vp_sample_sigma(images, self.beta_d, self.beta_min, self.epsilon_t, generator)

    def weight(self, sigma):
        return 1 / sigma ** 2




class AmbientDDPMLoss(_DDPMSchedule, _AmbientLoss):
    """Ambient loss with DDPM's discrete t and weight 1/σ² (the ε-loss on A, as the original's VP ambient loss)."""

    def __init__(self, beta_schedule='linear', beta_start=1e-4, beta_end=0.02, T=1000, norm=2,
                 hidden_precond='original', sigma_data=0.5):
        self._init_schedule(beta_schedule, beta_start, beta_end, T)
        self.norm, self.hidden_precond = _check_norm(norm), _check_hidden_precond(hidden_precond)
        self.sigma_data = sigma_data  # c_out of hidden pixels in the mask-aware preconditioning


# ---------------------------------------------------------------------------------------------
# Noisy and low-quality data (SPEC §3; Daras et al. 2024 "Consistent Diffusion Meets Tweedie", 2025 "Ambient Omni").

def _as_sigma(sigma, like):
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    return sigma.reshape(-1, *([1] * (like.ndim - 1))) if sigma.ndim else sigma


def tweedie_to_lower_noise(x0_pred, x_t, sigma_t, sigma_n):
    """E[x_n | x_t] from x̂0 = E[x0 | x_t] (VE: x_t = x_n + sqrt(σ_t² − σ_n²)·z, x_n = x0 + σ_n·ε):
    x̂_n = (1 − σ_n²/σ_t²)·x̂0 + (σ_n²/σ_t²)·x_t. `x_t` is at the higher level σ_t, the result at σ_n ≤ σ_t."""
    ratio = (_as_sigma(sigma_n, x_t) / _as_sigma(sigma_t, x_t)) ** 2
    return (1 - ratio) * x0_pred + ratio * x_t


def tweedie_to_lower_noise_vp(x0_pred, x_t, vp_sigma_t, vp_sigma_n):
    """The same in VP form (x_t = sqrt(1 − s_t²)·x0 + s_t·ε with VP noise std s ∈ (0, 1)): `x_t` is at the
    higher level s_t, the result E[x_n | x_t] at s_n ≤ s_t. With α = sqrt((1 − s_t²)/(1 − s_n²)) and
    β² = s_t² − α²s_n² (x_t = α·x_n + β·z): x̂_n = (x_t + (β²/s_t²)·(sqrt(1 − s_t²)·x̂0 − x_t)) / α.
    (ambient-utils' `from_x0_pred_to_xnature_pred_vp_to_vp` has the two levels' roles the other way round.)"""
    s_t, s_n = _as_sigma(vp_sigma_t, x_t), _as_sigma(vp_sigma_n, x_t)
    if bool((s_n > s_t).any()) or bool((s_t >= 1).any()) or bool((s_n < 0).any()):
        raise ValueError('tweedie_to_lower_noise_vp needs 0 <= vp_sigma_n <= vp_sigma_t < 1 (x_t is the noisier one)')
    alpha = ((1 - s_t ** 2) / (1 - s_n ** 2)).sqrt()
    beta2 = s_t ** 2 - alpha ** 2 * s_n ** 2
    return (x_t + beta2 / s_t ** 2 * ((1 - s_t ** 2).sqrt() * x0_pred - x_t)) / alpha


def ambient_factor(sigma_t, sigma_n):
    """a = σ_t⁴/(σ_t² − σ_n²)²: with it, ‖x̂_n − x_n‖² weighs like ‖x̂0 − y‖² (1 at σ_n = 0)."""
    return sigma_t ** 4 / (sigma_t ** 2 - sigma_n ** 2) ** 2


def pseudo_target(x_n, x_t, sigma_t, sigma_n):
    """y = (σ_t²·x_n − σ_n²·x_t)/(σ_t² − σ_n²), whose mean given x_t is E[x0 | x_t]."""
    return (sigma_t ** 2 * x_n - sigma_n ** 2 * x_t) / (sigma_t ** 2 - sigma_n ** 2)




class _NoisyLoss:
    """Two-stage diffusion on images trusted at some noise levels (SPEC §3).

    Per image: σ_t comes with the batch (the σ-first sampler, `noise_info[:, 0]`), (σ_min, σ_max, kind) from its
    annotation. σ_tn = σ_min, or 0 when σ_min ≥ σ_t (the low-noise branch, σ_t < σ_max). x_tn is the image
    itself for kind 'noisy' (it carries Gaussian noise of std σ_min) and for clean images, image + σ_tn·n_fixed
    for kind 'corrupted'. x_t = x_tn + sqrt(σ_t² − σ_tn²)·n; D = D_θ(x_t, σ_t); x̂_tn = tweedie_to_lower_noise;
    loss = λ(σ_t)·a·‖x̂_tn − x_tn‖² (`ambient_factor=False`: λ(σ_t)·‖x̂_tn − x_tn‖², the reference's variant).
    """

    sigma_first = True  # trains on (σ, image) pairs from the σ-first sampler

    def sample_sigma(self, images, generator=None):
        raise NotImplementedError

    def weight(self, sigma):
        raise NotImplementedError

    def sigma_support(self):
        """The noise levels the σ distribution can draw, (lo, hi)."""
        raise NotImplementedError

    def __call__(self, net, images, noise_info, fixed_noise, labels=None, augment_pipe=None, clean=None,
                 generator=None, augment_generator=None):
        sigma = noise_info[:, 0].reshape(-1, 1, 1, 1).to(images.dtype)
        if bool(torch.isnan(sigma).any()):
            raise ValueError('the noisy-data loss trains at the σ the σ-first sampler drew for each image; this batch has '
                             'none (items need (index, position, σ) keys)')
        sigma_min, kind = noise_info[:, 1].reshape(-1, 1, 1, 1), noise_info[:, 3].reshape(-1, 1, 1, 1)
        # The branch is decided at the sampler's precision (float64 σ), then σ_tn takes the images' dtype.
        high_branch = sigma_min < noise_info[:, 0].reshape(-1, 1, 1, 1)
        sigma_tn = torch.where(high_branch, sigma_min, torch.zeros_like(sigma_min)).to(images.dtype)
        x_tn = images + (kind == KIND_CODES['corrupted']).to(images.dtype) * sigma_tn * fixed_noise.to(images.dtype)
        x_tn, augment_labels, _, clean = _augment_with_clean(augment_pipe, x_tn, (), clean,
            _augment_generator(generator, augment_generator))
        # Noise scale and weight from the float64 levels: σ_t may lie within float32 rounding of σ_tn.
        sigma64, sigma_tn64 = noise_info[:, 0].reshape(-1, 1, 1, 1), torch.where(high_branch, sigma_min, 0.0)
        x_t = x_tn + _randn(x_tn.shape, x_tn, generator) * (sigma64 ** 2 - sigma_tn64 ** 2).sqrt().to(images.dtype)
        D = net(x_t, sigma, labels, augment_labels=augment_labels)
        x_hat_tn = tweedie_to_lower_noise(D, x_t, sigma, sigma_tn)
        weight = self.weight(sigma64)
        if self.ambient_factor:
            weight = weight * ambient_factor(sigma64, sigma_tn64)
        weight = weight.to(images.dtype)
        loss = weight * (x_hat_tn - x_tn).square()
        with torch.no_grad():
            diagnostics = dict(loss=_masked_mean(loss), clean_target_share=(sigma_tn == 0).to(images.dtype).flatten())
            if clean is not None:
                diagnostics['loss_all'] = _masked_mean(self.weight(sigma) * (D - clean).square())
        return loss, diagnostics

    def to_dict(self):
        return dict(class_name=f'{type(self).__module__}.{type(self).__name__}', **self.__dict__)


def _check_s_max(s_max):
    if s_max is not None and not s_max > 1:
        raise ValueError(f's_max={s_max} must be > 1 (or None)')
    return s_max


class NoisyAmbientLoss(_NoisyLoss):
    """The noisy-data loss with EDM's σ distribution and weighting (`--precond=ambient_noisy`)."""

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5, s_max=None, ambient_factor=True):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data
        self.s_max, self.ambient_factor = _check_s_max(s_max), bool(ambient_factor)

    def sample_sigma(self, images, generator=None):
        return edm_sigma(images, self.P_mean, self.P_std, generator)

    def weight(self, sigma):
        return edm_weight(sigma, self.sigma_data)

    def sigma_support(self):
        return (0.0, float('inf'))


class NoisyAmbientVPLoss(_NoisyLoss):
    """The noisy-data loss with the VP σ distribution and weight 1/σ² (`--precond=ambient_noisy_vp`)."""

    def __init__(self, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5, s_max=None, ambient_factor=True):
        self.beta_d, self.beta_min, self.epsilon_t = beta_d, beta_min, epsilon_t
        self.s_max, self.ambient_factor = _check_s_max(s_max), bool(ambient_factor)

    def sample_sigma(self, images, generator=None):
        return vp_sample_sigma(images, self.beta_d, self.beta_min, self.epsilon_t, generator)

    def weight(self, sigma):
        return 1 / sigma ** 2

    def sigma_support(self):
        sigmas = vp_sigma(torch.tensor([self.epsilon_t, 1.0], dtype=torch.float64), self.beta_d, self.beta_min)
        return (float(sigmas[0]), float(sigmas[1]))
