"""Layers of the denoiser networks, after EDM (Karras et al. 2022, App. F): EDM-initialised `Linear` and
`Conv2d`, `GroupNorm`, attention, the U-Net block and the noise embeddings.

Every convolution can be gated (Ambient Diffusion, Daras et al. 2023): y = conv(x, W) ⊙ g(conv(x, Wg)) + b
with g = sigmoid, or sigmoid∘sigmoid as in the original's released checkpoints. Eagerly, the gate runs as
one autograd Function over the concatenated [W; Wg] that keeps sigmoid(a) in place of the gate's
pre-activation a for backward and re-concatenates the weights there instead of saving a second copy; under
torch.compile it is written as plain ops, which inductor fuses.

Weights are initialised, and dropout drawn, from PyTorch's default generator, like any `torch.nn` module.
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


def _gated_product(y, bias, double_sigmoid):
    """h ⊙ g(a) (+ b) for y = [h; a] along channels."""
    c = y.shape[1] // 2
    h, a = y[:, :c], y[:, c:]
    g = torch.sigmoid(a)
    if double_sigmoid:
        g = torch.sigmoid(g)
    return h * g if bias is None else torch.addcmul(bias.reshape(1, -1, 1, 1), h, g)


class _GatedConv(torch.autograd.Function):
    """conv(x, W) ⊙ g(conv(x, Wg)) (+ b) as one convolution over [W; Wg] (stride 1).

    Forward overwrites the gate half a of y = conv(x, [W; Wg]) with s = sigmoid(a) and saves x, W, Wg and
    y = [h; s]: backward needs g = s (or sigmoid(s) for the double sigmoid) and g' = g(1 − g) (· s(1 − s)),
    so backward recomputes no sigmoid for the single sigmoid (one of two for the double) and saves nothing besides
    y that the unfused layer would not. [W; Wg] is
    re-concatenated in backward (cheap next to the convolution): autograd's own graph would also hold the
    gate, and a concatenated copy of the weights of every gated layer from forward to backward (0.4 GB for
    EDM's DDPM++ at 32x32).
    """

    @staticmethod
    def forward(ctx, x, weight, gate_weight, bias, padding, double_sigmoid):
        w = torch.cat([weight, gate_weight]).to(x.dtype)
        y = torch.nn.functional.conv2d(x, w, padding=padding)
        c = weight.shape[0]
        h, s = y[:, :c], y[:, c:].sigmoid_()
        g = torch.sigmoid(s) if double_sigmoid else s
        ctx.save_for_backward(x, weight, gate_weight, y)
        ctx.padding = padding
        ctx.double_sigmoid = double_sigmoid
        return h * g if bias is None else torch.addcmul(bias.reshape(1, -1, 1, 1), h, g)

    @staticmethod
    def backward(ctx, grad):
        x, weight, gate_weight, y = ctx.saved_tensors
        need_x, need_w, need_wg, need_b = ctx.needs_input_grad[:4]
        c = weight.shape[0]
        h, s = y[:, :c], y[:, c:]
        dg = torch.addcmul(s, s, s, value=-1)  # sigmoid' = s (1 - s)
        g = s
        if ctx.double_sigmoid:
            g = torch.sigmoid(s)
            dg.mul_(torch.addcmul(g, g, g, value=-1))
        grad_y = torch.empty_like(y)
        torch.mul(grad, g, out=grad_y[:, :c])
        torch.mul(grad * h, dg, out=grad_y[:, c:])
        grad_bias = grad.sum((0, 2, 3)) if need_b else None
        w = torch.cat([weight, gate_weight]).to(x.dtype)
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad_y, x, w, None, [1, 1], [ctx.padding, ctx.padding], [1, 1], False, [0, 0], 1,
            [need_x, need_w or need_wg, False])
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
