"""Denoiser networks and their preconditioning, after EDM (Karras et al. 2022, Table 1 and App. F).

Architectures: DDPM++ / NCSN++ (`SongUNet`, Song et al. 2021) and ADM (`DhariwalUNet`, Dhariwal &
Nichol 2021), with EDM's module tree, so state dicts use EDM's names (`model.enc['32x32_conv'].weight`).
Every convolution can be gated (Ambient Diffusion, Daras et al. 2023): y = conv(x, W) ⊙ g(conv(x, Wg)) + b
with g = sigmoid, or sigmoid∘sigmoid as in the original's released checkpoints.

Preconditioners (`EDMPrecond`, `VPPrecond`, `VEPrecond`, `iDDPMPrecond`) compute
D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ)). For ambient models the input is
[Ã ⊙ x_σ, Ã] (2C channels) and D has C channels. As in the original, c_in scales all 2C input
channels, the mask included, so that the released checkpoints reproduce their outputs.

Weights are initialised, and dropout / label dropout drawn, from PyTorch's default generator, like
any `torch.nn` module: seed it in the calling script to make a network reproducible.
"""

import math

import numpy as np
import torch
from torch.nn.functional import silu

GATES = ('none', 'sigmoid', 'double_sigmoid')

# ----------------------------------------------------------------------------
# Layers.


def weight_init(shape, mode, fan_in, fan_out):
    """Random tensor with EDM's initialisation `mode` (xavier/kaiming, uniform/normal)."""
    if mode == 'xavier_uniform':
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == 'xavier_normal':
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == 'kaiming_uniform':
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == 'kaiming_normal':
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f'init_mode={mode!r}: expected xavier_uniform, xavier_normal, kaiming_uniform or kaiming_normal')


def _check_gate(gate):
    if gate not in GATES:
        raise ValueError(f'gate={gate!r}: expected one of {", ".join(GATES)}')
    return gate


class Linear(torch.nn.Module):
    """Fully connected layer x·Wᵀ + b with EDM's initialisation; weights follow the input's dtype."""

    def __init__(self, in_features, out_features, bias=True, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = torch.nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), b)


def _gate(a, double_sigmoid):
    """g(a) and g'(a) for g = sigmoid or sigmoid∘sigmoid."""
    g = torch.sigmoid(a)
    dg = torch.addcmul(g, g, g, value=-1)  # sigmoid' = g (1 - g)
    if double_sigmoid:
        g = torch.sigmoid(g)
        dg = dg.mul_(torch.addcmul(g, g, g, value=-1))
    return g, dg


def _gated_product(y, bias, double_sigmoid):
    """h ⊙ g(a) (+ b) for y = [h; a] along channels."""
    c = y.shape[1] // 2
    h, a = y[:, :c], y[:, c:]
    g = torch.sigmoid(a)
    if double_sigmoid:
        g = torch.sigmoid(g)
    return h * g if bias is None else torch.addcmul(bias.reshape(1, -1, 1, 1), h, g)


def _gated_product_backward(y, grad, double_sigmoid, bias_grad):
    """Gradient of `_gated_product` with respect to y (and b)."""
    c = y.shape[1] // 2
    h, a = y[:, :c], y[:, c:]
    g, dg = _gate(a, double_sigmoid)
    grad_y = torch.empty_like(y)
    torch.mul(grad, g, out=grad_y[:, :c])
    torch.mul(grad * h, dg, out=grad_y[:, c:])
    return grad_y, (grad.sum((0, 2, 3)) if bias_grad else None)


class _GatedConv(torch.autograd.Function):
    """conv(x, W) ⊙ g(conv(x, Wg)) (+ b) as one convolution over [W; Wg] (stride 1).

    Saves x, W, Wg and y = conv(x, [W; Wg]), and recomputes the gate and the concatenation in backward (cheap
    next to the convolution). Autograd's own graph would also hold the gate, and a concatenated copy of the
    weights of every gated layer from forward to backward (0.4 GB for EDM's DDPM++ at 32x32).
    """

    @staticmethod
    def forward(ctx, x, weight, gate_weight, bias, padding, double_sigmoid):
        w = torch.cat([weight, gate_weight]).to(x.dtype)
        y = torch.nn.functional.conv2d(x, w, padding=padding)
        ctx.save_for_backward(x, weight, gate_weight, y)
        ctx.padding = padding
        ctx.double_sigmoid = double_sigmoid
        return _gated_product(y, bias, double_sigmoid)

    @staticmethod
    def backward(ctx, grad):
        x, weight, gate_weight, y = ctx.saved_tensors
        need_x, need_w, need_wg, need_b = ctx.needs_input_grad[:4]
        grad_y, grad_bias = _gated_product_backward(y, grad, ctx.double_sigmoid, need_b)
        w = torch.cat([weight, gate_weight]).to(x.dtype)
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad_y, x, w, None, [1, 1], [ctx.padding, ctx.padding], [1, 1], False, [0, 0], 1,
            [need_x, need_w or need_wg, False])
        c = weight.shape[0]
        grad_weight = grad_w[:c].to(weight.dtype) if need_w else None
        grad_gate = grad_w[c:].to(gate_weight.dtype) if need_wg else None
        return grad_x, grad_weight, grad_gate, grad_bias, None, None


class Conv2d(torch.nn.Module):
    """2-D convolution with optional 2x up/down-sampling by a separable FIR filter, and optional gating.

    kernel=0 gives a pure resampling layer (no weights). With `gate` other than 'none' the layer has a
    `gate_weight` shaped and initialised like `weight` (no gate bias), and computes
    conv(x, W) ⊙ g(conv(x, Wg)) + b as one convolution over [W; Wg] whose output channels are split.
    """

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False, resample_filter=(1, 1),
                 fused_resample=False, init_mode='kaiming_normal', init_weight=1, init_bias=0, gate='none'):
        if up and down:
            raise ValueError('Conv2d: up=True and down=True together; choose at most one')
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        self.gate = _check_gate(gate)
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        shape = [out_channels, in_channels, kernel, kernel]
        self.weight = torch.nn.Parameter(weight_init(shape, **fans) * init_weight) if kernel else None
        self.bias = torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        gated = kernel and gate != 'none'
        self.gate_weight = torch.nn.Parameter(weight_init(shape, **fans) * init_weight) if gated else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = torch.outer(f, f)[None, None] / f.sum().square()  # [1, 1, k, k], sums to 1
        self.register_buffer('resample_filter', f if up or down else None)

    def _conv(self, x, w, padding, bias):
        """conv(x, W) (+ b) with w = W in x's dtype, or, gated, conv(x, W) ⊙ g(conv(x, Wg)) (+ b) (w unused)."""
        if self.gate_weight is None:
            return torch.nn.functional.conv2d(x, w, bias, padding=padding)
        double_sigmoid = self.gate == 'double_sigmoid'
        if torch.compiler.is_compiling():
            # Plain ops for torch.compile: it fuses them and picks what to save for backward itself.
            w = torch.cat([self.weight, self.gate_weight]).to(x.dtype)
            return _gated_product(torch.nn.functional.conv2d(x, w, padding=padding), bias, double_sigmoid)
        return _GatedConv.apply(x, self.weight, self.gate_weight, bias, padding, double_sigmoid)

    def forward(self, x):
        w = self.weight
        if w is not None and self.gate_weight is None:
            w = w.to(x.dtype)
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0

        if self.fused_resample and self.up and w is not None:
            # EDM's corrected padding (NVlabs/edm b2a26c9): output is exactly 2x the input size.
            x = torch.nn.functional.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]),
                                                     groups=self.in_channels, stride=2, padding=max(f_pad - w_pad, 0))
            return self._conv(x, w, max(w_pad - f_pad, 0), b)
        if self.fused_resample and self.down and w is not None:
            x = self._conv(x, w, w_pad + f_pad, None)
            x = torch.nn.functional.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
            return x if b is None else x + b.reshape(1, -1, 1, 1)
        if self.up:
            x = torch.nn.functional.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]),
                                                     groups=self.in_channels, stride=2, padding=f_pad)
        if self.down:
            x = torch.nn.functional.conv2d(x, f.tile([self.in_channels, 1, 1, 1]),
                                           groups=self.in_channels, stride=2, padding=f_pad)
        if w is not None:
            return self._conv(x, w, w_pad, b)
        return x if b is None else x + b.reshape(1, -1, 1, 1)


class GroupNorm(torch.nn.Module):
    """Group normalisation with min(num_groups, C // min_channels_per_group) groups (EDM)."""

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return torch.nn.functional.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def attention(q, k, v):
    """Single-head attention v·softmax(qᵀk/√c)ᵀ in EDM's layout: q, k, v [N, c, L] -> [N, c, L].

    Uses `scaled_dot_product_attention`. fp16/bf16 inputs are computed in float32 off CUDA; on CUDA
    the fused kernels already accumulate the softmax in float32.
    """
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [N, L, c]
    if q.dtype in (torch.float16, torch.bfloat16) and q.device.type != 'cuda':
        out = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2)


class UNetBlock(torch.nn.Module):
    """Residual block with optional up/down-sampling and self-attention, as in EDM (DDPM++/NCSN++/ADM)."""

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=None, channels_per_head=64, dropout=0, skip_scale=1, eps=1e-5, resample_filter=(1, 1),
                 resample_proj=False, adaptive_scale=True, init=None, init_zero=None, init_attn=None, gate='none'):
        super().__init__()
        init = init or {}
        init_zero = init_zero if init_zero is not None else dict(init_weight=0)
        init_attn = init_attn if init_attn is not None else init
        resample = dict(up=up, down=down, resample_filter=resample_filter)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.num_heads = 0 if not attention else num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = float(skip_scale)
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, gate=gate, **resample, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, gate=gate, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, gate=gate, **resample, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, gate=gate, **init_attn)
            self.proj = Conv2d(out_channels, out_channels, kernel=1, gate=gate, **init_zero)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(silu(self.norm0(x)))
        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)  # [B, C or 2C, 1, 1]
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = silu(self.norm1(x.add_(params)))
        x = self.conv1(torch.nn.functional.dropout(x, p=self.dropout, training=self.training))
        x = x.add_(self.skip(orig) if self.skip is not None else orig)
        if self.skip_scale != 1:
            x = x.mul_(self.skip_scale)
        if self.num_heads:
            # EDM's channel layout of qkv: [heads, c, (q, k, v)], so released weights keep their meaning.
            qkv = self.qkv(self.norm2(x)).reshape(x.shape[0] * self.num_heads, x.shape[1] // self.num_heads, 3, -1)
            a = attention(*qkv.unbind(2))  # [B * heads, c, H * W]
            x = self.proj(a.reshape(*x.shape)).add_(x)
            if self.skip_scale != 1:
                x = x.mul_(self.skip_scale)
        return x


class PositionalEmbedding(torch.nn.Module):
    """Transformer sinusoidal embedding [cos(x·f_i), sin(x·f_i)], f_i = (1/max_positions)^(i/(C/2 - endpoint))."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(torch.nn.Module):
    """Random Fourier features [cos(2π x f), sin(2π x f)] with fixed f ~ N(0, scale²) (buffer `freqs`)."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = torch.outer(x, (2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


def _drop_labels(class_labels, label_dropout, training, batch_size):
    """Zero each sample's label with probability `label_dropout` while training (classifier-free guidance)."""
    if not (training and label_dropout):
        return class_labels
    keep = torch.rand([batch_size, 1], device=class_labels.device) >= label_dropout
    return class_labels * keep.to(class_labels.dtype)


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


class _Precond(torch.nn.Module):
    """What the preconditioners share. Constructor arguments common to all of them:

    img_resolution, img_channels: input size; img_channels is 2C for ambient models ([image, mask]).
    label_dim: number of classes (0: unconditional).
    use_fp16: False, True / 'fp16' (float16) or 'bf16' (bfloat16); applies on CUDA only, CPU runs float32.
    model_type: 'SongUNet' (DDPM++/NCSN++) or 'DhariwalUNet' (ADM); model_kwargs go to it.
    out_channels: channels of the network F (default: the image's channels, C for ambient models).
    ambient: the input is [Ã ⊙ x, Ã]; D(x) then has the image's C channels.
    gated, gate: gate of every convolution; `gate` wins, else gated=True means 'sigmoid', else 'none'.

    Attributes: `model` (the network F), `denoised_channels` (channels of D(x)), `sigma_min`, `sigma_max`.
    """

    def __init__(self, img_resolution, img_channels, label_dim, use_fp16, model_type, out_channels, ambient,
                 gated, gate, **model_kwargs):
        super().__init__()
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
        data_channels = img_channels // 2 if ambient else img_channels
        self.out_channels = out_channels if out_channels is not None else data_channels  # channels of F
        # D(x) has the image's channels; extra network outputs (a mask half, a learned variance) are unused.
        self.denoised_channels = min(self.out_channels, data_channels)
        self.gate = _check_gate(gate)
        self.model = ARCHITECTURES[model_type](
            img_resolution=img_resolution, in_channels=img_channels, label_dim=label_dim, gate=gate,
            out_channels=self.out_channels, **model_kwargs)

    def _compute_dtype(self, x, force_fp32):
        if not self.use_fp16 or force_fp32 or x.device.type != 'cuda':
            return torch.float32
        return torch.bfloat16 if self.use_fp16 == 'bf16' else torch.float16

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
        dtype = self._compute_dtype(x, force_fp32)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        if F_x.dtype != dtype:
            raise RuntimeError(f'network returned {F_x.dtype}, expected {dtype}')
        n = self.denoised_channels
        return c_skip * x[:, :n] + c_out * F_x[:, :n].to(torch.float32)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


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
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return self._denoise(x, c_skip, c_out, c_in, c_noise, class_labels, force_fp32, model_kwargs)

    def sigma(self, t):
        """σ(t) = sqrt(exp(½β_d t² + β_min t) − 1) (expm1: exact for the small t near ε_t)."""
        t = torch.as_tensor(t)
        return torch.expm1(0.5 * self.beta_d * (t ** 2) + self.beta_min * t).sqrt()

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
        c_noise = (0.5 * sigma).log()
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
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
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


class EDMPrecond(_Precond):
    """EDM preconditioning (Karras et al. 2022, Table 1): unit-variance input and target for every σ."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0, sigma_max=float('inf'),
                 sigma_data=0.5, model_type='DhariwalUNet', out_channels=None, ambient=False, gated=False, gate=None,
                 **model_kwargs):
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
        c_noise = sigma.log() / 4
        return self._denoise(x, c_skip, c_out, c_in, c_noise, class_labels, force_fp32, model_kwargs)
