"""Tests for Variational Diffusion Models (training/vdm.py, networks.VDMPrecond, samplers' solver='vdm'): each term
of the bound against an independent reference (torch.distributions, float64 recomputation, quadrature over t, the
exact entropy of a discretised Gaussian), the schedules, the variance gradient and the sampler."""

import math

import numpy as np
import pytest
import torch

from training import samplers, vdm
from training.networks import VDMPrecond
from torch_utils import misc

TINY_NET = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0)


def random_schedule(seed, kind='learned', gamma_min=-13.3, gamma_max=5.0):
    """A schedule whose raw parameters are random (far from the near-linear initialisation)."""
    schedule = vdm.NoiseSchedule(kind, gamma_min, gamma_max, hidden=64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in schedule.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 2)
    return schedule


# ----------------------------------------------------------------------------
# Terms of the bound.


def test_prior_is_the_kl_of_two_normals():
    x = torch.rand(3, 2, 4, 4) * 2 - 1
    for gamma_1 in (5.0, 0.3, -2.0):
        g = torch.full([3], gamma_1)
        q = torch.distributions.Normal(torch.sigmoid(-g).sqrt().view(-1, 1, 1, 1) * x,
                                       torch.sigmoid(g).sqrt().view(-1, 1, 1, 1).expand_as(x))
        p = torch.distributions.Normal(torch.zeros_like(x), torch.ones_like(x))
        expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
        torch.testing.assert_close(vdm.prior_kl(x, g), expected, rtol=1e-4, atol=1e-6)


def test_reconstruction_is_a_float64_softmax_over_the_256_values():
    gen = torch.Generator().manual_seed(0)
    k = torch.randint(0, 256, (2, 1, 3, 3), generator=gen)
    x = (2 * k.double() + 1) / 256 - 1
    for gamma_0 in (-13.3, -8.0, -3.0):
        alpha, sigma = math.sqrt(1 / (1 + math.exp(gamma_0))), math.sqrt(1 / (1 + math.exp(-gamma_0)))
        z = alpha * x + sigma * torch.randn(x.shape, generator=gen, dtype=torch.float64)
        values = (2 * np.arange(256) + 1) / 256 - 1
        expected = []
        for zi, ki in zip(z.reshape(2, -1).numpy(), k.reshape(2, -1).numpy()):
            total = 0.0
            for zz, kk in zip(zi, ki):
                logits = -0.5 * ((zz - alpha * values) / sigma) ** 2
                total -= logits[kk] - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
            expected.append(total)
        got = vdm.reconstruction_nll(k, z.float(), torch.full([2], gamma_0))
        np.testing.assert_allclose(got.numpy(), expected, rtol=2e-3, atol=2e-4)


def test_levels_are_vdm_discretisation_and_non_8bit_values_are_refused():
    k = torch.arange(256)
    torch.testing.assert_close(vdm.level_values(k), (2 * k.float() + 1) / 256 - 1)
    images = k.float().reshape(1, 1, 16, 16) / 127.5 - 1
    assert torch.equal(vdm.to_levels(images), k.reshape(1, 1, 16, 16))
    with pytest.raises(ValueError, match='8-bit'):
        vdm.to_levels(images + 0.003)


# ----------------------------------------------------------------------------
# Schedules.


@pytest.mark.parametrize('seed', range(5))
def test_learned_schedule_is_monotone_for_random_weights(seed):
    schedule = random_schedule(seed)
    t = torch.linspace(0, 1, 2001)
    with torch.no_grad():
        gamma = schedule(t)
    gamma_0, gamma_1 = (float(g.detach()) for g in schedule.endpoints())
    assert (gamma[1:] - gamma[:-1] >= 0).all() and gamma[-1] - gamma[0] > 0
    assert abs(float(gamma[0]) - gamma_0) < 1e-4 and abs(float(gamma[-1]) - gamma_1) < 1e-4


def test_schedule_derivative_by_autograd_matches_finite_differences():
    for kind in vdm.SCHEDULES:
        schedule = random_schedule(3, kind).double()
        t = torch.tensor([0.05, 0.3, 0.5, 0.77, 0.95], dtype=torch.float64)
        gamma, gamma_prime = schedule.gamma_and_derivative(t)
        h = 1e-6
        numeric = (schedule(t + h).double() - schedule(t - h).double()) / (2 * h)
        torch.testing.assert_close(gamma_prime.double(), numeric, rtol=1e-3, atol=1e-3)
        if kind != 'learned':
            gamma_0, gamma_1 = schedule.endpoints()
            torch.testing.assert_close(gamma_prime.double(), (gamma_1 - gamma_0).double().expand(5))


def test_schedule_errors():
    for bad in (dict(gamma_min=5.0, gamma_max=5.0), dict(gamma_min=6.0, gamma_max=5.0), dict(gamma_min=float('nan'))):
        with pytest.raises(ValueError, match='gamma_min'):
            vdm.NoiseSchedule('fixed_linear', **{'gamma_min': -13.3, 'gamma_max': 5.0, **bad})
    with pytest.raises(ValueError, match='schedule='):
        vdm.NoiseSchedule('cosine')
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match='T='):
            vdm.check_T(bad)


def test_learned_schedule_golden_values():
    """The initial learned schedule (seeded) at a few times; catches unintended changes of its parameterisation."""
    schedule = vdm.NoiseSchedule('learned')
    with torch.no_grad():
        got = schedule(torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    expected = torch.tensor([-13.3, -8.745678, -4.150046, 0.444196, 5.0])
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-4)


# ----------------------------------------------------------------------------
# The diffusion term against quadrature, and the whole bound against an exact likelihood.


def _linear_eps(a):
    """A fixed noise predictor ε̂(z, γ) = a·sigmoid(γ)·z (a function of the input and the level, nothing learned)."""
    return lambda z, gamma: a * torch.sigmoid(gamma).reshape(-1, *[1] * (z.ndim - 1)) * z


def _expected_sq_error(schedule, x, t, a):
    """E_ε‖ε − ε̂‖² in closed form for ε̂ = c·z, c = a·sigmoid(γ): ε − c(αx + σε) = (1 − cσ)ε − cαx."""
    with torch.no_grad():
        gamma = schedule(t.float()).double()
    alpha, sigma = torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()
    c = a * torch.sigmoid(gamma)
    return x.numel() * (1 - c * sigma) ** 2 + (c * alpha) ** 2 * float((x.double() ** 2).sum())


@pytest.mark.parametrize('kind', ['fixed_linear', 'learned'])
def test_continuous_diffusion_term_matches_quadrature_over_t(kind):
    schedule = random_schedule(1, kind) if kind == 'learned' else vdm.NoiseSchedule(kind)
    x_k = torch.randint(0, 256, (1, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    x = vdm.level_values(x_k)
    a = 0.8
    # Quadrature: ½∫ γ'(t) E‖ε − ε̂‖² dt (midpoint rule on 20000 cells, γ' by autograd).
    grid = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000
    _, gamma_prime = schedule.gamma_and_derivative(grid)
    exact = float((0.5 * gamma_prime.detach().double() * _expected_sq_error(schedule, x, grid, a)).mean())
    # Monte Carlo with the bound's own estimator.
    n = 4000
    gen = torch.Generator().manual_seed(1)
    t = vdm.sample_times(n, 'uniform', generator=gen)
    k = x_k.expand(n, -1, -1, -1)
    terms = vdm.vlb_terms(_linear_eps(a), schedule, k, t, torch.randn(k.shape, generator=gen),
                          torch.randn(k.shape, generator=gen))
    values = terms['diffusion'].double()
    se = float(values.detach().std() / math.sqrt(n))
    assert abs(float(values.detach().mean()) - exact) < 3 * se, (float(values.mean()), exact, se)


def test_discrete_diffusion_term_matches_its_exact_sum_and_converges_to_continuous_time():
    schedule = random_schedule(2)
    x_k = torch.randint(0, 256, (1, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    x = vdm.level_values(x_k)
    a = 0.8

    def exact_sum(T):
        i = torch.arange(1, T + 1, dtype=torch.float64)
        with torch.no_grad():
            g_t, g_s = schedule((i / T).float()).double(), schedule(((i - 1) / T).float()).double()
        return float((T / 2 * torch.expm1(g_t - g_s) * _expected_sq_error(schedule, x, i / T, a)).mean())
    T, n = 10, 4000
    gen = torch.Generator().manual_seed(3)
    k = x_k.expand(n, -1, -1, -1)
    terms = vdm.vlb_terms(_linear_eps(a), schedule, k, vdm.sample_times(n, 'uniform', generator=gen),
                          torch.randn(k.shape, generator=gen), torch.randn(k.shape, generator=gen), T=T)
    values = terms['diffusion'].detach().double()
    se = float(values.std() / math.sqrt(n))
    assert abs(float(values.mean()) - exact_sum(T)) < 3 * se
    # T → ∞: the discrete sum tends to the continuous integral, and is above it (SNR ratio convexity) for this ε̂.
    grid = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000
    _, gamma_prime = schedule.gamma_and_derivative(grid)
    continuous = float((0.5 * gamma_prime.detach().double() * _expected_sq_error(schedule, x, grid, a)).mean())
    errors = [abs(exact_sum(T) - continuous) for T in (10, 100, 1000)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.01 * continuous


def _discrete_gaussian(mu=0.1, s=0.3):
    values = (2 * torch.arange(256, dtype=torch.float64) + 1) / 256 - 1
    logp = -0.5 * ((values - mu) / s) ** 2
    return values, (logp - torch.logsumexp(logp, 0)).exp()


def _exact_eps(probs, values):
    """ε̂ = (z − α·E[x | z])/σ for data x with P(x = x_k) = probs[k], independently per dimension."""
    def eps(z, gamma):
        g = gamma.double().reshape(-1, *[1] * (z.ndim - 1))
        alpha, sigma = torch.sigmoid(-g).sqrt(), torch.sigmoid(g).sqrt()
        zz = z.double()[..., None]
        logw = probs.log() - 0.5 * ((zz - alpha[..., None] * values) / sigma[..., None]) ** 2
        mean = (logw.softmax(-1) * values).sum(-1)
        return ((zz[..., 0] - alpha * mean) / sigma).float()
    return eps


def test_bound_with_the_exact_denoiser_equals_the_discrete_gaussian_likelihood():
    """Data: x_k with P(k) ∝ N(x_k; 0.1, 0.3²). With the exact ε̂ the continuous-time bound is tight up to the
    prior's and the reconstruction's mismatch, both tiny at γ = -13.3..5: E[−VLB] ≈ H(P) (nats per dimension)."""
    values, probs = _discrete_gaussian()
    entropy = float(-(probs * probs.log()).sum())
    gen = torch.Generator().manual_seed(0)
    schedule = vdm.NoiseSchedule('fixed_linear')
    totals = []
    for _ in range(5):
        n = 20000
        k = torch.multinomial(probs.float(), n, replacement=True, generator=gen).reshape(n, 1, 1, 1)
        terms = vdm.vlb_terms(_exact_eps(probs, values), schedule, k, vdm.sample_times(n, 'low_discrepancy', generator=gen),
                              torch.randn(k.shape, generator=gen), torch.randn(k.shape, generator=gen))
        totals.append(sum(terms[name].double() for name in vdm.TERMS))
    total = torch.cat(totals)
    se = float(total.std() / math.sqrt(len(total)))
    assert se < 0.04
    assert abs(float(total.mean()) - entropy) < 3 * se, (float(total.mean()), entropy, se)
    # A wrong denoiser (ε̂ = 0) is far worse: the bound is not tight by construction.
    worse = vdm.vlb_terms(lambda z, g: torch.zeros_like(z), schedule, k[:2000], vdm.sample_times(2000, 'uniform', generator=gen),
                          torch.randn(k[:2000].shape, generator=gen), torch.randn(k[:2000].shape, generator=gen))
    assert float(sum(worse[name].mean() for name in vdm.TERMS)) > entropy + 1


# ----------------------------------------------------------------------------
# Time sampling and the loss.


def test_time_sampling_is_uniform_and_stratified():
    from scipy import stats
    gen = torch.Generator().manual_seed(0)
    for mode in vdm.T_SAMPLINGS:
        t = torch.cat([vdm.sample_times(64, mode, generator=gen) for _ in range(100)])
        assert stats.kstest(t.numpy(), 'uniform').pvalue > 1e-3 and ((t >= 0) & (t < 1)).all()
    t = vdm.sample_times(8, 'antithetic', generator=gen)
    torch.testing.assert_close(t[1::2], 1 - t[0::2])
    t = vdm.sample_times(8, 'low_discrepancy', generator=gen)
    assert torch.equal(torch.sort((t * 8).floor()).values, torch.arange(8, dtype=torch.float64))


def test_loss_times_do_not_depend_on_the_split_over_processes():
    loss = vdm.VDMLoss('low_discrepancy', strata=8)
    t = loss.times(list(range(8, 16)), seed=5)
    assert torch.equal(torch.cat([loss.times([8, 10, 12, 14], 5), loss.times([9, 11, 13, 15], 5)])[[0, 4, 1, 5, 2, 6, 3, 7]], t)
    assert torch.equal(torch.sort((t * 8).floor()).values, torch.arange(8, dtype=torch.float64))
    anti = vdm.VDMLoss('antithetic').times([4, 5], seed=5)
    torch.testing.assert_close(anti[1], 1 - anti[0])
    with pytest.raises(ValueError, match='t_sampling'):
        vdm.VDMLoss('sobol')


def _net(schedule='learned', seed=0, **kwargs):
    torch.manual_seed(seed)
    return VDMPrecond(8, 1, schedule=schedule, **TINY_NET, **kwargs)


def _loss_inputs(n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 8, 8), generator=gen).float() / 127.5 - 1
    return images, [misc.seeded_generator(seed, i) for i in range(n)]


def test_variance_gradient_reaches_the_schedule_shape_and_the_bound_reaches_the_rest():
    """One backward of the loss: the network and the endpoints get ∂mean(L)/∂θ; the shape of the learned schedule
    gets ∂mean(L_d²)/∂η (L_d the per-image diffusion term in bits/dim), both recomputed here with autograd."""
    net = _net()
    images, _ = _loss_inputs()
    loss_fn = vdm.VDMLoss(strata=4)
    generators = lambda: [misc.seeded_generator(0, i) for i in range(4)]  # noqa: E731
    loss, diagnostics = loss_fn(net, images, generator=generators(), positions=[0, 1, 2, 3])
    loss.mean().backward()
    got = {name: p.grad.clone() for name, p in net.named_parameters()}
    net.zero_grad()
    # Reference: the same draws, the plain bound and the plain squared diffusion term.
    k = vdm.to_levels(images)
    t = loss_fn.times([0, 1, 2, 3], 0)
    gens = generators()
    noise, noise_0 = misc.randn(images.shape, gens, None), misc.randn(images.shape, gens, None)
    terms = vdm.vlb_terms(lambda z, g: net(z, None, gamma=g), net.schedule, k, t, noise, noise_0)
    bits = {name: vdm.to_bits(v, 64) for name, v in terms.items()}
    torch.testing.assert_close(bits['diffusion'], diagnostics['vdm/diffusion_bpd'])
    shape = [net.schedule.raw_a, net.schedule.raw_w, net.schedule.b, net.schedule.raw_c]
    others = [p for p in net.parameters() if all(p is not q for q in shape)]
    total = sum(bits.values()).mean()
    expected_others = torch.autograd.grad(total, others, retain_graph=True, allow_unused=True)
    expected_shape = torch.autograd.grad((bits['diffusion'] ** 2).mean(), shape)
    names = {id(p): name for name, p in net.named_parameters()}
    for p, g in zip(others, expected_others):
        torch.testing.assert_close(got[names[id(p)]], g if g is not None else torch.zeros_like(p), rtol=1e-4, atol=1e-6)
    for p, g in zip(shape, expected_shape):
        assert g.abs().max() > 0
        torch.testing.assert_close(got[names[id(p)]], g, rtol=1e-4, atol=1e-7)


def test_discrete_time_trains_the_learned_shape_on_the_bound():
    """With --T the bound's mean depends on the shape: every parameter, the shape's included, gets ∂mean(L)/∂θ."""
    net = _net()
    images, _ = _loss_inputs()
    loss_fn = vdm.VDMLoss(strata=4, T=10)
    generators = lambda: [misc.seeded_generator(0, i) for i in range(4)]  # noqa: E731
    loss, _ = loss_fn(net, images, generator=generators(), positions=[0, 1, 2, 3])
    loss.mean().backward()
    got = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    gens = generators()
    noise, noise_0 = misc.randn(images.shape, gens, None), misc.randn(images.shape, gens, None)
    terms = vdm.vlb_terms(lambda z, g: net(z, None, gamma=g), net.schedule, vdm.to_levels(images),
                          loss_fn.times([0, 1, 2, 3], 0), noise, noise_0, T=10)
    total = sum(vdm.to_bits(v, 64) for v in terms.values()).mean()
    expected = torch.autograd.grad(total, list(net.parameters()), allow_unused=True)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e if e is not None else torch.zeros_like(g), rtol=1e-4, atol=1e-7)
    assert expected[[n for n, _ in net.named_parameters()].index('schedule.raw_w')].abs().max() > 0


def test_loss_refuses_augmentation_and_non_8bit_images():
    net = _net('fixed_linear')
    images, gens = _loss_inputs()
    with pytest.raises(ValueError, match='augment'):
        vdm.VDMLoss()(net, images, augment_pipe=object(), generator=gens)
    with pytest.raises(ValueError, match='8-bit'):
        vdm.VDMLoss()(net, images * 0.99, generator=gens)


# ----------------------------------------------------------------------------
# The network as a denoiser, the sampler, snapshots.


def test_vdm_network_is_a_denoiser_whose_epsilon_is_its_output():
    net = _net(fourier_features=(7, 8)).eval()
    assert net.model.enc['8x8_conv'].weight.shape[1] == 1 + 2 * 2
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.01, 1.0, 8.0])
    with torch.no_grad():
        D = net(x, sigma)
        gamma = 2 * sigma.log()
        z = x / (1 + sigma ** 2).sqrt().view(-1, 1, 1, 1)
        eps_hat = net(z, None, gamma=gamma)
        torch.testing.assert_close(D, x - sigma.view(-1, 1, 1, 1) * eps_hat, rtol=1e-5, atol=1e-5)
    assert math.isclose(net.sigma_min, math.exp(-13.3 / 2), rel_tol=1e-5) and math.isclose(net.sigma_max, math.exp(2.5), rel_tol=1e-5)
    with pytest.raises(ValueError, match='ambient'):
        VDMPrecond(8, 2, ambient=True, **TINY_NET)


def test_other_networks_epsilon_is_their_denoiser_on_vdm_points():
    """An EDM-style network models y_k = k/127.5 − 1; VDM's points are x_k = (255/256)·y_k. For y ~ N(μ, s²) with
    its exact denoiser, `denoiser_eps` must give the exact ε̂ of x ~ N(255μ/256, (255s/256)²)."""
    mu, s = 0.2, 0.4
    exact_y = lambda y, sigma, labels=None: mu + s ** 2 / (s ** 2 + sigma.reshape(-1, 1, 1, 1) ** 2) * (y - mu)  # noqa: E731
    gamma = torch.tensor([-12.0, -6.0, 0.0, 4.0], dtype=torch.float64)
    alpha = torch.sigmoid(-gamma).sqrt().view(-1, 1, 1, 1)
    z = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    eps = vdm.denoiser_eps(exact_y)(z, gamma)
    c = 255 / 256
    x, sigma = z / alpha, (gamma / 2).exp().view(-1, 1, 1, 1)
    D_x = c * mu + (c * s) ** 2 / ((c * s) ** 2 + sigma ** 2) * (x - c * mu)
    torch.testing.assert_close(eps.double(), (x - D_x) / sigma, rtol=1e-5, atol=1e-5)


class _GaussianVDM(torch.nn.Module):
    """The exact denoiser of N(μ, s²) data in σ-form, with a VDM schedule: D = μ + s²/(s² + σ²)·(x − μ)."""

    def __init__(self, mu, s, schedule):
        super().__init__()
        self.mu, self.s, self.schedule = mu, s, schedule
        self.img_resolution, self.img_channels, self.label_dim, self.ambient = 1, 1, 0, False

    def forward(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
        return self.mu + self.s ** 2 / (self.s ** 2 + sigma ** 2) * (x - self.mu)


def _seed_formula_sampler(net, latents, T, generator):
    """VDM's ancestral sampler in VP form, written from the paper (Eq. 34): c = −expm1(γ_s − γ_t),
    z_s = (α_s/α_t)(z_t − σ_t·c·ε̂) + σ_s·sqrt(c)·z; returns z_0/α_0."""
    z = latents.double()
    for i in range(T):
        t, s = torch.tensor(1 - i / T), torch.tensor(1 - (i + 1) / T)
        with torch.no_grad():
            g_t, g_s = net.schedule(t.float()).double(), net.schedule(s.float()).double()
        a_t, s_t = torch.sigmoid(-g_t).sqrt(), torch.sigmoid(g_t).sqrt()
        a_s, s_s = torch.sigmoid(-g_s).sqrt(), torch.sigmoid(g_s).sqrt()
        sigma = (g_t / 2).exp()
        eps_hat = (z / a_t - net(z / a_t, sigma)) / sigma
        c = -torch.expm1(g_s - g_t)
        z = (a_s / a_t) * (z - s_t * c * eps_hat) + s_s * c.sqrt() * torch.randn(z.shape, generator=generator, dtype=torch.float64)
    return z / a_s


def test_vdm_sampler_is_the_papers_ancestral_step_and_reaches_the_data_distribution():
    schedule = random_schedule(4)
    net = _GaussianVDM(0.3, 0.5, schedule)
    latents = torch.randn(4000, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    T = 100
    g1 = torch.Generator().manual_seed(1)
    ours = samplers.edm_sampler(net, latents, num_steps=T, solver='vdm',
                                randn_like=lambda x: torch.randn(x.shape, generator=g1, dtype=x.dtype))
    reference = _seed_formula_sampler(net, latents, T, torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    # With many steps the chain reaches N(μ, s²) (coarse ancestral steps lose some variance: E[x | z_t] stands for x).
    g2 = torch.Generator().manual_seed(2)
    net = _GaussianVDM(0.3, 0.5, vdm.NoiseSchedule('fixed_linear'))
    fine = samplers.edm_sampler(net, latents, num_steps=1000, solver='vdm',
                                randn_like=lambda x: torch.randn(x.shape, generator=g2, dtype=x.dtype))
    assert abs(float(fine.mean()) - 0.3) < 4 * 0.5 / math.sqrt(4000)
    assert abs(float(fine.std()) / 0.5 - 1) < 0.03
    # Per-seed independence, as every solver: a sample does not depend on its batch.
    from torch_utils.misc import StackedRandomGenerator
    seeds = [3, 4, 5]
    rnd = StackedRandomGenerator('cpu', seeds)
    both = samplers.edm_sampler(net, rnd.randn([3, 1, 1, 1]), num_steps=10, solver='vdm', randn_like=rnd.randn_like)
    rnd = StackedRandomGenerator('cpu', seeds[1:])
    alone = samplers.edm_sampler(net, rnd.randn([2, 1, 1, 1]), num_steps=10, solver='vdm', randn_like=rnd.randn_like)
    torch.testing.assert_close(both[1:], alone)


def test_vdm_solver_needs_a_vdm_network_and_edm_solvers_run_on_vdm_networks():
    net = _net('fixed_linear').eval()
    latents = torch.randn(2, 1, 8, 8)
    for solver in ('heun', 'euler', 'ddim', 'vdm'):
        out = samplers.edm_sampler(net, latents, num_steps=4, solver=solver)
        assert out.shape == latents.shape and torch.isfinite(out).all()
    plain = _GaussianVDM(0.0, 0.5, None)
    del plain.schedule
    with pytest.raises(ValueError, match='VDM network'):
        samplers.edm_sampler(plain, torch.randn(2, 1, 1, 1), num_steps=4, solver='vdm')


def test_snapshot_round_trip_keeps_the_learned_schedule(tmp_path):
    from training import snapshots
    net = _net('learned')
    with torch.no_grad():
        net.schedule.gamma_0.add_(0.4)
        net.schedule.raw_c.mul_(3)
    kwargs = dict(class_name='training.networks.VDMPrecond', img_resolution=8, img_channels=1, schedule='learned',
                  **TINY_NET)
    config = dict(network_kwargs=kwargs, loss_kwargs={}, augment_kwargs=None, dataset_kwargs={}, corruption=None)
    path = snapshots.save_snapshot(str(tmp_path), net, 1000, config)
    loaded, info = snapshots.load_network(path)
    t = torch.linspace(0, 1, 11)
    with torch.no_grad():
        torch.testing.assert_close(loaded.schedule(t), net.schedule(t))
    assert loaded.sigma_min == net.sigma_min
