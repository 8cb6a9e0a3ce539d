"""A DDPM scheduler whose step can take an externally computed x̂0 (Daras et al. 2023, Sec. 5.2).

Ambient IF sampling predicts the clean image with the mixed parameterisation of `training.ambient_if.mixed_x0`
(observed pixels from the ε-prediction, hidden pixels read directly from the network), so the x̂0 that enters
the DDPM posterior is not the one diffusers derives from ε̂. `AmbientDDPMScheduler.step(..., clean_image=x̂0)`
uses the given x̂0, applies the configured dynamic thresholding or clipping to it, and then takes the usual DDPM
posterior step (Ho et al. 2020, eqs. 6-7):

    μ = √ᾱ_{t'} β_t / (1 − ᾱ_t) · x̂0 + √α_t (1 − ᾱ_{t'}) / (1 − ᾱ_t) · x_t,   x_{t'} = μ + σ_t z,

with σ_t from the configured `variance_type` (`learned_range` interpolates between β_t and the posterior
variance with the network's extra output channels, exactly as diffusers does). With `clean_image=None` the step
is the parent's. The original ambient-diffusion code bound a modified copy of `step` onto an instance and always
dropped the learned variance; here it is a subclass and the variance follows the configuration (set
`variance_type='fixed_small'` for the original's posterior-variance sampling).
"""

import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

LEARNED_VARIANCES = ('learned', 'learned_range')


class AmbientDDPMScheduler(DDPMScheduler):
    """`DDPMScheduler` plus `step(..., clean_image=x̂0)`; everything else (config, timesteps, add_noise) is inherited."""

    def step(self, model_output, timestep, sample, generator=None, return_dict=True, clean_image=None):
        """One reverse step x_t → x_{t'}.

        model_output: the UNet output [N, C or 2C, H, W] (ε̂, and the variance channels v̂ for learned variances).
        clean_image:  None (the parent's step), or x̂0 [N, C, H, W] to use instead of the x̂0 implied by ε̂.
        """
        if clean_image is None:
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        if clean_image.shape != sample.shape:
            raise ValueError(f'clean_image has shape {tuple(clean_image.shape)} but the sample has {tuple(sample.shape)}')

        t = timestep
        prev_t = self.previous_timestep(t)
        predicted_variance = None
        if model_output.shape[1] == 2 * sample.shape[1]:
            model_output, v = torch.split(model_output, sample.shape[1], dim=1)
            if self.variance_type in LEARNED_VARIANCES:
                predicted_variance = v

        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t

        x0 = clean_image.to(sample.dtype)
        if self.config.thresholding:
            x0 = self._threshold_sample(x0)
        elif self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)

        x0_coeff = alpha_prod_t_prev ** 0.5 * current_beta_t / beta_prod_t
        sample_coeff = current_alpha_t ** 0.5 * beta_prod_t_prev / beta_prod_t
        prev_sample = x0_coeff * x0 + sample_coeff * sample

        if t > 0:
            z = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
            variance = self._get_variance(t, predicted_variance=predicted_variance)
            if self.variance_type == 'fixed_small_log':
                prev_sample = prev_sample + variance * z
            elif self.variance_type == 'learned_range':
                prev_sample = prev_sample + torch.exp(0.5 * variance) * z
            else:
                prev_sample = prev_sample + variance ** 0.5 * z

        if not return_dict:
            return (prev_sample, x0)
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
