"""Tests for training/networks.py: layers, gated convolutions, architectures, preconditioning, checkpoint names."""

import importlib.util
import math
import os

import numpy as np
import pytest
import torch

from training import layers
from training.layers import Conv2d, GroupNorm, UNetBlock, attention
from training.networks import DhariwalUNet, EDMPrecond, SongUNet, VEPrecond, VPPrecond, iDDPMPrecond

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0)
ARCHS = {
    'ddpmpp': dict(model_type='SongUNet', **TINY),
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', channel_mult_noise=2, encoder_type='residual',
                   resample_filter=[1, 3, 3, 1], **TINY),
    'skip': dict(model_type='SongUNet', encoder_type='skip', decoder_type='skip', **TINY),
    'adm': dict(model_type='DhariwalUNet', **TINY),
}


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=seeded(seed), dtype=dtype)


def randomize_convs(net, seed=0):
    """Replace the (near-)zero initialisation of output convs by unit-gain random weights, so F is O(1)."""
    gen = seeded(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, Conv2d) and module.weight is not None:
                for w in (module.weight, module.gate_weight):
                    if w is not None:
                        w.copy_(torch.randn(w.shape, generator=gen) / math.sqrt(w[0].numel()))
    return net


def build(precond=EDMPrecond, arch='ddpmpp', resolution=16, img_channels=3, seed=0, **kwargs):
    torch.manual_seed(seed)
    return precond(resolution, img_channels, **{**ARCHS[arch], **kwargs})


# ----------------------------------------------------------------------------
# Gated convolution: one convolution over [W; Wg] equals the two-convolution formula.


def reference_conv(layer, x):
    """Conv2d written out with two separate convolutions for W and Wg (the original's formulation)."""
    F = torch.nn.functional
    w, wg, b = layer.weight, layer.gate_weight, layer.bias
    f = layer.resample_filter
    k = w.shape[-1] if w is not None else 0
    w_pad, f_pad = k // 2, (f.shape[-1] - 1) // 2 if f is not None else 0
    c_in, c_out = layer.in_channels, layer.out_channels

    def gated(x, padding):
        y = F.conv2d(x, w, padding=padding)
        if wg is None:
            return y
        g = torch.sigmoid(F.conv2d(x, wg, padding=padding))
        return y * (torch.sigmoid(g) if layer.gate == 'double_sigmoid' else g)

    def add_bias(y):
        return y if b is None else y + b.reshape(1, -1, 1, 1)

    if layer.fused_resample and layer.up and w is not None:
        x = F.conv_transpose2d(x, 4 * f.repeat(c_in, 1, 1, 1), groups=c_in, stride=2, padding=max(f_pad - w_pad, 0))
        return add_bias(gated(x, max(w_pad - f_pad, 0)))
    if layer.fused_resample and layer.down and w is not None:
        y = gated(x, w_pad + f_pad)
        return add_bias(F.conv2d(y, f.repeat(c_out, 1, 1, 1), groups=c_out, stride=2))
    if layer.up:
        x = F.conv_transpose2d(x, 4 * f.repeat(c_in, 1, 1, 1), groups=c_in, stride=2, padding=f_pad)
    if layer.down:
        x = F.conv2d(x, f.repeat(c_in, 1, 1, 1), groups=c_in, stride=2, padding=f_pad)
    return add_bias(gated(x, w_pad)) if w is not None else add_bias(x)


CONV_CASES = [
    dict(kernel=3), dict(kernel=1), dict(kernel=3, bias=False),
    dict(kernel=3, up=True), dict(kernel=3, down=True), dict(kernel=1, down=True), dict(kernel=0, down=True),
    dict(kernel=3, down=True, fused_resample=True), dict(kernel=3, up=True, fused_resample=True),
    dict(kernel=3, up=True, resample_filter=[1, 3, 3, 1]), dict(kernel=3, down=True, resample_filter=[1, 3, 3, 1]),
    dict(kernel=3, down=True, fused_resample=True, resample_filter=[1, 3, 3, 1]),
    dict(kernel=3, up=True, fused_resample=True, resample_filter=[1, 3, 3, 1]),
    dict(kernel=1, up=True, fused_resample=True, resample_filter=[1, 3, 3, 1]),
]


@pytest.mark.parametrize('gate', ['none', 'sigmoid', 'double_sigmoid'])
@pytest.mark.parametrize('case', CONV_CASES, ids=lambda c: '-'.join(f'{k}={v}' for k, v in c.items()))
def test_gated_conv_equals_two_convolutions(gate, case):
    torch.manual_seed(1)
    c_in = 4 if case['kernel'] else 5
    c_out = 6 if case['kernel'] else 5
    layer = Conv2d(c_in, c_out, init_bias=0.3, gate=gate, **case)
    x = randn(2, c_in, 8, 8).requires_grad_(True)
    y = layer(x)
    expected = reference_conv(layer, x)
    size = 16 if case.get('up') else 4 if case.get('down') else 8
    assert y.shape == (2, c_out, size, size)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    # The gradients agree as well (the split of the concatenated weights is differentiable).
    gy = randn(*y.shape, seed=3)
    inputs = [x] + [p for p in (layer.weight, layer.gate_weight, layer.bias) if p is not None]
    grads = torch.autograd.grad(y, inputs, gy)
    expected_grads = torch.autograd.grad(reference_conv(layer, x), inputs, gy)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)



@pytest.mark.slow
@pytest.mark.parametrize('gate', ['sigmoid', 'double_sigmoid'])
@pytest.mark.parametrize('case', [dict(kernel=3), dict(kernel=3, bias=False), dict(kernel=3, up=True),
                                  dict(kernel=3, down=True, fused_resample=True)],
                         ids=lambda c: '-'.join(f'{k}={v}' for k, v in c.items()))
def test_gated_conv_under_torch_compile(gate, case):
    """The plain-op path taken while compiling gives the eager layer's output and gradients, in one graph."""
    torch._dynamo.reset()  # each case compiles afresh instead of running eager past the recompile limit
    torch.manual_seed(1)
    layer = Conv2d(4, 6, init_bias=0.3, gate=gate, **case)
    x = randn(2, 4, 8, 8).requires_grad_(True)
    params = [p for p in (layer.weight, layer.gate_weight, layer.bias) if p is not None]
    compiled = torch.compile(layer, backend='aot_eager', fullgraph=True)
    y, y_eager = compiled(x), layer(x)
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-6)
    gy = randn(*y.shape, seed=3)
    for g, e in zip(torch.autograd.grad(y, [x, *params], gy), torch.autograd.grad(y_eager, [x, *params], gy)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)

@pytest.mark.parametrize('double_sigmoid', [False, True])
def test_gated_conv_gradcheck(double_sigmoid):
    x = randn(2, 3, 5, 5, dtype=torch.float64).requires_grad_(True)
    weight = randn(2, 3, 3, 3, seed=1, dtype=torch.float64).requires_grad_(True)
    gate_weight = randn(2, 3, 3, 3, seed=2, dtype=torch.float64).requires_grad_(True)
    bias = randn(2, seed=3, dtype=torch.float64).requires_grad_(True)
    conv = layers._GatedConv.apply
    assert torch.autograd.gradcheck(lambda *a: conv(*a, 1, double_sigmoid), (x, weight, gate_weight, bias))
    assert torch.autograd.gradcheck(lambda *a: conv(*a, None, 0, double_sigmoid), (x, weight, gate_weight))
    # Without an input gradient (the first layer), the weights still get theirs.
    y = conv(x.detach(), weight, gate_weight, None, 1, double_sigmoid)
    gw, gwg = torch.autograd.grad(y.sum(), (weight, gate_weight))
    expected = torch.autograd.grad(conv(x, weight, gate_weight, None, 1, double_sigmoid).sum(), (weight, gate_weight))
    torch.testing.assert_close(gw, expected[0])
    torch.testing.assert_close(gwg, expected[1])


def test_conv_matches_plain_torch_ops():
    """Ungated paths against torch's own layers: conv2d, and nearest-up / average-pool for the [1,1] filter."""
    torch.manual_seed(0)
    x = randn(2, 3, 8, 8)
    F = torch.nn.functional
    plain = Conv2d(3, 5, kernel=3, init_bias=1)
    torch.testing.assert_close(plain(x), F.conv2d(x, plain.weight, plain.bias, padding=1))
    up = Conv2d(3, 5, kernel=3, up=True, init_bias=1)
    expected = F.conv2d(F.interpolate(x, scale_factor=2, mode='nearest'), up.weight, up.bias, padding=1)
    torch.testing.assert_close(up(x), expected, rtol=1e-5, atol=1e-6)
    down = Conv2d(3, 5, kernel=1, down=True, init_bias=1)
    torch.testing.assert_close(down(x), F.conv2d(F.avg_pool2d(x, 2), down.weight, down.bias), rtol=1e-5, atol=1e-6)


def test_gate_parameters_and_init():
    torch.manual_seed(0)
    layer = Conv2d(4, 8, kernel=3, gate='sigmoid', init_mode='xavier_uniform', init_weight=2)
    assert layer.gate_weight.shape == layer.weight.shape == (8, 4, 3, 3)
    bound = 2 * math.sqrt(6 / (4 * 9 + 8 * 9))
    for w in (layer.weight, layer.gate_weight):
        assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound
    assert not torch.equal(layer.weight, layer.gate_weight)  # drawn independently
    zero = Conv2d(4, 8, kernel=3, gate='sigmoid', init_weight=0)
    assert torch.count_nonzero(zero.gate_weight) == 0
    assert Conv2d(4, 8, kernel=3).gate_weight is None
    assert Conv2d(4, 4, kernel=0, down=True, gate='sigmoid').gate_weight is None
    assert 'gate_bias' not in dict(layer.named_parameters())
    with pytest.raises(ValueError, match='gate'):
        Conv2d(4, 8, kernel=3, gate='tanh')


@pytest.mark.parametrize('gate, low, high', [('sigmoid', 0, 1), ('double_sigmoid', 0.5, 1 / (1 + math.exp(-1)))])
def test_gate_values(gate, low, high):
    """With W = identity (1x1) and no bias, y / x is the gate itself: g(Wg x), within its range."""
    torch.manual_seed(0)
    layer = Conv2d(4, 4, kernel=1, bias=False, gate=gate)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(4)[:, :, None, None])
        layer.gate_weight.mul_(3)  # spread the gate over most of its range
    x = randn(2, 4, 8, 8).abs() + 0.5
    gate_values = layer(x) / x
    pre = torch.nn.functional.conv2d(x.double(), layer.gate_weight.double())
    expected = torch.sigmoid(pre) if gate == 'sigmoid' else torch.sigmoid(torch.sigmoid(pre))
    torch.testing.assert_close(gate_values.double(), expected, rtol=1e-5, atol=1e-6)
    assert gate_values.min() > low and gate_values.max() < high
    assert gate_values.min() < low + 0.05 and gate_values.max() > high - 0.05


# ----------------------------------------------------------------------------
# Attention and blocks.


def reference_attention(q, k, v):
    """softmax(qᵀk/√c) in float64, applied to v; q, k, v [N, c, L]."""
    q, k, v = q.double(), k.double(), v.double()
    w = torch.einsum('ncq,nck->nqk', q, k / math.sqrt(q.shape[1])).softmax(dim=2)
    return torch.einsum('nqk,nck->ncq', w, v)


def test_attention_matches_explicit_softmax():
    q, k, v = randn(3, 8, 20, seed=1) * 3, randn(3, 8, 20, seed=2) * 3, randn(3, 8, 20, seed=3)
    out = attention(q, k, v)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference_attention(q, k, v), rtol=1e-5, atol=1e-5)
    for dtype, tol in [(torch.bfloat16, 3e-2), (torch.float16, 3e-3)]:
        low = attention(q.to(dtype), k.to(dtype), v.to(dtype))
        assert low.dtype == dtype
        expected = reference_attention(q.to(dtype), k.to(dtype), v.to(dtype))
        torch.testing.assert_close(low.double(), expected, rtol=tol, atol=tol)


def test_multi_head_layout():
    """qkv channels are laid out [head, c, (q, k, v)] as in EDM; heads attend independently."""
    torch.manual_seed(0)
    block = UNetBlock(16, 16, emb_channels=8, attention=True, num_heads=2, init_zero=dict(init_weight=1)).eval()
    seen = {}
    block.qkv.register_forward_hook(lambda m, i, o: seen.__setitem__('qkv', o))
    block.proj.register_forward_pre_hook(lambda m, i: seen.__setitem__('proj_in', i[0]))
    block(randn(2, 16, 4, 4), randn(2, 8, seed=1))
    qkv = seen['qkv'].reshape(2, 2, 8, 3, 16)  # [B, heads, c, (q, k, v), H * W]
    heads = [reference_attention(qkv[:, h, :, 0], qkv[:, h, :, 1], qkv[:, h, :, 2]) for h in range(2)]
    expected = torch.stack(heads, dim=1).reshape(2, 16, 4, 4)
    torch.testing.assert_close(seen['proj_in'].double(), expected, rtol=1e-5, atol=1e-5)


def reference_block(block, x, emb):
    """UNetBlock written out from EDM's description, with float64 attention."""
    silu = torch.nn.functional.silu
    h = block.conv0(silu(block.norm0(x)))
    params = block.affine(emb)[:, :, None, None]
    if block.adaptive_scale:
        scale, shift = params.chunk(2, dim=1)
        h = silu(shift + block.norm1(h) * (scale + 1))
    else:
        h = silu(block.norm1(h + params))
    h = block.conv1(h)
    h = (h + (block.skip(x) if block.skip is not None else x)) * block.skip_scale
    if block.num_heads:
        B, C, H, W = h.shape
        qkv = block.qkv(block.norm2(h)).reshape(B * block.num_heads, C // block.num_heads, 3, H * W)
        a = reference_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]).float().reshape(B, C, H, W)
        h = (block.proj(a) + h) * block.skip_scale
    return h


@pytest.mark.parametrize('kwargs', [
    dict(in_channels=8, out_channels=16, down=True, attention=True, num_heads=1, skip_scale=math.sqrt(0.5), eps=1e-6,
         resample_proj=True, adaptive_scale=False),  # DDPM++ style
    dict(in_channels=16, out_channels=16, up=True, attention=True, channels_per_head=8, adaptive_scale=True),  # ADM style
    dict(in_channels=16, out_channels=16, skip_scale=0.5, adaptive_scale=False, gate='sigmoid'),  # identity skip
], ids=['ddpmpp', 'adm', 'identity-skip'])
def test_unet_block_matches_formula(kwargs):
    torch.manual_seed(0)
    block = UNetBlock(emb_channels=8, init_zero=dict(init_weight=1), **kwargs).eval()
    x, emb = randn(2, kwargs['in_channels'], 8, 8), randn(2, 8, seed=1)
    torch.testing.assert_close(block(x, emb), reference_block(block, x, emb), rtol=1e-4, atol=1e-5)


def capture(seen, modules, outputs=(), inputs=()):
    """Forward hooks recording the outputs / first inputs of the named modules into `seen`."""
    for name in outputs:
        modules[name].register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
    for name in inputs:
        modules[name].register_forward_pre_hook(lambda m, i, name=name: seen.__setitem__(name + ':in', i[0]))
    return seen


def test_residual_and_skip_encoders_and_skip_decoder():
    x, sigma = randn(2, 3, 16, 16), torch.tensor([0.5, 2.0])
    residual = randomize_convs(build(arch='ncsnpp').eval())
    seen = capture({}, residual.model.enc, outputs=['8x8_down', '8x8_aux_residual'], inputs=['8x8_block0'])
    residual(x, sigma)
    torch.testing.assert_close(seen['8x8_block0:in'], (seen['8x8_down'] + seen['8x8_aux_residual']) / math.sqrt(2))

    skip = randomize_convs(build(arch='skip').eval())
    seen = capture({}, skip.model.enc, outputs=['8x8_down', '8x8_aux_skip', '8x8_aux_down'], inputs=['8x8_block0'])
    capture(seen, skip.model.dec, outputs=['8x8_aux_conv', '16x16_aux_conv', '16x16_aux_up'], inputs=['16x16_aux_up'])
    F_out = skip.model(x, torch.log(sigma) / 4)
    torch.testing.assert_close(seen['8x8_block0:in'], seen['8x8_down'] + seen['8x8_aux_skip'])
    torch.testing.assert_close(seen['8x8_aux_down'], torch.nn.functional.avg_pool2d(x, 2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen['16x16_aux_up:in'], seen['8x8_aux_conv'])
    torch.testing.assert_close(F_out, seen['16x16_aux_conv'] + seen['16x16_aux_up'])


def test_group_norm_groups():
    assert GroupNorm(256).num_groups == 32
    assert GroupNorm(16).num_groups == 4
    x = randn(2, 16, 4, 4) * 3 + 1
    y = GroupNorm(16, eps=0)(x).double().reshape(2, 4, -1)
    torch.testing.assert_close(y.mean(-1), torch.zeros(2, 4, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(2, 4, dtype=torch.float64), atol=1e-4, rtol=0)


def test_embeddings():
    x = torch.tensor([0.0, 1.5, -2.0])
    pos = layers.PositionalEmbedding(8, endpoint=True)(x).double()
    freqs = (1 / 10000) ** (np.arange(4) / 3)
    angles = np.outer(x.numpy(), freqs)
    np.testing.assert_allclose(pos.numpy(), np.concatenate([np.cos(angles), np.sin(angles)], 1), rtol=1e-5, atol=1e-6)
    assert len(layers.PositionalEmbedding(8).state_dict()) == 0
    torch.manual_seed(0)
    fourier = layers.FourierEmbedding(8)
    assert list(fourier.state_dict()) == ['freqs'] and 8 < fourier.freqs.std() * 4 < 200
    angles = 2 * np.pi * np.outer(x.numpy(), fourier.freqs.double().numpy())
    np.testing.assert_allclose(fourier(x).double().numpy(), np.concatenate([np.cos(angles), np.sin(angles)], 1),
                               rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------
# Architectures.


@pytest.mark.parametrize('arch', ['ddpmpp', 'adm'])
def test_noise_embedding_conventions(arch):
    """What map_layer0 / map_label see: DDPM++ swaps to [sin, cos] (endpoint freqs) and scales one-hot labels
    by √label_dim; ADM keeps [cos, sin] (no endpoint) and feeds labels as they are."""
    net = build(arch=arch, label_dim=4).eval()
    seen = {}
    net.model.map_layer0.register_forward_pre_hook(lambda m, i: seen.__setitem__('layer0', i[0]))
    net.model.map_label.register_forward_pre_hook(lambda m, i: seen.__setitem__('label', i[0]))
    sigma = np.array([0.01, 0.7, 30.0])
    labels = torch.eye(4)[:3]
    net.model.map_label.weight.data.zero_()  # no label contribution, so layer0 sees the pure noise embedding
    net(randn(3, 3, 16, 16), torch.tensor(sigma, dtype=torch.float32), labels)
    c_noise = np.log(sigma) / 4
    half = 8
    if arch == 'ddpmpp':
        angles = np.outer(c_noise, (1 / 10000) ** (np.arange(half) / (half - 1)))
        expected = np.concatenate([np.sin(angles), np.cos(angles)], 1)
        label_scale = 2.0
    else:
        angles = np.outer(c_noise, (1 / 10000) ** (np.arange(half) / half))
        expected = np.concatenate([np.cos(angles), np.sin(angles)], 1)
        label_scale = 1.0
    np.testing.assert_allclose(seen['layer0'].detach().double().numpy(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen['label'], labels * label_scale)


@pytest.mark.parametrize('arch', list(ARCHS))
@pytest.mark.parametrize('resolution', [16, 32])
def test_forward_shapes(arch, resolution):
    extra = dict(attn_resolutions=[8, 16]) if resolution == 32 else {}
    x = randn(2, 6, resolution, resolution)
    sigma = torch.tensor([0.3, 4.0])
    ambient = build(arch=arch, resolution=resolution, img_channels=6, ambient=True, gated=True, **extra)
    assert ambient.out_channels == ambient.denoised_channels == 3
    assert ambient(x, sigma).shape == (2, 3, resolution, resolution)
    original = build(arch=arch, resolution=resolution, img_channels=6, out_channels=6, ambient=True,
                     gate='double_sigmoid', label_dim=4, augment_dim=9, **extra)
    assert original.denoised_channels == 3  # the network's mask half is not used
    labels = torch.nn.functional.one_hot(torch.tensor([1, 3]), 4).float()
    D = original(x, sigma, labels, augment_labels=randn(2, 9))
    assert D.shape == (2, 3, resolution, resolution) and D.dtype == torch.float32 and torch.isfinite(D).all()
    assert original(x, sigma).shape == (2, 3, resolution, resolution)  # labels default to zeros
    plain = build(arch=arch, resolution=resolution, img_channels=6, out_channels=6, **extra)
    assert plain(x, sigma).shape == (2, 6, resolution, resolution)  # non-ambient: all channels, as the original



@pytest.mark.slow  # torch.compile: 1.5 s per architecture
@pytest.mark.parametrize('arch', list(ARCHS))
def test_networks_compile_as_one_graph(arch):
    """train.py --compile: no graph breaks (each would split the network and add recompilations)."""
    torch._dynamo.reset()
    net = build(arch=arch, img_channels=6, ambient=True, gate='double_sigmoid', label_dim=2, augment_dim=3).train()
    explanation = torch._dynamo.explain(net)(randn(2, 6, 16, 16), torch.tensor([0.5, 2.0]), torch.eye(2),
                                             augment_labels=randn(2, 3))
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1

@pytest.mark.parametrize('arch', list(ARCHS))
def test_gradients_flow_everywhere(arch):
    net = build(arch=arch, img_channels=6, ambient=True, gated=True, label_dim=2, augment_dim=3)
    if arch == 'adm':  # ADM zero-initialises its output convs: give them weights so gradients reach every layer
        randomize_convs(net)
    x = randn(2, 6, 16, 16).requires_grad_(True)
    D = net(x, torch.tensor([0.5, 2.0]), torch.eye(2), augment_labels=randn(2, 3))
    D.square().mean().backward()
    assert x.grad is not None and torch.count_nonzero(x.grad) > 0
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert torch.count_nonzero(p.grad) > 0, name


def test_gated_parameter_count():
    """Gating adds exactly one gate tensor per weighted convolution, and nothing else."""
    kwargs = dict(img_channels=6, out_channels=6)
    plain, gated = build(**kwargs), build(gate='sigmoid', **kwargs)
    conv_weights = sum(m.weight.numel() for m in plain.modules() if isinstance(m, Conv2d) and m.weight is not None)
    count = lambda net: sum(p.numel() for p in net.parameters())
    assert count(gated) - count(plain) == conv_weights


def test_edm_ddpmpp_cifar_size():
    """EDM's DDPM++ CIFAR-10 network (augment_dim 9) has 55,733,891 parameters."""
    with torch.device('meta'):
        net = EDMPrecond(32, 3, model_type='SongUNet', model_channels=128, channel_mult=[2, 2, 2], num_blocks=4,
                         attn_resolutions=[16], augment_dim=9)
    assert sum(p.numel() for p in net.parameters()) == 55_733_891


def test_eval_determinism_and_train_dropout():
    net = build(arch='ddpmpp', dropout=0.5)
    x, sigma = randn(2, 3, 16, 16), torch.tensor([0.5, 1.0])
    net.eval()
    torch.testing.assert_close(net(x, sigma), net(x, sigma), rtol=0, atol=0)
    net.train()
    randomize_convs(net)  # make F visible in D
    assert not torch.equal(net(x, sigma), net(x, sigma))


def test_batch_versus_single():
    net = build(arch='ncsnpp', label_dim=3).eval()
    x, sigma, labels = randn(3, 3, 16, 16), torch.tensor([0.1, 1.0, 10.0]), torch.eye(3)
    batch = net(x, sigma, labels)
    for i in range(3):
        torch.testing.assert_close(net(x[i:i + 1], sigma[i:i + 1], labels[i:i + 1]), batch[i:i + 1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('arch', ['ddpmpp', 'adm'])
def test_label_dropout(arch):
    net = build(arch=arch, label_dim=3, label_dropout=0.5)
    randomize_convs(net)  # labels must visibly change the output
    x = randn(1, 3, 16, 16).expand(64, -1, -1, -1)
    sigma = torch.full([64], 1.0)
    labels = torch.nn.functional.one_hot(torch.full([64], 2), 3).float()
    net.eval()
    with_labels = net(x, sigma, labels)
    without = net(x, sigma, torch.zeros_like(labels))
    assert (with_labels - without).abs().amax() > 1e-3
    net.train()
    torch.manual_seed(0)
    dropped = net(x, sigma, labels)
    is_dropped = ((dropped - without).flatten(1).abs().amax(1) < 1e-5)
    is_kept = ((dropped - with_labels).flatten(1).abs().amax(1) < 1e-5)
    assert torch.all(is_dropped ^ is_kept)
    assert 16 < is_dropped.sum() < 48  # about half of 64
    net.model.label_dropout = 0
    torch.testing.assert_close(net(x, sigma, labels), with_labels)


# ----------------------------------------------------------------------------
# Preconditioning.


class CaptureModel(torch.nn.Module):
    """Stands in for F: records its inputs and returns a fixed output."""

    def __init__(self, output):
        super().__init__()
        self.output = output
        self.calls = []

    def forward(self, x, noise_labels, class_labels=None, **kwargs):
        self.calls.append(dict(x=x, noise_labels=noise_labels, class_labels=class_labels, **kwargs))
        return self.output.to(x.dtype)


def closed_forms(name, sigma, net):
    """(c_skip, c_out, c_in, c_noise) in float64 from EDM's Table 1."""
    s = sigma.astype(np.float64)
    if name == 'edm':
        sd = net.sigma_data
        return sd ** 2 / (s ** 2 + sd ** 2), s * sd / np.sqrt(s ** 2 + sd ** 2), 1 / np.sqrt(s ** 2 + sd ** 2), np.log(s) / 4
    if name == 'vp':
        t = (np.sqrt(net.beta_min ** 2 + 2 * net.beta_d * np.log1p(s ** 2)) - net.beta_min) / net.beta_d
        return np.ones_like(s), -s, 1 / np.sqrt(s ** 2 + 1), (net.M - 1) * t
    if name == 've':
        return np.ones_like(s), s, np.ones_like(s), np.log(s / 2)
    u = np.zeros(net.M + 1)
    alpha_bar = lambda j: np.sin(0.5 * np.pi * j / net.M / (net.C_2 + 1)) ** 2
    for j in range(net.M, 0, -1):
        u[j - 1] = np.sqrt((u[j] ** 2 + 1) / max(alpha_bar(j - 1) / alpha_bar(j), net.C_1) - 1)
    index = np.abs(s[:, None] - u[None, :]).argmin(1)
    return np.ones_like(s), -s, 1 / np.sqrt(s ** 2 + 1), net.M - 1 - index.astype(np.float64)


PRECONDS = {'edm': EDMPrecond, 'vp': VPPrecond, 've': VEPrecond, 'iddpm': iDDPMPrecond}


@pytest.mark.parametrize('name', list(PRECONDS))
@pytest.mark.parametrize('ambient', [False, True])
def test_preconditioning_factors(name, ambient):
    channels = 6 if ambient else 3
    net = build(PRECONDS[name], img_channels=channels, ambient=ambient, label_dim=2)
    data = 3
    assert net.denoised_channels == data
    assert net.out_channels == (2 * data if name == 'iddpm' else data)
    F_out = randn(4, net.out_channels, 16, 16, seed=5)
    net.model = CaptureModel(F_out)
    x = randn(4, channels, 16, 16, seed=6) + 2  # bounded away from zero so x_in / x is well defined
    sigma = np.array([0.004, 0.3, 2.5, 60.0], dtype=np.float32)
    D = net(x, torch.from_numpy(sigma), augment_labels=randn(4, 9)).double()
    c_skip, c_out, c_in, c_noise = (torch.from_numpy(c).reshape(-1, 1, 1, 1) for c in closed_forms(name, sigma, net))
    call = net.model.calls[0]
    assert call['x'].shape == x.shape and call['x'].dtype == torch.float32 and 'augment_labels' in call
    torch.testing.assert_close(call['x'].double(), c_in * x.double(), rtol=2e-6, atol=1e-7)  # c_in on all channels
    torch.testing.assert_close(call['noise_labels'].double(), c_noise.flatten(), rtol=2e-5, atol=2e-6)
    assert torch.equal(call['class_labels'], torch.zeros(4, 2))
    expected = c_skip * x[:, :data].double() + c_out * F_out[:, :data].double()
    assert D.shape == (4, data, 16, 16)
    torch.testing.assert_close(D, expected, rtol=2e-6, atol=1e-5)


def test_vp_sigma_inverse_and_range():
    net = build(VPPrecond)
    t = torch.tensor([1e-5, 0.01, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(net.sigma_inv(net.sigma(t)), t)
    assert net.sigma_min == pytest.approx(math.sqrt(math.expm1(0.5 * 19.9 * 1e-10 + 0.1 * 1e-5)), rel=1e-4)
    assert net.sigma_max == pytest.approx(math.sqrt(math.expm1(0.5 * 19.9 + 0.1)), rel=1e-5)


def test_iddpm_round_sigma():
    net = build(iDDPMPrecond)
    levels = net.u
    assert levels[-1] == 0 and torch.all(levels[:-1] > levels[1:])  # u_M = 0, decreasing in j
    sigma = torch.tensor([levels[10] * 1.001, levels[500] * 0.999, 1e9])
    assert net.round_sigma(sigma, return_index=True).tolist() == [10, 500, 0]
    torch.testing.assert_close(net.round_sigma(sigma), torch.stack([levels[10], levels[500], levels[0]]))
    assert net.sigma_min == pytest.approx(float(levels[-2])) and net.sigma_max == pytest.approx(float(levels[0]))


@pytest.mark.parametrize('name', ['edm', 'vp', 've'])
def test_denoiser_is_identity_at_zero_noise(name):
    net = build(PRECONDS[name], arch='ddpmpp').eval()
    randomize_convs(net)  # F = O(1): the test sees c_skip -> 1 and c_out -> 0, not F ≈ 0
    x = randn(2, 3, 16, 16)
    D_small = net(x, torch.full([2], 1e-5))
    torch.testing.assert_close(D_small, x, rtol=0, atol=1e-3)
    assert (net(x, torch.full([2], 1.0)) - x).abs().amax() > 0.05


def test_scalar_sigma_and_cpu_fp16_runs_fp32():
    torch.manual_seed(0)
    half = build(use_fp16=True).eval()
    full = build(use_fp16=False).eval()
    x = randn(2, 3, 16, 16)
    out = half(x, 0.7)  # a Python float sigma broadcasts over the batch
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, full(x, torch.full([2], 0.7)), rtol=0, atol=0)


@pytest.mark.parametrize('gate', ['sigmoid', 'double_sigmoid'])
def test_bf16_on_cpu(gate):
    """use_fp16='bf16' runs F in bfloat16 on a CPU too (fp16 does not: see above); D stays float32, close to the
    float32 network, and training gradients reach the float32 weights close to float32 training's."""
    torch.manual_seed(0)
    net = build(arch='ddpmpp', gate=gate, use_fp16='bf16')
    randomize_convs(net)
    assert net.compute_dtype('cpu') == net.compute_dtype(torch.device('cuda')) == torch.bfloat16
    assert build(use_fp16=True).compute_dtype('cpu') == torch.float32
    seen = capture({}, net.model.enc, inputs=['16x16_conv'])
    x, sigma = randn(2, 3, 16, 16), torch.tensor([0.5, 2.0])
    D = net(x, sigma)
    assert D.dtype == torch.float32 and seen['16x16_conv:in'].dtype == torch.bfloat16
    D32 = net(x, sigma, force_fp32=True)
    assert (D - D32).abs().max() < 0.05 * D32.abs().max()
    grads = []
    for force_fp32 in (False, True):
        net.zero_grad()
        net(x, sigma, force_fp32=force_fp32).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.99


@pytest.mark.gpu
@pytest.mark.parametrize('use_fp16, dtype', [(True, torch.float16), ('bf16', torch.bfloat16)])
def test_reduced_precision_on_cuda(use_fp16, dtype):
    device = torch.device('cuda')
    net = build(arch='ddpmpp', gated=True, use_fp16=use_fp16).to(device).eval()
    seen = capture({}, net.model.enc, inputs=['16x16_conv'])
    x = randn(2, 3, 16, 16).to(device)
    D = net(x, torch.tensor([0.5, 2.0], device=device))
    assert D.dtype == torch.float32 and seen['16x16_conv:in'].dtype == dtype
    D32 = net(x, torch.tensor([0.5, 2.0], device=device), force_fp32=True)
    torch.testing.assert_close(D, D32, rtol=0.05, atol=0.05)


def test_gate_translation_and_validation():
    assert build().model.enc['16x16_conv'].gate_weight is None
    assert build(gated=True).gate == 'sigmoid'
    assert build(gated=True, gate='double_sigmoid').gate == 'double_sigmoid'
    assert build(gate='double_sigmoid').model.enc['16x16_conv'].gate == 'double_sigmoid'
    with pytest.raises(ValueError, match='gate'):
        build(gate='relu')
    with pytest.raises(ValueError, match='img_channels'):
        build(img_channels=3, ambient=True)
    with pytest.raises(ValueError, match='model_type'):
        EDMPrecond(16, 3, model_type='UNet')
    with pytest.raises(ValueError, match='encoder_type'):
        SongUNet(16, 3, 3, encoder_type='fancy')
    with pytest.raises(ValueError, match='use_fp16'):
        build(use_fp16='fp8')
    assert isinstance(build(arch='adm').model, DhariwalUNet)


# ----------------------------------------------------------------------------
# Checkpoint compatibility: the original's gated DDPM++ 32x32 state-dict names and shapes.


def load_golden_module():
    spec = importlib.util.spec_from_file_location('make_golden', os.path.join(HERE, 'golden', 'make_golden.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Written out by hand from EDM's module tree (model_channels 128, channel_mult [2,2,2], emb 512, 6 in/out).
EXPECTED_KEYS = {
    'model.map_augment.weight': (128, 9),
    'model.map_layer0.weight': (512, 128),
    'model.map_layer0.bias': (512,),
    'model.map_layer1.weight': (512, 512),
    'model.enc.32x32_conv.weight': (128, 6, 3, 3),
    'model.enc.32x32_conv.gate_weight': (128, 6, 3, 3),
    'model.enc.32x32_conv.bias': (128,),
    'model.enc.32x32_block0.norm0.weight': (128,),
    'model.enc.32x32_block0.conv0.weight': (256, 128, 3, 3),
    'model.enc.32x32_block0.affine.weight': (256, 512),
    'model.enc.32x32_block0.skip.weight': (256, 128, 1, 1),
    'model.enc.32x32_block0.skip.gate_weight': (256, 128, 1, 1),
    'model.enc.32x32_block3.conv1.gate_weight': (256, 256, 3, 3),
    'model.enc.16x16_down.conv0.gate_weight': (256, 256, 3, 3),
    'model.enc.16x16_down.conv0.resample_filter': (1, 1, 2, 2),
    'model.enc.16x16_down.skip.weight': (256, 256, 1, 1),
    'model.enc.16x16_block0.norm2.weight': (256,),
    'model.enc.16x16_block0.qkv.weight': (768, 256, 1, 1),
    'model.enc.16x16_block0.qkv.gate_weight': (768, 256, 1, 1),
    'model.enc.16x16_block0.qkv.bias': (768,),
    'model.enc.16x16_block3.proj.gate_weight': (256, 256, 1, 1),
    'model.enc.8x8_block3.conv1.weight': (256, 256, 3, 3),
    'model.dec.8x8_in0.qkv.weight': (768, 256, 1, 1),
    'model.dec.8x8_in1.conv0.weight': (256, 256, 3, 3),
    'model.dec.8x8_block0.conv0.weight': (256, 512, 3, 3),
    'model.dec.8x8_block0.skip.gate_weight': (256, 512, 1, 1),
    'model.dec.16x16_up.conv0.resample_filter': (1, 1, 2, 2),
    'model.dec.16x16_block4.proj.weight': (256, 256, 1, 1),
    'model.dec.32x32_block4.conv0.weight': (256, 384, 3, 3),
    'model.dec.32x32_aux_norm.weight': (256,),
    'model.dec.32x32_aux_conv.weight': (6, 256, 3, 3),
    'model.dec.32x32_aux_conv.gate_weight': (6, 256, 3, 3),
    'model.dec.32x32_aux_conv.bias': (6,),
}
ABSENT_KEYS = ['model.map_noise.freqs', 'model.map_label.weight', 'model.enc.32x32_block1.skip.weight',
               'model.dec.8x8_block4.qkv.weight', 'model.dec.8x8_up.conv0.weight', 'model.dec.16x16_aux_conv.weight',
               'model.enc.32x32_conv.gate_bias', 'model.enc.32x32_block0.conv0.resample_filter']


def test_original_checkpoint_keys():
    golden = load_golden_module()
    with open(golden.GOLDEN) as f:
        lines = f.read().splitlines()
    shapes = golden.build_state_shapes()
    assert [golden.format_line(k, s) for k, s in shapes] == lines
    state = dict(shapes)
    for key, shape in EXPECTED_KEYS.items():
        assert state.get(key) == shape, key
    for key in ABSENT_KEYS:
        assert key not in state, key
    # One gate per weighted convolution: 40 in the encoder, 60 in the decoder (counted by hand from EDM's tree).
    gates = [k for k in state if k.endswith('gate_weight')]
    assert len(gates) == 100
    assert all(state[k] == state[k.replace('gate_weight', 'weight')] for k in gates)
    assert len([k for k in gates if '.enc.' in k]) == 40
    assert len([k for k in state if k.endswith('resample_filter')]) == 8


# ----------------------------------------------------------------------------
# Mask-aware preconditioning of pixels hidden from the network.


class _RecordF(torch.nn.Module):
    """Wraps the raw network F and keeps its last output."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.out = None

    def forward(self, *args, **kwargs):
        self.out = self.model(*args, **kwargs)
        return self.out


@pytest.mark.parametrize('precond', [EDMPrecond, VPPrecond, VEPrecond])
def test_mask_aware_coefficients_follow_the_formula(precond):
    net = randomize_convs(build(precond, img_channels=6, ambient=True, hidden_precond='mask_aware'))
    ref = build(precond, img_channels=6, ambient=True)  # original formulation, same weights
    ref.load_state_dict(net.state_dict())
    net.model = _RecordF(net.model)
    g = seeded(3)
    A_hat = (torch.rand(2, 3, 16, 16, generator=g) > 0.5).float()
    x = torch.cat([A_hat * torch.randn(2, 3, 16, 16, generator=g), A_hat], dim=1)
    sigma = torch.tensor([0.01, 3.0])
    with torch.no_grad():
        D = net(x, sigma)
        D_ref = ref(x, sigma)
    F_x = net.model.out.double()
    s = sigma.double().reshape(-1, 1, 1, 1)
    c_skip, c_out = {  # the preconditioners' own c_skip(σ), c_out(σ) (EDM Table 1)
        EDMPrecond: (0.25 / (s ** 2 + 0.25), s * 0.5 / (s ** 2 + 0.25).sqrt()),
        VPPrecond: (torch.ones_like(s), -s),
        VEPrecond: (torch.ones_like(s), s)}[precond]
    a = A_hat.double()
    expected = a * c_skip * x[:, :3].double() + (a * c_out + (1 - a) * 0.5) * F_x
    torch.testing.assert_close(D.double(), expected, rtol=1e-5, atol=1e-6)
    # Where the network sees the pixel, mask-aware and original agree; where it does not, only c_out differs.
    visible = A_hat.bool()
    torch.testing.assert_close(D[visible], D_ref[visible], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(D[~visible].double(), (0.5 * F_x)[~visible], rtol=1e-5, atol=1e-6)


def test_mask_aware_equals_original_with_full_mask():
    net = randomize_convs(build(img_channels=6, ambient=True, hidden_precond='mask_aware'))
    ref = build(img_channels=6, ambient=True, hidden_precond='original')
    ref.load_state_dict(net.state_dict())
    x = torch.cat([randn(2, 3, 16, 16), torch.ones(2, 3, 16, 16)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(net(x, torch.tensor([0.002, 5.0])), ref(x, torch.tensor([0.002, 5.0])))


def test_mask_aware_hidden_sigma_is_sigma_data_and_options_are_checked():
    assert build(img_channels=6, ambient=True, hidden_precond='mask_aware', sigma_data=0.7).hidden_sigma == 0.7
    assert build(img_channels=6, ambient=True).hidden_precond == 'original'  # default: old snapshots
    with pytest.raises(ValueError, match='hidden_precond'):
        build(img_channels=6, ambient=True, hidden_precond='bogus')
    with pytest.raises(ValueError, match='ambient'):
        build(img_channels=3, hidden_precond='mask_aware')


class _RecordLabels(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.noise_labels = None

    def forward(self, x, noise_labels, **kwargs):
        self.noise_labels = noise_labels.clone()
        return self.model(x, noise_labels, **kwargs)


@pytest.mark.parametrize('precond', [EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond])
def test_cond_sigma_min_floors_only_the_noise_label(precond):
    kwargs = dict(img_channels=6, ambient=True, hidden_precond='mask_aware')
    floored = randomize_convs(build(precond, cond_sigma_min=0.05, **kwargs))
    plain = build(precond, **kwargs)
    plain.load_state_dict(floored.state_dict())
    floored.model, plain.model = _RecordLabels(floored.model), _RecordLabels(plain.model)
    A_hat = (torch.rand(3, 3, 16, 16, generator=seeded(1)) > 0.5).float()
    x = torch.cat([A_hat * randn(3, 3, 16, 16), A_hat], dim=1)
    with torch.no_grad():
        D_floor = floored(x, torch.tensor([0.002, 0.01, 0.5]))
        plain(x, torch.tensor([0.05, 0.05, 0.5]))
        labels_at_floor = plain.model.noise_labels.clone()
        D_plain = plain(x, torch.tensor([0.002, 0.01, 0.5]))
    # F is told max(σ, 0.05); everything else uses the true σ (so D differs only through F below the floor).
    torch.testing.assert_close(floored.model.noise_labels, labels_at_floor)
    torch.testing.assert_close(D_floor[2], D_plain[2])
    assert not torch.equal(D_floor[:2], D_plain[:2])
    with pytest.raises(ValueError, match='cond_sigma_min'):
        build(precond, cond_sigma_min=-1, **kwargs)
