"""Denoiser networks and their preconditioning, after EDM (Karras et al. 2022, Table 1 and App. F).

Architectures: DDPM++ / NCSN++ (`SongUNet`, Song et al. 2021) and ADM (`DhariwalUNet`, Dhariwal &
Nichol 2021), with EDM's module tree, so state dicts use EDM's names (`model.enc['32x32_conv'].weight`).
Their layers (gated convolutions included) live in `training.layers`.

Preconditioners (`EDMPrecond`, `VPPrecond`, `VEPrecond`, `iDDPMPrecond`, `DDPMPrecond`, `VDMPrecond`) compute
D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ)). For ambient models the input is
[Ã ⊙ x_σ, Ã] (2C channels) and D has C channels. As in the original, c_in scales all 2C input
channels, the mask included, so that the released checkpoints reproduce their outputs.

Ambient models choose how pixels hidden from the network (Ã = 0) are preconditioned (`hidden_precond`):
- 'original' (the original code; bit-exact for its checkpoints): the same c_skip(σ), c_out(σ) everywhere, so
  on a hidden pixel D = c_out(σ)·F and F must output x0/c_out ≈ x0/σ at small σ: a target whose variance
  grows like σd²/σ², which dominates the loss at small σ and is never learnt there.
- 'mask_aware' (ours, `mask_aware_coefficients`): per pixel c_skip = Ã·c_skip(σ) and
  c_out = Ã·c_out(σ) + (1 − Ã)·σd, with the loss weight λ = 1/c_out² per pixel (`training.loss`). F's
  target then has unit variance on both kinds of pixel. The coefficients depend on (Ã, σ) only, so the
  minimiser of the ambient loss is unchanged (Daras et al. 2023, Theorem 1): A is independent of x0
  given Ã, and a per-pixel weight that is a function of (Ã, σ) rescales each pixel's conditional risk
  without moving its minimum, E[x0 | Ã x_σ, Ã].

`cond_sigma_min` (0: off) tells the network F the noise level max(σ, cond_sigma_min) through c_noise, while
c_skip, c_out and c_in use the true σ. EDM's training σ is log-normal (ln σ ~ N(−1.2, 1.2²)), so the sampler's
last steps (σ = 0.002) give F a noise label four standard deviations outside what it was trained on. On
visible pixels that is harmless (D ≈ x there, F is scaled by c_out ≈ σ), but a mask-aware D on hidden pixels
is σd·F itself, and F's extrapolation in c_noise shows in full: the hidden-pixel error rises as σ falls. With
the floor, F at σ < cond_sigma_min sees a cleaner input than it was told, which it handles well.

Weights are initialised, and dropout / label dropout drawn, from PyTorch's default generator, like
any `torch.nn` module: seed it in the calling script to make a network reproducible.
"""
import math

import numpy as np
import torch

from training import vdm
from training.layers import (Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock, _check_gate,
                             _drop_labels)
from torch.nn.functional import silu

# ----------------------------------------------------------------------------
# Architectures.


class SongUNet(torch.nn.Module):
    """DDPM++ and NCSN++ (Song et al. 2021) as configured in EDM; returns F(x) with out_channels channels.

    DDPM++: embedding_type='positional', encoder_type='standard', resample_filter=[1,1].
    NCSN++: embedding_type='fourier', channel_mult_noise=2, encoder_type='residual', resample_filter=[1,3,3,1].
    """

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=128,
                 channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,), dropout=0.10,
                 label_dropout=0, embedding_type='positional', channel_mult_noise=1, encoder_type='standard',
                 decoder_type='standard', resample_filter=(1, 1), gate='none'):
        for name, value, allowed in [('embedding_type', embedding_type, ('positional', 'fourier')),
                                     ('encoder_type', encoder_type, ('standard', 'skip', 'residual')),
                                     ('decoder_type', decoder_type, ('standard', 'skip'))]:
            if value not in allowed:
                raise ValueError(f'SongUNet: {name}={value!r}; expected one of {", ".join(allowed)}')
        _check_gate(gate)
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        init_attn = dict(init_mode='xavier_uniform', init_weight=np.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5), eps=1e-6,
                            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                            init=init, init_zero=init_zero, init_attn=init_attn, gate=gate)

        # Mapping: noise level (+ class label, + augmentation label) -> embedding.
        if embedding_type == 'positional':
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, kernel=3, gate=gate, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == 'skip':
                    self.enc[f'{res}x{res}_aux_down'] = Conv2d(caux, caux, kernel=0, down=True, resample_filter=resample_filter)
                    self.enc[f'{res}x{res}_aux_skip'] = Conv2d(caux, cout, kernel=1, gate=gate, **init)
                if encoder_type == 'residual':
                    self.enc[f'{res}x{res}_aux_residual'] = Conv2d(caux, cout, kernel=3, down=True, resample_filter=resample_filter,
                                                                   fused_resample=True, gate=gate, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if 'aux' not in name]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if decoder_type == 'skip' or level == 0:
                if decoder_type == 'skip' and level < len(channel_mult) - 1:
                    self.dec[f'{res}x{res}_aux_up'] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(cout, eps=1e-6)
                self.dec[f'{res}x{res}_aux_conv'] = Conv2d(cout, out_channels, kernel=3, gate=gate, **init_zero)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # [sin, cos] order, as EDM
        if self.map_label is not None:
            labels = _drop_labels(class_labels, self.label_dropout, self.training, x.shape[0])
            emb = emb + self.map_label(labels * np.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = silu(self.map_layer1(emb))

        skips = []
        aux = x
        for name, block in self.enc.items():
            if 'aux_down' in name:
                aux = block(aux)
            elif 'aux_skip' in name:
                x = skips[-1] = x + block(aux)
            elif 'aux_residual' in name:
                x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        aux = None
        tmp = None
        for name, block in self.dec.items():
            if 'aux_up' in name:
                aux = block(aux)
            elif 'aux_norm' in name:
                tmp = block(x)
            elif 'aux_conv' in name:
                tmp = block(silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


class DhariwalUNet(torch.nn.Module):
    """ADM (Dhariwal & Nichol 2021) as configured in EDM; returns F(x) with out_channels channels."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=192,
                 channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3, attn_resolutions=(32, 16, 8),
                 dropout=0.10, label_dropout=0, gate='none'):
        _check_gate(gate)
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=np.sqrt(1 / 3), init_bias=np.sqrt(1 / 3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout,
                            init=init, init_zero=init_zero, gate=gate)

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode='kaiming_normal', init_weight=np.sqrt(label_dim))
                          if label_dim else None)

        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, kernel=3, gate=gate, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=(res in attn_resolutions), **block_kwargs)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, gate=gate, **init_zero)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(_drop_labels(class_labels, self.label_dropout, self.training, x.shape[0]))
        emb = silu(emb)

        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(silu(self.out_norm(x)))


ARCHITECTURES = {'SongUNet': SongUNet, 'DhariwalUNet': DhariwalUNet}

# ----------------------------------------------------------------------------
# Preconditioning (Karras et al. 2022, Table 1).


HIDDEN_PRECONDS = ('original', 'mask_aware')


def mask_aware_coefficients(c_skip, c_out, A_hat, hidden_sigma):
    """Per-pixel c_skip = Ã·c_skip(σ), c_out = Ã·c_out(σ) + (1 − Ã)·σ_hidden (mask-aware preconditioning).

    Where Ã = 1 these are the preconditioner's own coefficients; where Ã = 0 the pixel is not in the input,
    so D = σ_hidden·F there and F's target x0/σ_hidden has unit variance at every σ.
    """
    return A_hat * c_skip, A_hat * c_out + (1 - A_hat) * hidden_sigma


class _Precond(torch.nn.Module):
    """What the preconditioners share. Constructor arguments common to all of them:

    img_resolution, img_channels: input size; img_channels is 2C for ambient models ([image, mask]).
    label_dim: number of classes (0: unconditional).
    use_fp16: False, True / 'fp16' (float16, on CUDA; CPU runs float32) or 'bf16' (bfloat16, on any device:
        fast on CPUs with AVX512-BF16 or AMX, slower than float32 on CPUs without).
    model_type: 'SongUNet' (DDPM++/NCSN++) or 'DhariwalUNet' (ADM); model_kwargs go to it.
    out_channels: channels of the network F (default: the image's channels, C for ambient models).
    ambient: the input is [Ã ⊙ x, Ã]; D(x) then has the image's C channels.
    gated, gate: gate of every convolution; `gate` wins, else gated=True means 'sigmoid', else 'none'.
    hidden_precond: ambient models only: 'original' (default, the original's formulation) or 'mask_aware'
        (per-pixel coefficients from the mask channels, see the module docstring); hidden_sigma is the
        c_out of hidden pixels in 'mask_aware' (σd, the data's standard deviation).
    cond_sigma_min: c_noise is computed from max(σ, cond_sigma_min) (0: from σ; see the module docstring).
    sr_factor: super-resolution (SR3, Saharia et al. 2022): F also sees `condition`, the low-resolution image
        (1/sr_factor of the size) upsampled back, as C extra input channels after c_in·x, not scaled.

    Attributes: `model` (the network F), `denoised_channels` (channels of D(x)), `sigma_min`, `sigma_max`.
    """

    def __init__(self, img_resolution, img_channels, label_dim, use_fp16, model_type, out_channels, ambient,
                 gated, gate, hidden_precond='original', hidden_sigma=0.5, cond_sigma_min=0, sr_factor=None,
                 feature_channels=0, **model_kwargs):
        super().__init__()
        if not cond_sigma_min >= 0:
            raise ValueError(f'cond_sigma_min={cond_sigma_min}: expected a noise level >= 0 (0 turns the floor off)')
        if hidden_precond not in HIDDEN_PRECONDS:
            raise ValueError(f'hidden_precond={hidden_precond!r}: expected one of {", ".join(HIDDEN_PRECONDS)}')
        if hidden_precond != 'original' and not ambient:
            raise ValueError(f'hidden_precond={hidden_precond!r} needs an ambient network (ambient=True): a clean '
                'network sees every pixel')
        if model_type not in ARCHITECTURES:
            raise ValueError(f'model_type={model_type!r}: expected one of {", ".join(ARCHITECTURES)}')
        if use_fp16 not in (False, True, 'fp16', 'bf16'):
            raise ValueError(f"use_fp16={use_fp16!r}: expected False, True (float16), 'fp16' or 'bf16'")
        if ambient and img_channels % 2:
            raise ValueError(f'ambient=True needs img_channels = 2C ([image, mask]); got img_channels={img_channels}')
        if gate is None:
            gate = 'sigmoid' if gated else 'none'
        self.img_resolution = img_resolution
        self.img_channels = img_channels  # network input channels (2C for ambient models)
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.ambient = ambient
        self.hidden_precond = hidden_precond
        self.hidden_sigma = float(hidden_sigma)
        self.cond_sigma_min = float(cond_sigma_min)
        data_channels = img_channels // 2 if ambient else img_channels
        if sr_factor is not None and (isinstance(sr_factor, bool) or not isinstance(sr_factor, int) or sr_factor < 2
                                      or img_resolution % sr_factor):
            raise ValueError(f'sr_factor={sr_factor!r}: expected an integer >= 2 that divides img_resolution={img_resolution}')
        self.sr_factor = sr_factor
        self.condition_channels = data_channels if sr_factor else 0
        self.out_channels = out_channels if out_channels is not None else data_channels  # channels of F
        # D(x) has the image's channels; extra network outputs (a mask half, a learned variance) are unused.
        self.denoised_channels = min(self.out_channels, data_channels)
        self.gate = _check_gate(gate)
        self.model = ARCHITECTURES[model_type](
            img_resolution=img_resolution, in_channels=img_channels + feature_channels + self.condition_channels,
            label_dim=label_dim, gate=gate,
            out_channels=self.out_channels, **model_kwargs)

    def _cond_sigma(self, sigma):
        """The noise level F is told through c_noise: max(σ, cond_sigma_min)."""
        return sigma.clamp(min=self.cond_sigma_min) if self.cond_sigma_min > 0 else sigma

    def compute_dtype(self, device):
        """The precision F runs in on `device`: bfloat16 for use_fp16='bf16' (any device), float16 for
        use_fp16=True on CUDA, float32 otherwise."""
        if self.use_fp16 == 'bf16':
            return torch.bfloat16
        return torch.float16 if self.use_fp16 and torch.device(device).type == 'cuda' else torch.float32

    def _prepare(self, x, sigma, class_labels):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        if sigma.shape[0] == 1:
            sigma = sigma.expand(x.shape[0], 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([x.shape[0], self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        return x, sigma, class_labels

    def _denoise(self, x, c_skip, c_out, c_in, c_noise, class_labels, force_fp32, model_kwargs):
        """D = c_skip·x + c_out·F(c_in·x, c_noise), on the first `denoised_channels` channels."""
        dtype = torch.float32 if force_fp32 else self.compute_dtype(x.device)
        condition = model_kwargs.pop('condition', None)
        x_in = self._input_features(c_in * x)
        if (condition is None) != (not self.condition_channels):
            raise ValueError(f'this network takes a {self.condition_channels}-channel low-resolution condition '
                             '(sr_factor) and was called without one' if condition is None else
                             'this network takes no condition (it was not trained for super-resolution)')
        if condition is not None:
            x_in = torch.cat([x_in, condition.to(x_in.dtype).expand(x.shape[0], -1, -1, -1)], dim=1)
        F_x = self.model(x_in.to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        if F_x.dtype != dtype:
            raise RuntimeError(f'network returned {F_x.dtype}, expected {dtype}')
        n = self.denoised_channels
        if self.hidden_precond == 'mask_aware':
            A_hat = x[:, x.shape[1] // 2:][:, :n]  # [N, C, H, W] (a mask of fewer channels broadcasts)
            c_skip, c_out = mask_aware_coefficients(c_skip, c_out, A_hat, self.hidden_sigma)
        return c_skip * x[:, :n] + c_out * F_x[:, :n].to(torch.float32)

    def _input_features(self, x_in):
        """The network's input channels from c_in·x (the preconditioned input itself; `VDMPrecond` adds features)."""
        return x_in

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


def vp_sigma(t, beta_d, beta_min):
    """σ(t) = sqrt(exp(½β_d t² + β_min t) − 1) of the VP SDE (Song et al. 2021); expm1 keeps float32 exact for the
    small t near ε_t, where exp(·) − 1 loses about 2% at t = 1e-5."""
    t = torch.as_tensor(t)
    return torch.expm1(0.5 * beta_d * (t ** 2) + beta_min * t).sqrt()


class VPPrecond(_Precond):
    """Variance-preserving preconditioning (Song et al. 2021; EDM Table 1, "VP")."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, beta_d=19.9, beta_min=0.1, M=1000,
                 epsilon_t=1e-5, model_type='SongUNet', out_channels=None, ambient=False, gated=False, gate=None,
                 **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, out_channels, ambient,
                         gated, gate, **model_kwargs)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        self.sigma_min = float(self.sigma(torch.tensor(epsilon_t, dtype=torch.float64)))
        self.sigma_max = float(self.sigma(torch.tensor(1, dtype=torch.float64)))

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels = self._prepare(x, sigma, class_labels)
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(self._cond_sigma(sigma))
        return self._denoise(x, c_skip, c_out, c_in, c_noise, class_labels, force_fp32, model_kwargs)

    def sigma(self, t):
        return vp_sigma(t, self.beta_d, self.beta_min)

    def sigma_inv(self, sigma):
        """t(σ), the inverse of `sigma`."""
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * torch.log1p(sigma ** 2)).sqrt() - self.beta_min) / self.beta_d


class VEPrecond(_Precond):
    """Variance-exploding preconditioning (Song et al. 2021; EDM Table 1, "VE")."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0.02, sigma_max=100,
                 model_type='SongUNet', out_channels=None, ambient=False, gated=False, gate=None, **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, out_channels, ambient,
                         gated, gate, **model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels = self._prepare(x, sigma, class_labels)
        c_skip = 1
        c_out = sigma
        c_in = 1
        c_noise = (0.5 * self._cond_sigma(sigma)).log()
        return self._denoise(x, c_skip, c_out, c_in, c_noise, class_labels, force_fp32, model_kwargs)


class iDDPMPrecond(_Precond):
    """Improved DDPM preconditioning (Nichol & Dhariwal 2021; EDM Table 1, "iDDPM").

    The network predicts 2x the image channels by default (ε and a learned variance); only ε is used. σ is
    snapped to the nearest of the M discrete levels u_j and c_noise = M − 1 − j.
    """

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, C_1=0.001, C_2=0.008, M=1000,
                 model_type='DhariwalUNet', out_channels=None, ambient=False, gated=False, gate=None, **model_kwargs):
        if out_channels is None:
            out_channels = 2 * (img_channels // 2 if ambient else img_channels)
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, out_channels, ambient,
                         gated, gate, **model_kwargs)
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        u = torch.zeros(M + 1, dtype=torch.float64)
        for j in range(M, 0, -1):  # u_M = 0; u_{j-1} = sqrt((u_j² + 1) / max(ᾱ_{j-1}/ᾱ_j, C_1) − 1)
            ratio = max(self.alpha_bar(j - 1) / self.alpha_bar(j), C_1)
            u[j - 1] = math.sqrt((float(u[j]) ** 2 + 1) / ratio - 1)
        self.register_buffer('u', u.to(torch.float32))
        self.sigma_min = float(self.u[M - 1])
        self.sigma_max = float(self.u[0])

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels = self._prepare(x, sigma, class_labels)
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = self.M - 1 - self.round_sigma(self._cond_sigma(sigma), return_index=True).to(torch.float32)
        return self._denoise(x, c_skip, c_out, c_in, c_noise, class_labels, force_fp32, model_kwargs)

    def alpha_bar(self, j):
        """ᾱ_j = sin²(π j / (2 M (C_2 + 1)))."""
        return math.sin(0.5 * math.pi * j / self.M / (self.C_2 + 1)) ** 2

    def round_sigma(self, sigma, return_index=False):
        """Nearest level u_j to each σ (or its index j)."""
        sigma = torch.as_tensor(sigma)
        u = self.u.to(sigma.device)
        index = (sigma.to(torch.float32).reshape(-1, 1) - u.reshape(1, -1)).abs().argmin(dim=1)
        result = index if return_index else u[index].to(sigma.dtype)
        return result.reshape(sigma.shape)


BETA_SCHEDULES = ('linear', 'cosine')


def ddpm_alpha_bar(beta_schedule='linear', beta_start=1e-4, beta_end=0.02, T=1000):
    """ᾱ_t = Π_{s≤t}(1 − β_s), t = 1..T, float64 [T]: β linear from beta_start to beta_end (Ho et al. 2020), or
    the cosine schedule ᾱ_t = f(t)/f(0), f(t) = cos²((t/T + 0.008)/1.008 · π/2), β clipped at 0.999 (Nichol &
    Dhariwal 2021)."""
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f'beta_schedule={beta_schedule!r}: expected one of {", ".join(BETA_SCHEDULES)}')
    if isinstance(T, bool) or not isinstance(T, int) or T < 2:
        raise ValueError(f'T={T!r}: expected an integer number of diffusion steps >= 2')
    if beta_schedule == 'linear':
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(f'beta_start={beta_start}, beta_end={beta_end}: expected 0 < beta_start <= beta_end < 1')
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    else:
        f = lambda t: torch.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        t = torch.arange(T + 1, dtype=torch.float64)
        betas = (1 - f(t[1:]) / f(t[:-1])).clamp(max=0.999)
    return torch.cumprod(1 - betas, dim=0)


class DDPMPrecond(_Precond):
    """Discrete DDPM (Ho et al. 2020) as a preconditioner over the same networks: ε-prediction at the T levels
    σ_t = sqrt((1 − ᾱ_t)/ᾱ_t), x_σ = x_t/sqrt(ᾱ_t). D = x − σ·F(x/sqrt(σ² + 1); t − 1): c_in·x_σ is the VP x_t
    and F is ε̂. σ is snapped to the nearest level (`round_sigma`), whose index t − 1 is c_noise, so every
    sampler can use it; `discrete_sigmas` [T] (increasing) gives DDIM's skipped time grid.
    """

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, beta_schedule='linear',
                 beta_start=1e-4, beta_end=0.02, T=1000, model_type='SongUNet', out_channels=None, ambient=False,
                 gated=False, gate=None, **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, out_channels, ambient,
                         gated, gate, **model_kwargs)
        self.beta_schedule, self.beta_start, self.beta_end, self.T = beta_schedule, beta_start, beta_end, T
        alpha_bar = ddpm_alpha_bar(beta_schedule, beta_start, beta_end, T)
        self.register_buffer('discrete_sigmas', ((1 - alpha_bar) / alpha_bar).sqrt().to(torch.float32))
        self.sigma_min = float(self.discrete_sigmas[0])
        self.sigma_max = float(self.discrete_sigmas[-1])

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels = self._prepare(x, sigma, class_labels)
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = self.round_sigma(self._cond_sigma(sigma), return_index=True).to(torch.float32)
        return self._denoise(x, c_skip, c_out, c_in, c_noise, class_labels, force_fp32, model_kwargs)

    def round_sigma(self, sigma, return_index=False):
        """Nearest level σ_t to each σ (or its index t − 1), nearest in log σ."""
        sigma = torch.as_tensor(sigma)
        levels = self.discrete_sigmas.to(sigma.device).log()
        index = (sigma.to(torch.float32).clamp(min=1e-20).log().reshape(-1, 1) - levels.reshape(1, -1)).abs().argmin(dim=1)
        result = index if return_index else self.discrete_sigmas.to(sigma.device)[index].to(sigma.dtype)
        return result.reshape(sigma.shape)


class EDMPrecond(_Precond):
    """EDM preconditioning (Karras et al. 2022, Table 1): unit-variance input and target for every σ."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0, sigma_max=float('inf'),
                 sigma_data=0.5, model_type='DhariwalUNet', out_channels=None, ambient=False, gated=False, gate=None,
                 **model_kwargs):
        model_kwargs.setdefault('hidden_sigma', sigma_data)
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, out_channels, ambient,
                         gated, gate, **model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels = self._prepare(x, sigma, class_labels)
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = self._cond_sigma(sigma).log() / 4
        return self._denoise(x, c_skip, c_out, c_in, c_noise, class_labels, force_fp32, model_kwargs)


class VDMPrecond(_Precond):
    """Variational Diffusion Model (Kingma et al. 2021; `training.vdm`): ε-prediction over the same networks, with
    a noise schedule γ(t) (`schedule`, a `vdm.NoiseSchedule`: 'fixed_linear', 'learned_linear' or 'learned').

    As a denoiser in σ-form (every sampler): σ = exp(γ/2), D(x; σ) = x − σ·F(c_in·x; c_noise) with c_in =
    1/sqrt(1 + σ²) = α, so c_in·x_σ = z_t and F = ε̂; c_noise = 1000·(γ − gamma_min)/(gamma_max − gamma_min),
    γ rescaled by the configured range, for positional embeddings (DDPM++, ADM), and γ/2 = log σ for NCSN++'s
    random Fourier embedding. fourier_features: exponents n of VDM's Fourier input features (App. B),
    sin and cos of 2^n·π·z per channel, appended to z. σ_min, σ_max: exp(γ_0/2), exp(γ_1/2) of the schedule.

    forward(z, None, labels, gamma=γ) returns ε̂ [N, C, H, W]; forward(k, None, labels, vlb=dict(t=, noise=,
    noise_0=, T=, holder=)) returns the bound's terms for pixel values k (`vdm.vlb_terms`): the loss calls the
    network once, through DDP's forward, for the whole bound, the schedule included.
    """

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, schedule='fixed_linear',
                 gamma_min=-13.3, gamma_max=5.0, fourier_features=(), model_type='SongUNet', out_channels=None,
                 ambient=False, gated=False, gate=None, **model_kwargs):
        if ambient:
            raise ValueError('VDMPrecond is a likelihood model of clean 8-bit images; ambient=True is not available')
        fourier_features = tuple(int(n) for n in fourier_features)
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, out_channels, ambient,
                         gated, gate, feature_channels=2 * len(fourier_features) * img_channels, **model_kwargs)
        self.schedule = vdm.NoiseSchedule(schedule, gamma_min, gamma_max)
        self.gamma_min, self.gamma_max = float(gamma_min), float(gamma_max)
        self.fourier_features = fourier_features
        # NCSN++'s random Fourier embedding (scale 16) expects labels of order 1, as EDM's VE log(σ/2).
        self.fourier_noise_labels = model_kwargs.get('embedding_type') == 'fourier'

    @property
    def sigma_min(self):
        return math.exp(float(self.schedule.endpoints()[0].detach()) / 2)

    @property
    def sigma_max(self):
        return math.exp(float(self.schedule.endpoints()[1].detach()) / 2)

    def _input_features(self, x_in):
        if not self.fourier_features:
            return x_in
        freqs = torch.tensor([2.0 ** n * math.pi for n in self.fourier_features], dtype=x_in.dtype, device=x_in.device)
        h = (x_in[:, :, None] * freqs[None, None, :, None, None]).flatten(1, 2)
        return torch.cat([x_in, h.sin(), h.cos()], dim=1)

    def _c_noise(self, gamma):
        if self.fourier_noise_labels:
            return gamma / 2  # log σ
        return 1000 * (gamma - self.gamma_min) / (self.gamma_max - self.gamma_min)

    def forward(self, x, sigma=None, class_labels=None, force_fp32=False, gamma=None, vlb=None, **model_kwargs):
        if vlb is not None:
            eps = lambda z, g: self.forward(z, None, class_labels, force_fp32, gamma=g, **model_kwargs)  # noqa: E731
            return vdm.vlb_terms(eps, self.schedule, x, **vlb)
        if gamma is not None:
            z, _, class_labels = self._prepare(x, 1.0, class_labels)
            return self._denoise(z, 0, 1, 1, self._c_noise(gamma.reshape(-1)), class_labels, force_fp32, model_kwargs)
        x, sigma, class_labels = self._prepare(x, sigma, class_labels)
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        return self._denoise(x, 1, -sigma, c_in, self._c_noise(2 * sigma.log()), class_labels, force_fp32, model_kwargs)
