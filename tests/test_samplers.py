"""Tests for training/samplers.py: EDM's sampler and the fixed-mask ambient sampler with guidance."""

import math

import numpy as np
import pytest
import torch

from torch_utils.ambient_diffusion import MaskCorruption
from training import networks, samplers

# ----------------------------------------------------------------------------
# Test denoisers (float64, exact where a closed form exists).


class _Net(torch.nn.Module):
    """Attributes the samplers read from a network; every σ > 0 is supported, no rounding."""

    def __init__(self, channels, resolution, ambient):
        super().__init__()
        self.ambient = ambient
        self.img_channels = 2 * channels if ambient else channels
        self.img_resolution = resolution
        self.label_dim = 0
        self.sigma_min = 0
        self.sigma_max = float('inf')

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


def _sigma(sigma, x):
    return torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1, 1, 1)


class GaussianNet(_Net):
    """Exact denoiser for x0 ~ N(μ, s²) i.i.d. per pixel: E[x0 | x_σ] = (s²x + σ²μ)/(s² + σ²).

    Ambient: E[x0 | M ⊙ x_σ, M] for independent pixels, i.e. the prior mean μ where M = 0.
    """

    def __init__(self, mu, s, channels=1, resolution=4, ambient=False):
        super().__init__(channels, resolution, ambient)
        self.mu, self.s = mu, s

    def forward(self, x, sigma, class_labels=None):
        sigma = _sigma(sigma, x)
        c = x.shape[1] // 2 if self.ambient else x.shape[1]
        y = x[:, :c].to(torch.float64)
        D = (self.s ** 2 * y + sigma ** 2 * self.mu) / (self.s ** 2 + sigma ** 2)
        if self.ambient:
            m = x[:, c:].to(torch.float64)
            D = m * D + (1 - m) * self.mu
        return D


class LinearNet(_Net):
    """D(x, σ) = a·x + b (ambient: on M ⊙ x); a float64 reference is easy to write by hand."""

    def __init__(self, a, b, channels=2, resolution=3, ambient=False):
        super().__init__(channels, resolution, ambient)
        self.a, self.b = a, b

    def forward(self, x, sigma, class_labels=None):
        c = x.shape[1] // 2 if self.ambient else x.shape[1]
        return self.a * x[:, :c] + self.b


class SmoothNet(_Net):
    """A tiny smooth ambient denoiser (float64 convolutions) whose output depends on the mask."""

    def __init__(self, channels=2, resolution=5, seed=0):
        super().__init__(channels, resolution, ambient=True)
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn([4, 2 * channels, 3, 3], generator=g, dtype=torch.float64) * 0.4
        self.w2 = torch.randn([channels, 4, 3, 3], generator=g, dtype=torch.float64) * 0.4

    def forward(self, x, sigma, class_labels=None):
        sigma = _sigma(sigma, x)
        c = x.shape[1] // 2
        c_in = 1 / (sigma ** 2 + 0.25).sqrt()
        h = torch.tanh(torch.nn.functional.conv2d(x * c_in, self.w1, padding=1))
        F = torch.tanh(torch.nn.functional.conv2d(h, self.w2, padding=1))
        return 0.25 / (sigma ** 2 + 0.25) * x[:, :c] + sigma * 0.5 / (sigma ** 2 + 0.25).sqrt() * F


class MaskIgnoringNet(torch.nn.Module):
    """A clean network seen as an ambient one: input [M ⊙ x, M], the mask channels are ignored."""

    def __init__(self, clean):
        super().__init__()
        self.clean = clean
        self.ambient = True
        self.img_channels = 2 * clean.img_channels
        self.img_resolution = clean.img_resolution
        self.label_dim = clean.label_dim
        self.sigma_min, self.sigma_max = clean.sigma_min, clean.sigma_max

    def round_sigma(self, sigma):
        return self.clean.round_sigma(sigma)

    def forward(self, x, sigma, class_labels=None):
        return self.clean(x[:, :self.clean.img_channels], sigma, class_labels)


class Recorder(torch.nn.Module):
    """Wraps a network; records every call (batch rows, autograd mode, input)."""

    def __init__(self, net, forbid_grad=False):
        super().__init__()
        self.net = net
        self.forbid_grad = forbid_grad
        self.calls = []
        for name in ('ambient', 'img_channels', 'img_resolution', 'label_dim', 'sigma_min', 'sigma_max'):
            setattr(self, name, getattr(net, name))

    def round_sigma(self, sigma):
        return self.net.round_sigma(sigma)

    def forward(self, x, sigma, class_labels=None):
        if self.forbid_grad:
            assert torch.is_grad_enabled() is False
        self.calls.append(dict(rows=x.shape[0], grad=torch.is_grad_enabled(), input=x.detach().clone()))
        return self.net(x, sigma, class_labels)


def tiny_songunet(ambient, label_dim=0, seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = networks.EDMPrecond(img_resolution=16, img_channels=6 if ambient else 3, label_dim=label_dim,
                                  model_type='SongUNet', ambient=ambient, gate='double_sigmoid', model_channels=16,
                                  channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
                                  label_dropout=0.1 if label_dim else 0)  # conditional: ready for guidance
        # Larger output weights than the zero init, so that F matters in the samples.
        for p in net.parameters():
            p.data.normal_(0, 0.1) if p.ndim > 1 else None
    return net.eval()


def noise_sequence(shape, count, seed):
    """randn_like that returns pre-drawn float64 noise tensors in order (for hand-written references)."""
    g = torch.Generator().manual_seed(seed)
    noise = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(count)]
    it = iter(noise)
    return (lambda x: next(it)), noise


def ones_masks(latents, k=1):
    return torch.ones(latents.shape[0], k, *latents.shape[1:])

# ----------------------------------------------------------------------------
# (h) Time steps.


def test_time_steps_closed_form():
    N, sigma_min, sigma_max, rho = 18, 0.002, 80.0, 7.0
    expected = [(sigma_max ** (1 / rho) + i / (N - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
                for i in range(N)] + [0.0]
    t = samplers.edm_time_steps(N, sigma_min, sigma_max, rho)
    assert t.dtype == torch.float64 and t.shape == (N + 1,)
    np.testing.assert_allclose(t.numpy(), expected, rtol=1e-13, atol=0)
    assert t[0] == sigma_max and abs(float(t[N - 1]) - sigma_min) < 1e-15
    np.testing.assert_array_equal(samplers.edm_time_steps(1, sigma_min, sigma_max, rho).numpy(), [sigma_max, 0])


def test_time_steps_clamped_and_rounded_by_net():
    net = _Net(1, 4, ambient=False)
    net.sigma_min, net.sigma_max = 0.01, 50.0
    net.round_sigma = lambda sigma: torch.round(torch.as_tensor(sigma) * 100) / 100
    t = samplers.edm_time_steps(10, 0.002, 80, 7, net=net)
    raw = [(50 ** (1 / 7) + i / 9 * (0.01 ** (1 / 7) - 50 ** (1 / 7))) ** 7 for i in range(10)]
    np.testing.assert_allclose(t.numpy(), [round(v * 100) / 100 for v in raw] + [0], atol=1e-12)
    assert float(t[0]) == 50 and float(t[-1]) == 0


@pytest.mark.parametrize('kwargs', [dict(num_steps=0), dict(sigma_min=2.0, sigma_max=1.0), dict(rho=0)])
def test_time_steps_reject_bad_values(kwargs):
    args = dict(num_steps=4, sigma_min=0.002, sigma_max=80, rho=7) | kwargs
    with pytest.raises(ValueError):
        samplers.edm_time_steps(**args)

# ----------------------------------------------------------------------------
# (a) Ambient sampler with one all-ones mask = EDM's sampler.


@pytest.mark.parametrize('S_churn', [0, 10])
def test_ambient_all_ones_equals_edm(S_churn):
    clean = tiny_songunet(ambient=False)
    latents = torch.randn([3, 3, 16, 16], generator=torch.Generator().manual_seed(1))
    kwargs = dict(num_steps=5, S_churn=S_churn, S_min=0.05, S_max=20)
    x_edm = samplers.edm_sampler(clean, latents, randn_like=noise_sequence(latents.shape, 5, 7)[0], **kwargs)
    x_amb = samplers.ambient_sampler(MaskIgnoringNet(clean), latents, ones_masks(latents),
                                     randn_like=noise_sequence(latents.shape, 5, 7)[0], **kwargs)
    assert x_edm.dtype == torch.float64
    assert torch.equal(x_edm, x_amb)

# ----------------------------------------------------------------------------
# (b) Distributions with exact Gaussian denoisers.


def test_edm_sampler_reproduces_gaussian():
    mu, s, sigma_max = 0.3, 0.5, 80.0
    latents = torch.randn([2048, 1, 4, 4], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = samplers.edm_sampler(GaussianNet(mu, s), latents, sigma_max=sigma_max, num_steps=100)
    # The exact flow maps N(0, σmax²) to N(μ(1 − s/√(s²+σmax²)), s²σmax²/(s²+σmax²)): the mean is off by
    # about μ·s/σmax (0.6%), the scale by 2e-5.
    # 100 steps: Heun's discretisation error in the scale is 0.15% (5.5% at 18 steps for this narrow prior).
    n = x.numel()
    assert abs(float(x.mean()) - mu) < 4 * s / math.sqrt(n) + mu * s / sigma_max
    assert abs(float(x.std()) / s - 1) < 4 * math.sqrt(0.5 / n) + 3e-3
    # Stochastic sampling (churn) too; SDE steps need the noise as well as the mean right (bias 0.3% here).
    g = torch.Generator().manual_seed(1)
    x = samplers.edm_sampler(GaussianNet(mu, s), latents, num_steps=100, S_churn=10, S_min=0.05, S_max=50,
                             randn_like=lambda v: torch.randn(v.shape, generator=g, dtype=v.dtype))
    assert abs(float(x.mean()) - mu) < 4 * s / math.sqrt(n) + mu * s / sigma_max
    assert abs(float(x.std()) / s - 1) < 4 * math.sqrt(0.5 / n) + 0.01


def test_ambient_sampler_with_exact_posterior_denoiser():
    mu, s = -0.2, 0.4
    g = torch.Generator().manual_seed(2)
    latents = torch.randn([1024, 1, 4, 4], generator=g, dtype=torch.float64)
    corruption = MaskCorruption('dust', corruption_probability=0.4, delta_probability=0.2)
    masks = samplers.sample_masks(corruption, latents.shape, 1, g)
    x = samplers.ambient_sampler(GaussianNet(mu, s, ambient=True), latents, masks, num_steps=100)
    observed = masks[:, 0].bool()
    # Observed pixels follow the prior N(μ, s²); with independent pixels a hidden one has posterior mean μ
    # at every σ, so the fixed-mask sampler leaves it exactly at μ.
    values = x[observed]
    n = values.numel()
    assert abs(n / x.numel() - 0.6 * 0.8) < 0.02
    assert abs(float(values.mean()) - mu) < 4 * s / math.sqrt(n) + abs(mu) * s / 80
    assert abs(float(values.std()) / s - 1) < 4 * math.sqrt(0.5 / n) + 3e-3
    torch.testing.assert_close(x[~observed], torch.full_like(x[~observed], mu), atol=1e-12, rtol=0)

# ----------------------------------------------------------------------------
# (c) Per-seed randomness: batch-size independence.


def test_generate_batch_is_batch_independent():
    net = tiny_songunet(ambient=True, label_dim=3)
    corruption = MaskCorruption('dust', corruption_probability=0.5, delta_probability=0.1)
    kwargs = dict(corruption=corruption, num_masks=2, num_steps=3, guidance_scale=0.5, S_churn=5,
                  clipping='dynamic', resample_guidance_masks=True)
    whole = samplers.generate_batch(net, list(range(6)), **kwargs)
    parts = torch.cat([samplers.generate_batch(net, [0, 1], **kwargs), samplers.generate_batch(net, [2, 3, 4, 5], **kwargs)])
    assert whole.shape == (6, 3, 16, 16) and whole.dtype == torch.float32
    assert float(whole.abs().max()) <= 1
    torch.testing.assert_close(whole, parts, atol=1e-5, rtol=0)
    assert not torch.allclose(whole[0], whole[1])


def test_generate_batch_clean_network_and_errors():
    clean = tiny_songunet(ambient=False)
    whole = samplers.generate_batch(clean, [3, 4, 5], num_steps=3)
    torch.testing.assert_close(whole[1:], samplers.generate_batch(clean, [4, 5], num_steps=3), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match='ambient'):
        samplers.generate_batch(clean, [0], num_steps=3, guidance_scale=1.0)
    with pytest.raises(ValueError, match='corruption'):
        samplers.generate_batch(tiny_songunet(ambient=True), [0], num_steps=3)
    with pytest.raises(ValueError, match='eval'):
        samplers.generate_batch(tiny_songunet(ambient=False).train(), [0], num_steps=3)


def test_sample_masks_per_seed():
    corruption = MaskCorruption('dust', corruption_probability=0.3, delta_probability=0.5, mask_full_rgb=True)

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    whole = samplers.sample_masks(corruption, [6, 3, 8, 8], 3, gens(range(6)))
    parts = torch.cat([samplers.sample_masks(corruption, [2, 3, 8, 8], 3, gens([0, 1])),
                       samplers.sample_masks(corruption, [4, 3, 8, 8], 3, gens([2, 3, 4, 5]))])
    assert whole.shape == (6, 3, 3, 8, 8) and torch.equal(whole, parts)
    assert not torch.equal(whole[:, 0], whole[:, 1])                   # K independent masks per sample
    assert torch.equal(whole[:, :, 0], whole[:, :, 2])                 # mask_full_rgb
    many = samplers.sample_masks(corruption, [64, 1, 16, 16], 2, torch.Generator().manual_seed(0))
    assert abs(float(many.mean()) - 0.7 * 0.5) < 0.02

# ----------------------------------------------------------------------------
# (d) Guidance gradient against finite differences.


def _fd_directional(f, x, v, eps=1e-5):
    return (f(x + eps * v) - f(x - eps * v)) / (2 * eps)


def test_guidance_gradient_matches_finite_differences():
    net = SmoothNet()
    g = torch.Generator().manual_seed(3)
    n, k = 2, 3
    x = torch.randn([n, 2, 5, 5], generator=g, dtype=torch.float64) * 1.5
    masks = (torch.rand([n, k, 2, 5, 5], generator=g) > 0.4).float()
    y = torch.randn([n, 2, 5, 5], generator=g, dtype=torch.float64)
    sigma, w, zeta = torch.tensor(1.3, dtype=torch.float64), 0.7, 0.2
    D = [samplers.ambient_denoiser(net, masks[:, j]) for j in range(k)]

    def term(x, sigma, D0):                                            # a DPS-like per-sample residual norm
        return zeta * (y - D0).flatten(1).norm(dim=1)

    def total_loss(x):
        D0 = D[0](x, sigma)
        recon = sum(0.5 * (D0 - D[j](x, sigma)).square().sum() for j in range(1, k))
        return float(w * recon + zeta * (y - D0).flatten(1).norm(dim=1).sum())

    guided = samplers.guided_ambient_denoiser(net, masks, guidance_scale=w, extra_guidance=[term])
    grad = D[0](x, sigma) - guided(x, sigma)                          # D̃ = D_0 − ∇(total loss)
    for _ in range(3):
        v = torch.randn(x.shape, generator=g, dtype=torch.float64)
        np.testing.assert_allclose(float((grad * v).sum()), _fd_directional(total_loss, x, v), rtol=1e-6)

    # The sampler uses it: with one step x_1 = D̃(x_0, σmax).
    latents = x / 2.0
    x1 = samplers.ambient_sampler(net, latents, masks, num_steps=1, sigma_max=2.0, guidance_scale=w,
                                  extra_guidance=[term])
    torch.testing.assert_close(x1, guided(latents * 2.0, torch.tensor(2.0, dtype=torch.float64)), atol=1e-12, rtol=0)
    # And the gradient flows through D_0 too: stopping it there gives a different estimate.
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    D0_const = D[0](x, sigma)
    fd_stop = _fd_directional(lambda z: float(sum(0.5 * (D0_const - D[j](z, sigma)).square().sum()
                                                   for j in range(1, k))), x, v)
    recon_only = samplers.guided_ambient_denoiser(net, masks, guidance_scale=1.0)
    full = float(((D0_const - recon_only(x, sigma)) * v).sum())
    assert abs(full - fd_stop) > 1e-3 * abs(full)

# ----------------------------------------------------------------------------
# (e) No autograd graph without guidance; network evaluation counts.


@pytest.mark.parametrize('solver, expected', [('heun', 2 * 6 - 1), ('euler', 6)])
def test_no_graph_and_evaluation_count(solver, expected):
    latents = torch.randn([4, 1, 4, 4], generator=torch.Generator().manual_seed(0))
    net = Recorder(GaussianNet(0.0, 0.5, ambient=True), forbid_grad=True)
    samplers.ambient_sampler(net, latents, ones_masks(latents), num_steps=6, solver=solver)
    assert len(net.calls) == expected and all(c['rows'] == 4 for c in net.calls)
    # K > 1 with w = 0: the guidance masks are not evaluated.
    net.calls.clear()
    samplers.ambient_sampler(net, latents, ones_masks(latents, 3), num_steps=6, solver=solver, guidance_scale=0.0)
    assert len(net.calls) == expected and all(c['rows'] == 4 for c in net.calls)
    clean = Recorder(GaussianNet(0.0, 0.5), forbid_grad=True)
    samplers.edm_sampler(clean, latents, num_steps=6, solver=solver)
    assert len(clean.calls) == expected


def test_guidance_batches_the_masks_into_one_call():
    latents = torch.randn([4, 1, 4, 4], generator=torch.Generator().manual_seed(0))
    net = Recorder(GaussianNet(0.0, 0.5, ambient=True))
    masks = (torch.rand([4, 3, 1, 4, 4], generator=torch.Generator().manual_seed(1)) > 0.5).float()
    samplers.ambient_sampler(net, latents, masks, num_steps=6, guidance_scale=0.5)
    assert len(net.calls) == 11 and all(c['rows'] == 12 and c['grad'] for c in net.calls)

# ----------------------------------------------------------------------------
# (f) Clipping.


def _numpy_dynamic(D, p):
    D = D.numpy()
    out = np.empty_like(D)
    for i in np.ndindex(D.shape[:-3]):
        s = max(np.quantile(np.abs(D[i]), p), 1.0)
        out[i] = np.clip(D[i], -s, s) / s
    return out


def test_clipping_modes():
    g = torch.Generator().manual_seed(4)
    D = torch.randn([4, 3, 5, 5], generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.5, 0.2, 5.0],
                                                                                      dtype=torch.float64).reshape(4, 1, 1, 1)
    assert samplers.clip_denoised(D, 'none') is D
    torch.testing.assert_close(samplers.clip_denoised(D, 'static'), D.clamp(-1, 1), atol=0, rtol=0)
    dynamic = samplers.clip_denoised(D, 'dynamic', 0.9)
    np.testing.assert_allclose(dynamic.numpy(), _numpy_dynamic(D, 0.9), atol=1e-14)
    assert not torch.allclose(dynamic[0], D[0].clamp(-1, 1))           # not static for a sample with s > 1
    torch.testing.assert_close(dynamic[2], D[2].clamp(-1, 1), atol=0, rtol=0)  # s = 1: plain clamp
    D5 = D.reshape(2, 2, 3, 5, 5)                                      # [N, K, C, H, W]: per (n, k)
    np.testing.assert_allclose(samplers.clip_denoised(D5, 'dynamic', 0.995).numpy(), _numpy_dynamic(D5, 0.995),
                               atol=1e-14)
    with pytest.raises(ValueError, match='clipping'):
        samplers.clip_denoised(D, 'percentile')
    with pytest.raises(ValueError, match='clip_percentile'):
        samplers.clip_denoised(D, 'dynamic', 99.5)


@pytest.mark.parametrize('clipping', ['none', 'static', 'dynamic'])
def test_sampler_applies_clipping(clipping):
    pattern = torch.randn([2, 3, 5, 5], generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2
    net = LinearNet(a=0.0, b=pattern, channels=3, resolution=5, ambient=True)   # D = a fixed, out-of-range pattern
    latents = torch.zeros([2, 3, 5, 5])
    x1 = samplers.ambient_sampler(net, latents, ones_masks(latents), num_steps=1, clipping=clipping,
                                  clip_percentile=0.95)
    torch.testing.assert_close(x1, samplers.clip_denoised(pattern, clipping, 0.95), atol=1e-12, rtol=0)

# ----------------------------------------------------------------------------
# (g) Churn: the Euler step starts from x̂.


def _reference(a, b, latents, noise, N, S_churn, S_min, S_max, S_noise, heun, anchor_at_x_cur=False):
    """Hand-written float64 EDM Algorithm 2 for D(x) = a·x + b."""
    rho, s_min, s_max = 7.0, 0.002, 80.0
    t = [(s_max ** (1 / rho) + i / (N - 1) * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho for i in range(N)] + [0]
    x = latents.double() * t[0]
    for i in range(N):
        gamma = min(S_churn / N, math.sqrt(2) - 1) if S_min <= t[i] <= S_max else 0
        t_hat = t[i] * (1 + gamma)
        x_hat = x + math.sqrt(t_hat ** 2 - t[i] ** 2) * S_noise * noise[i]
        d = (x_hat - (a * x_hat + b)) / t_hat
        x_euler = (x if anchor_at_x_cur else x_hat) + (t[i + 1] - t_hat) * d
        if heun and i < N - 1:
            d2 = (x_euler - (a * x_euler + b)) / t[i + 1]
            x = x_hat + (t[i + 1] - t_hat) * 0.5 * (d + d2)
        else:
            x = x_euler
    return x


@pytest.mark.parametrize('solver', ['euler', 'heun'])
def test_churn_matches_hand_written_reference(solver):
    N, a, b = 4, 0.6, 0.1
    latents = torch.randn([2, 2, 3, 3], generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    options = dict(S_churn=3.0, S_min=0.1, S_max=60.0, S_noise=1.007)
    _, noise = noise_sequence(latents.shape, N, 8)
    ref = _reference(a, b, latents, noise, N, heun=solver == 'heun', **options)
    x_edm = samplers.edm_sampler(LinearNet(a, b), latents, randn_like=noise_sequence(latents.shape, N, 8)[0],
                                 num_steps=N, solver=solver, **options)
    x_amb = samplers.ambient_sampler(LinearNet(a, b, ambient=True), latents, ones_masks(latents),
                                     randn_like=noise_sequence(latents.shape, N, 8)[0], num_steps=N, solver=solver,
                                     **options)
    torch.testing.assert_close(x_edm, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(x_amb, ref, atol=1e-12, rtol=1e-12)
    if solver == 'euler':   # the original anchored the Euler step at x_i: visibly different
        original = _reference(a, b, latents, noise, N, heun=False, anchor_at_x_cur=True, **options)
        assert float((original - ref).abs().max()) > 1e-2

# ----------------------------------------------------------------------------
# (i) Resampling of guidance masks.


def test_resample_hook_called_and_used():
    N, n, k = 4, 2, 3
    g = torch.Generator().manual_seed(9)
    latents = torch.randn([n, 1, 4, 4], generator=g)
    masks = (torch.rand([n, k, 1, 4, 4], generator=g) > 0.5).float()
    per_step = {i: (torch.rand([n, k - 1, 1, 4, 4], generator=g) > 0.5).float() for i in range(1, N)}
    steps = []

    def resample(i):
        steps.append(i)
        return per_step[i]

    net = Recorder(GaussianNet(0.1, 0.5, ambient=True))
    samplers.ambient_sampler(net, latents, masks, num_steps=N, guidance_scale=0.3, resample_masks=resample)
    assert steps == list(range(1, N))
    step_of_call = [0, 0, 1, 1, 2, 2, 3]                               # Heun: two calls per step, one at the last
    assert len(net.calls) == len(step_of_call)
    for call, i in zip(net.calls, step_of_call):
        seen = call['input'][:, 1:].reshape(n, k, 1, 4, 4)             # mask channels, per sample and mask
        expected = masks if i == 0 else torch.cat([masks[:, :1], per_step[i]], dim=1)
        assert torch.equal(seen.float(), expected)
    with pytest.raises(ValueError, match='resample_masks'):
        samplers.ambient_sampler(net, latents, masks, num_steps=N, guidance_scale=0.3,
                                 resample_masks=lambda i: masks[:, :1])


def test_ambient_sampler_rejects_mismatched_inputs():
    latents = torch.randn([2, 1, 4, 4])
    net = GaussianNet(0.0, 0.5, ambient=True)
    with pytest.raises(ValueError, match='masks'):
        samplers.ambient_sampler(net, latents, torch.ones([3, 1, 1, 4, 4]))
    with pytest.raises(ValueError, match='solver'):
        samplers.ambient_sampler(net, latents, ones_masks(latents), solver='dpm')
    with pytest.raises(ValueError, match='edm_sampler'):
        samplers.ambient_sampler(GaussianNet(0.0, 0.5), latents, ones_masks(latents))
    with pytest.raises(ValueError, match='ambient_sampler'):
        samplers.edm_sampler(net, latents)


# ----------------------------------------------------------------------------
# Denoising error per σ on visible and hidden pixels.


def test_denoising_error_against_closed_form():
    """Gaussian prior: hidden pixels get the prior mean μ (error (μ − x0)², exact); visible pixels the posterior
    mean, whose expected squared error is (σ⁴(μ − x0)² + s⁴σ²)/(s² + σ²)²."""
    mu, s = 0.2, 0.5
    net = GaussianNet(mu, s, channels=1, resolution=16, ambient=True).eval()
    x0 = torch.rand([16, 1, 16, 16], generator=torch.Generator().manual_seed(0)) * 2 - 1
    corruption = MaskCorruption('dust', 0.6, 0.1)
    seeds = list(range(16))
    sigmas = [0.05, 0.5, 2.0]
    result = samplers.denoising_error(net, x0, seeds, sigmas, corruption=corruption)
    assert result['num_visible'] + result['num_hidden'] == x0.numel()
    assert abs(result['num_hidden'] / x0.numel() - (1 - 0.4 * 0.9)) < 0.03
    hidden_error = result['hidden'][0]
    assert result['hidden'] == pytest.approx([hidden_error] * 3, rel=1e-6)  # does not depend on σ
    rnd = samplers.StackedRandomGenerator('cpu', seeds)  # the masks come first from the per-seed generators
    mask = samplers.sample_masks(corruption, x0.shape, 1, rnd.generators)[:, 0]
    assert hidden_error == pytest.approx(float(((mu - x0) ** 2 * (1 - mask)).sum()), rel=1e-5)
    for sigma, visible in zip(sigmas, result['visible']):
        expected = float((((sigma ** 4 * (mu - x0) ** 2 + s ** 4 * sigma ** 2) / (s ** 2 + sigma ** 2) ** 2) * mask).sum())
        assert visible == pytest.approx(expected, rel=0.15)


def test_denoising_error_is_batch_independent_and_clean_nets_hide_nothing():
    net = GaussianNet(0.0, 0.5, channels=1, resolution=8, ambient=True).eval()
    x0 = torch.rand([6, 1, 8, 8], generator=torch.Generator().manual_seed(1)) * 2 - 1
    corruption = MaskCorruption('dust', 0.5, 0.1)
    whole = samplers.denoising_error(net, x0, range(6), [0.1, 1.0], corruption=corruption)
    parts = [samplers.denoising_error(net, x0[i:i + 3], range(i, i + 3), [0.1, 1.0], corruption=corruption)
             for i in (0, 3)]
    for key in ('visible', 'hidden', 'num_visible', 'num_hidden'):
        np.testing.assert_allclose(np.add(parts[0][key], parts[1][key]), whole[key], rtol=1e-5)
    clean = samplers.denoising_error(GaussianNet(0.0, 0.5, channels=1, resolution=8).eval(), x0, range(6), [0.1])
    assert clean['num_hidden'] == 0 and clean['hidden'] == [0.0] and clean['num_visible'] == x0.numel()
    with pytest.raises(ValueError, match='needs corruption'):
        samplers.denoising_error(net, x0, range(6), [0.1])
    with pytest.raises(ValueError, match='positive'):
        samplers.denoising_error(net, x0, range(6), [0.0], corruption=corruption)
    with pytest.raises(ValueError, match='one seed per image'):
        samplers.denoising_error(net, x0, range(5), [0.1], corruption=corruption)
