"""Ambient DeepFloyd IF stage-I sampling (Daras et al. 2023, Sec. 5.2): diffusers' `IFPipeline` plus a fixed mask.

`AmbientIFPipeline` is a subclass of `diffusers.IFPipeline` that keeps its components, prompt encoding,
safety checker and watermarking, and replaces the denoising loop:

1. One mask M ~ p(Ã) per trajectory (per image), drawn by `torch_utils.ambient_diffusion.MaskCorruption` from
   `corruption_pattern`, `corruption_probability` and `delta_probability`, after the initial noise and from the
   same `generator` (a list of generators gives per-image masks that do not depend on the batch).
   With p = δ = 0 the mask is all ones and nothing is drawn, so the output equals the stock `IFPipeline`'s.
2. At each step the UNet sees M ⊙ x_t; classifier-free guidance combines the unconditional and conditional
   ε̂ (the original dropped this combination, so guidance_scale > 1 failed); the learned-variance channels come
   from the conditional branch, as in diffusers.
3. x̂0 = `training.ambient_if.mixed_x0` (observed pixels from ε̂, hidden ones read from the output directly), and
   `scheduling_ddpm.AmbientDDPMScheduler.step(..., clean_image=x̂0)` thresholds it as the scheduler is configured
   and takes the DDPM posterior step.

The pipeline's registered scheduler stays a plain `DDPMScheduler` (so `save_pretrained`/`from_pretrained` work
unchanged); each call steps with an `AmbientDDPMScheduler` made from its config.
"""

import torch
from diffusers import IFPipeline
from diffusers.pipelines.deepfloyd_if import IFPipelineOutput

from scheduling_ddpm import AmbientDDPMScheduler
from torch_utils.ambient_diffusion import MaskCorruption
from training.ambient_if import mixed_x0

CORRUPTION_PATTERNS = ('dust', 'fixed_box', 'box', 'keep_patch')


class AmbientIFPipeline(IFPipeline):
    """IF stage I sampling from a model fine-tuned on corrupted data (one fixed mask per trajectory)."""

    def sampling_mask(self, shape, corruption, generator, device):
        """M [N, C, H, W] ~ p(Ã); all ones without drawing anything when the corruption is the identity."""
        if corruption.corruption_probability == 0 and corruption.delta_probability == 0:
            return torch.ones(shape, device=device)
        return corruption.sample_sampling_mask(shape, generator=generator, device=device)

    @torch.no_grad()
    def __call__(self, prompt=None, num_inference_steps=100, timesteps=None, guidance_scale=7.0, negative_prompt=None,
                 num_images_per_prompt=1, height=None, width=None, generator=None, prompt_embeds=None,
                 negative_prompt_embeds=None, output_type='pil', return_dict=True, callback=None, callback_steps=1,
                 clean_caption=False, cross_attention_kwargs=None, corruption_pattern='dust',
                 corruption_probability=0.0, delta_probability=0.0, masks=None):
        """Sample images. Arguments as `IFPipeline.__call__` (no `eta`: DDPM has none), plus the sampling mask:
        `corruption_pattern` (dust | fixed_box | box | keep_patch), `corruption_probability` p and
        `delta_probability` δ, or explicit `masks` [N, C, H, W] (1 = visible to the network)."""
        if output_type not in ('pil', 'np', 'pt'):
            raise ValueError(f'output_type={output_type!r}; pass pil, np or pt')
        if corruption_pattern not in CORRUPTION_PATTERNS:
            raise ValueError(f'corruption_pattern={corruption_pattern!r}; pass one of {", ".join(CORRUPTION_PATTERNS)}')
        corruption = MaskCorruption(corruption_pattern, corruption_probability, delta_probability, mask_full_rgb=True)
        self.check_inputs(prompt, callback_steps, negative_prompt, prompt_embeds, negative_prompt_embeds)
        height = height or self.unet.config.sample_size
        width = width or self.unet.config.sample_size
        if prompt is not None:
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        device = self._execution_device
        guided = guidance_scale > 1.0

        prompt_embeds, negative_prompt_embeds = self.encode_prompt(prompt, guided,
            num_images_per_prompt=num_images_per_prompt, device=device, negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, clean_caption=clean_caption)
        if guided:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])

        scheduler = self.scheduler
        if not isinstance(scheduler, AmbientDDPMScheduler):
            scheduler = AmbientDDPMScheduler.from_config(scheduler.config)
        if timesteps is not None:
            scheduler.set_timesteps(timesteps=timesteps, device=device)
        else:
            scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = scheduler.timesteps

        n = batch_size * num_images_per_prompt
        channels = self.unet.config.in_channels
        x = self.prepare_intermediate_images(n, channels, height, width, prompt_embeds.dtype, device, generator)
        if masks is None:
            masks = self.sampling_mask((n, channels, height, width), corruption, generator, device)
        elif tuple(masks.shape) != (n, channels, height, width):
            raise ValueError(f'masks has shape {tuple(masks.shape)}; expected {(n, channels, height, width)}')
        masks = masks.to(device=device, dtype=x.dtype)

        if getattr(self, 'text_encoder_offload_hook', None) is not None:
            self.text_encoder_offload_hook.offload()

        for i, t in enumerate(self.progress_bar(timesteps)):
            model_input = masks * x
            model_input = torch.cat([model_input] * 2) if guided else model_input
            output = self.unet(scheduler.scale_model_input(model_input, t), t, encoder_hidden_states=prompt_embeds,
                               cross_attention_kwargs=cross_attention_kwargs, return_dict=False)[0]
            if guided:
                uncond, cond = output.chunk(2)
                eps_uncond, eps_cond = uncond[:, :channels], cond[:, :channels]
                output = torch.cat([eps_uncond + guidance_scale * (eps_cond - eps_uncond), cond[:, channels:]], dim=1)
            eps = output[:, :channels]
            x0_hat = mixed_x0(masks * x, eps, masks, scheduler.alphas_cumprod[t])
            x = scheduler.step(output, t, x, generator=generator, return_dict=False, clean_image=x0_hat.to(x.dtype))[0]
            if callback is not None and i % callback_steps == 0:
                callback(i, t, x)

        nsfw_detected = watermark_detected = None
        image = x
        if output_type == 'pt':
            if getattr(self, 'unet_offload_hook', None) is not None:
                self.unet_offload_hook.offload()
        else:
            image = (image / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
            image, nsfw_detected, watermark_detected = self.run_safety_checker(image, device, prompt_embeds.dtype)
            if output_type == 'pil':
                image = self.numpy_to_pil(image)
                if self.watermarker is not None:
                    image = self.watermarker.apply_watermark(image, self.unet.config.sample_size)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image, nsfw_detected, watermark_detected)
        return IFPipelineOutput(images=image, nsfw_detected=nsfw_detected, watermark_detected=watermark_detected)
