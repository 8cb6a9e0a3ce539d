"""Ambient fine-tuning of DeepFloyd IF stage I on corrupted data (Daras et al. 2023, Sec. 5.2).

The math (one implementation each, used by train_text_to_image.py and pipeline_if.py):

    x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε                     (diffusers' `DDPMScheduler.add_noise`)
    UNet input          Ã ⊙ x_t                       (3 channels: IF's UNet has no mask channel)
    x̂0 = Ã ⊙ (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t + (1 − Ã) ⊙ ε̂    (`mixed_x0`: on pixels the network cannot see, its
                                                       "noise" output channels are read as the clean image)
    loss = mean over all elements of (A ⊙ (x̂0 − x0))²  (`ambient_if_loss`; the original's normalisation)

Diagnostics are mean squared errors over pixel sets: A \\ Ã (always available: the data holds them), and all
pixels / pixels outside A when clean images are supplied explicitly for evaluation.

Also here: loading IF components with one-line errors, the empty-prompt T5 embedding cache and UNet state dicts
(ours and the original's prefixed ones).
"""

import os

import torch

import dnnlib
from torch_utils.misc import randint, randn, unwrapped_name
from training.snapshots import read_torch_file

IF_STAGE_I = 'DeepFloyd/IF-I-XL-v1.0'
IF_STAGE_II = 'DeepFloyd/IF-II-L-v1.0'


class ModelLoadError(ValueError):
    """A model or file that cannot be loaded; the message names the path and the option that sets it."""

#----------------------------------------------------------------------------
# Math.

def _per_sample(alpha_prod_t, like):
    alpha_prod_t = torch.as_tensor(alpha_prod_t, device=like.device, dtype=torch.float32)
    return alpha_prod_t.reshape(-1, *([1] * (like.ndim - 1))) if alpha_prod_t.ndim else alpha_prod_t


def mixed_x0(x_t, eps, hat_mask, alpha_prod_t):
    """x̂0 = Ã ⊙ (x_t − √(1−ᾱ) ε̂)/√ᾱ + (1−Ã) ⊙ ε̂; `alpha_prod_t` is a scalar or one ᾱ per sample [N]."""
    alpha_prod_t = _per_sample(alpha_prod_t, x_t)
    beta_prod_t = 1 - alpha_prod_t
    x0_from_eps = (x_t - beta_prod_t ** 0.5 * eps) / alpha_prod_t ** 0.5
    return hat_mask * x0_from_eps + (1 - hat_mask) * eps


def _masked_mse(diff, weight):
    """Mean of diff² over the pixels where weight = 1 (0 when the set is empty)."""
    return (weight * diff.square()).sum() / weight.sum().clamp(min=1)


def min_snr_weights(alpha_prod_t, snr_gamma):
    """Min-SNR-γ weights of an x0 loss (Hang et al. 2023): min(SNR_t, γ), SNR_t = ᾱ_t/(1 − ᾱ_t); [N]."""
    alpha_prod_t = torch.as_tensor(alpha_prod_t, dtype=torch.float32)
    return (alpha_prod_t / (1 - alpha_prod_t)).clamp(max=snr_gamma)


def ambient_if_loss(x0_hat, x0, mask, hat_mask, clean=None, weights=None):
    """Ambient IF loss (Daras et al. 2023, Sec. 5.2) and its diagnostics.

    x0_hat: the mixed prediction [N, C, H, W]; x0: the observation A ⊙ x0; mask: A; hat_mask: Ã = A ⊙ B;
    clean: the clean images, only for evaluation diagnostics. Returns (loss to optimise, dict of detached
    diagnostics): `loss` (the same value), `loss_hat` (pixels in A but not in Ã: what the model must infer),
    and with `clean`, `loss_all` and `loss_unobserved` (pixels outside A). `weights` [N]: per-sample loss weights
    (e.g. `min_snr_weights`); the diagnostics stay unweighted.
    """
    x0_hat = x0_hat.float()
    squared = (mask * (x0_hat - x0)).square()
    loss = (squared if weights is None else _per_sample(weights, squared) * squared).mean()
    with torch.no_grad():
        stats = dict(loss=squared.mean(), loss_hat=_masked_mse(x0_hat - x0, mask * (1 - hat_mask)))
        if clean is not None:
            stats['loss_all'] = (x0_hat - clean).square().mean()
            stats['loss_unobserved'] = _masked_mse(x0_hat - clean, 1 - mask)
    return loss, stats


def ambient_if_step(unet, scheduler, x0, mask, hat_mask, encoder_hidden_states, generator=None,
                    noise_offset=0.0, clean=None, snr_gamma=None):
    """One forward pass of ambient IF training: returns (loss, diagnostics, tensors for pictures).

    x0 is the observation A ⊙ x0 in [-1, 1]; pixels outside A never reach the UNet input or the loss.
    Noise ε (plus offset noise ~ noise_offset · N(0, 1) per image and channel) and timesteps t ~ U{0..T−1}
    come from `generator` (a torch.Generator, a list with one per sample, or None).
    """
    if scheduler.config.prediction_type != 'epsilon':
        raise ValueError(f'ambient IF training needs an epsilon-prediction scheduler, got '
                         f'prediction_type={scheduler.config.prediction_type!r}')
    n, c = x0.shape[:2]
    noise = randn(x0.shape, generator, x0.device)
    if noise_offset:
        noise = noise + noise_offset * randn((n, c, 1, 1), generator, x0.device)
    timesteps = randint(scheduler.config.num_train_timesteps, n, generator, x0.device)
    x0 = mask * x0  # The loss and input must not depend on what the data holds outside A.
    x_t = hat_mask * scheduler.add_noise(x0, noise, timesteps)
    output = unet(x_t, timesteps, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
    eps = output[:, :c].float()
    alpha_prod_t = scheduler.alphas_cumprod.to(x0.device)[timesteps]
    x0_hat = mixed_x0(x_t, eps, hat_mask, alpha_prod_t)
    weights = min_snr_weights(alpha_prod_t, snr_gamma) if snr_gamma is not None else None
    loss, stats = ambient_if_loss(x0_hat, x0, mask, hat_mask, clean, weights)
    return loss, stats, dict(noisy_input=x_t.detach(), prediction=x0_hat.detach(), timesteps=timesteps)

#----------------------------------------------------------------------------
# Loading IF components.

def load_component(what, loader, model, option, subfolder=None, **kwargs):
    """`loader(model, subfolder=..., **kwargs)`, with failures turned into a one-line ModelLoadError naming the option."""
    where = f'{model}' + (f' (subfolder {subfolder})' if subfolder else '')
    try:
        return loader(model, subfolder=subfolder, **kwargs) if subfolder else loader(model, **kwargs)
    except (OSError, ValueError, EnvironmentError) as err:
        reason = str(err).strip().splitlines()[0].rstrip('.') if str(err).strip() else type(err).__name__
        raise ModelLoadError(f'cannot load the {what} from {where}: {reason}. Pass a local model directory or a '
                             f'cached hub id with {option}') from None


def load_unet(model, cache_dir=None, variant=None, dtype=None, option='--pretrained_model_name_or_path'):
    from diffusers import UNet2DConditionModel
    kwargs = dict(cache_dir=cache_dir, variant=variant)
    if dtype is not None:
        kwargs['dtype'] = dtype
    return load_component('UNet', UNet2DConditionModel.from_pretrained, model, option, 'unet', **kwargs)


def load_scheduler(model, cache_dir=None, option='--pretrained_model_name_or_path'):
    from diffusers import DDPMScheduler
    return load_component('scheduler', DDPMScheduler.from_pretrained, model, option, 'scheduler', cache_dir=cache_dir)


def load_text_encoder(model, cache_dir=None, dtype=None, option='--pretrained_model_name_or_path', in_8bit=False):
    """(tokenizer, T5 encoder) of an IF model directory or hub id. `in_8bit`: the encoder's linear layers in 8 bits
    (bitsandbytes, as the original loaded T5-XXL), placed on the GPU; it needs CUDA."""
    from transformers import AutoTokenizer, T5EncoderModel
    tokenizer = load_component('tokenizer', AutoTokenizer.from_pretrained, model, option, 'tokenizer', cache_dir=cache_dir)
    kwargs = dict(cache_dir=cache_dir)
    if dtype is not None:
        kwargs['dtype'] = dtype
    if in_8bit:
        if not torch.cuda.is_available():
            raise ModelLoadError('--text_encoder_8bit needs a CUDA device (bitsandbytes\' 8-bit matmuls); drop it on '
                                 'a CPU, where T5 loads in float32')
        from transformers import BitsAndBytesConfig
        kwargs.update(quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map='auto')
    encoder = load_component('text encoder', T5EncoderModel.from_pretrained, model, option, 'text_encoder', **kwargs)
    return tokenizer, encoder.eval().requires_grad_(False)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts, device=None):
    """T5 embeddings [N, L, D] of `prompts` exactly as `IFPipeline.encode_prompt` computes them."""
    from diffusers import IFPipeline
    encoder_pipe = IFPipeline(tokenizer=tokenizer, text_encoder=text_encoder, unet=None, scheduler=None,
        safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    embeds, _ = encoder_pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False,
        device=device or text_encoder.device, clean_caption=False)
    return embeds


def text_encoder_dtype(device):
    """bfloat16 for T5 on GPUs that support it (fp16 overflows in T5), float32 elsewhere."""
    device = torch.device(device or 'cpu')
    return torch.bfloat16 if device.type == 'cuda' and torch.cuda.is_bf16_supported() else torch.float32


def empty_prompt_embeds(path, model=None, cache_dir=None, device=None, option='--empty_embeds', in_8bit=False):
    """The T5 embedding of the empty prompt [1, L, D] (float32, CPU).

    A file at `path` is used as is; otherwise the embedding is computed with `model`'s text encoder, written to
    `path` atomically and the encoder is freed. Without either, a one-line error says what is missing.
    """
    if path and os.path.isfile(path):
        try:
            embeds = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as err:
            raise ModelLoadError(f'{path} is not a readable tensor file ({type(err).__name__}); delete it to '
                                 f'recompute it, or pass another file with {option}') from None
        if not isinstance(embeds, torch.Tensor) or embeds.ndim not in (2, 3):
            raise ModelLoadError(f'{path} does not hold a [1, tokens, dim] empty-prompt embedding; delete it or pass '
                                 f'another file with {option}')
        return (embeds[None] if embeds.ndim == 2 else embeds[:1]).float()
    if model is None:
        raise ModelLoadError(f'no empty-prompt embedding at {path} and no text encoder to compute it: pass an '
                             f'existing file with {option}')
    try:
        tokenizer, encoder = load_text_encoder(model, cache_dir, dtype=text_encoder_dtype(device), in_8bit=in_8bit)
    except ModelLoadError as err:
        raise ModelLoadError(f'no empty-prompt embedding at {path}, and {err}; or pass an existing embedding file '
                             f'with {option}') from None
    embeds = encode_prompts(tokenizer, encoder if in_8bit else encoder.to(device or 'cpu'), ['']).float().cpu()
    del tokenizer, encoder
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with dnnlib.util.atomic_write(path, 'wb') as f:
            torch.save(embeds, f)
    return embeds


def check_embeds(embeds, unet, source):
    dim = unet.config.encoder_hid_dim or unet.config.cross_attention_dim
    if embeds.shape[-1] != dim:
        raise ModelLoadError(f'{source} holds {embeds.shape[-1]}-d text embeddings but the UNet expects {dim}-d: '
                             f'compute it with the text encoder of the same IF model')

#----------------------------------------------------------------------------
# UNet state dicts.

def strip_wrapper_prefixes(state_dict):
    """Remove torch.compile / DDP prefixes (`_orig_mod.`, `module.`, in any nesting) from key names."""
    return {unwrapped_name(k): v for k, v in state_dict.items()}


def load_unet_state_dict(unet, path):
    """Load a `state_dict_{step}.pt` (ours, or the original's prefixed one) into `unet`, strictly."""
    if not os.path.isfile(path):
        raise ModelLoadError(f'checkpoint not found: {path} (pass a state_dict_*.pt written by train_text_to_image.py '
                             f'with --checkpoint_path)')
    try:
        state = read_torch_file(path, 'state dict of a UNet (a state_dict_*.pt of train_text_to_image.py; --checkpoint_path)')
    except ValueError as err:
        raise ModelLoadError(str(err)) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f'{path} is not a UNet state dict (a mapping of names to tensors)')
    state = strip_wrapper_prefixes(state)
    own = unet.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        detail = '; '.join(f'{label} {len(keys)} (e.g. {keys[0]})' for label, keys in
                           (('missing', missing), ('unexpected', unexpected), ('shape mismatch', shapes)) if keys)
        raise ModelLoadError(f'{path} does not fit this UNet ({detail}): was it fine-tuned from the model given by '
                             f'--pretrained_model_name_or_path?')
    unet.load_state_dict(state, strict=True)
    return unet

#----------------------------------------------------------------------------
# Scheduler.

def if_scheduler(**overrides):
    """A DDPMScheduler with IF stage I's configuration (cosine schedule, learned range, dynamic thresholding)."""
    from diffusers import DDPMScheduler
    config = dict(num_train_timesteps=1000, beta_schedule='squaredcos_cap_v2', variance_type='learned_range',
        thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5, clip_sample=True,
        clip_sample_range=1.0, prediction_type='epsilon')
    return DDPMScheduler(**dict(config, **overrides))
