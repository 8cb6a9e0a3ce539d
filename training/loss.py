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
from training.networks import HIDDEN_PRECONDS, mask_aware_coefficients, vp_sigma


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

    def __call__(self, net, images, labels=None, augment_pipe=None, generator=None, augment_generator=None):
        sigma = self.sample_sigma(images, generator)
        weight = self.weight(sigma)
        y, augment_labels, _ = _augment(augment_pipe, images, generator=_augment_generator(generator, augment_generator))
        n = _randn(y.shape, y, generator) * sigma
        D = net(y + n, sigma, labels, augment_labels=augment_labels)
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
                 generator=None, augment_generator=None):
        sigma = self.sample_sigma(observation, generator)
        aug_gen = _augment_generator(generator, augment_generator)
        if clean is not None and augment_pipe is not None:
            # Replay the same augmentation on the clean images for the all-pixel diagnostic.
            aug_gen = aug_gen if aug_gen is not None else torch.default_generator
            gens = aug_gen if isinstance(aug_gen, (list, tuple)) else [aug_gen]
            states = [g.get_state() for g in gens]
        y, augment_labels, (A, A_hat) = _augment(augment_pipe, observation, (mask, hat_mask), aug_gen)
        if clean is not None and augment_pipe is not None:
            for g, state in zip(gens, states):
                g.set_state(state)
            clean = _augment(augment_pipe, clean, generator=aug_gen)[0]
        y = y * A  # Keep the observation exactly A ⊙ x0, whatever the caller passed.
        n = _randn(y.shape, y, generator) * sigma
        net_input = torch.cat([A_hat * (y + n), A_hat], dim=1)
        D = net(net_input, sigma, labels, augment_labels=augment_labels)
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


