"""Tests for the DDIM / DDPM solvers and classifier-free guidance (training/samplers.py, eval.py, train.py).

SPEC §3 "DDPM / DDIM": in σ-form (x_σ = x_t/sqrt(ᾱ_t), σ² = (1 − ᾱ)/ᾱ) DDIM(η) is Song et al.'s Eq. 12, η = 0 is
EDM's Euler step on the same grid, η = 1 the DDPM posterior step (variance β̃); no noise at the last step.
The references below are written in VP form, independently of `ddim_step`'s σ-form algebra.
"""

import glob
import math
import os

import numpy as np
import PIL.Image
import pytest
import torch

import dnnlib
import eval as eval_cli
import train
from conftest import random_images, write_edm_dataset
from test_eval import TINY, invoke, run_dir  # noqa: F401 (run_dir: the tiny unconditional run fixture)
from test_samplers import GaussianNet, Recorder, SmoothNet, _Net, _sigma, tiny_songunet
from torch_utils.ambient_diffusion import MaskCorruption
from torch_utils.images import to_uint8
from training import cli, samplers, snapshots, solvers
from training.networks import EDMPrecond

# ----------------------------------------------------------------------------
# Test networks and VP-form references.


class SmoothCleanNet(_Net):
    """A tiny smooth clean denoiser in float64 (nonlinear in x and σ), so solver differences are not hidden."""

    def __init__(self, channels=2, resolution=5, seed=0):
        super().__init__(channels, resolution, ambient=False)
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn([4, channels, 3, 3], generator=g, dtype=torch.float64) * 0.4
        self.w2 = torch.randn([channels, 4, 3, 3], generator=g, dtype=torch.float64) * 0.4

    def forward(self, x, sigma, class_labels=None):
        sigma = _sigma(sigma, x)
        c_in = 1 / (sigma ** 2 + 0.25).sqrt()
        h = torch.tanh(torch.nn.functional.conv2d(x.to(torch.float64) * c_in, self.w1, padding=1))
        F = torch.tanh(torch.nn.functional.conv2d(h, self.w2, padding=1))
        return 0.25 / (sigma ** 2 + 0.25) * x + sigma * 0.5 / (sigma ** 2 + 0.25).sqrt() * F


class ToyConditionalNet(_Net):
    """D(x, σ, y) = (x·(1 + y·a) + y·b)/(1 + σ²) per sample, float64: labels change the output, zeros are a class."""

    def __init__(self, label_dim=3, channels=1, resolution=4):
        super().__init__(channels, resolution, ambient=False)
        self.label_dim = label_dim
        self.a = torch.linspace(0.2, 0.9, label_dim, dtype=torch.float64)
        self.b = torch.linspace(-0.5, 0.7, label_dim, dtype=torch.float64)

    def forward(self, x, sigma, class_labels=None):
        y = class_labels.to(torch.float64)
        scale = (1 + y @ self.a).reshape(-1, 1, 1, 1)
        shift = (y @ self.b).reshape(-1, 1, 1, 1)
        return (x.to(torch.float64) * scale + shift) / (1 + _sigma(sigma, x) ** 2)


def vp_ddim_step(x_sigma, D, t, t_next, eta, z):
    """DDIM (Song et al. 2021, Eq. 12) on x_t = sqrt(ᾱ_t)·x_σ, returned in σ-form: numpy float64."""
    ab, ab_prev = 1 / (1 + t ** 2), 1 / (1 + t_next ** 2)
    x_t = math.sqrt(ab) * x_sigma
    eps = (x_t - math.sqrt(ab) * D) / math.sqrt(1 - ab)
    sigma_eta = eta * math.sqrt((1 - ab_prev) / (1 - ab)) * math.sqrt(1 - ab / ab_prev)
    x_prev = math.sqrt(ab_prev) * D + math.sqrt(1 - ab_prev - sigma_eta ** 2) * eps + sigma_eta * z
    return x_prev / math.sqrt(ab_prev)


def vp_ddpm_step(x_sigma, D, t, t_next, variance, z):
    """DDPM ancestral step (Ho et al. 2020, Eqs. 6-7): posterior mean μ̃(x_t, x̂0), variance β̃ or β; σ-form."""
    ab, ab_prev = 1 / (1 + t ** 2), 1 / (1 + t_next ** 2)
    alpha = ab / ab_prev
    beta = 1 - alpha
    x_t = math.sqrt(ab) * x_sigma
    mean = math.sqrt(ab_prev) * beta / (1 - ab) * D + math.sqrt(alpha) * (1 - ab_prev) / (1 - ab) * x_t
    var = beta if variance == 'beta' else (1 - ab_prev) / (1 - ab) * beta
    return (mean + math.sqrt(var) * z) / math.sqrt(ab_prev)


def gaussian_chain_moments(num_steps, mu, s, kind, eta=0.0, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """Exact mean and std of x_N for the DDIM(η)/DDPM chain with the exact denoiser of N(μ, s²) data.

    Every step is linear-Gaussian in VP form: x̂0 = k·x_σ + (1 − k)μ with k = s²/(s² + σ²), then
    x_prev = c0·x̂0 + c_t·x_t + std·z, so mean and variance follow in closed form.
    """
    ramp = np.arange(num_steps) / max(num_steps - 1, 1)
    t = list((sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho) + [0.0]
    mean, var = 0.0, sigma_max ** 2                                    # x_σ = σmax·z
    for t_cur, t_next in zip(t[:-1], t[1:]):
        k = s ** 2 / (s ** 2 + t_cur ** 2)
        D_mean, D_var, D_gain = k * mean + (1 - k) * mu, k * k * var, k   # x̂0 = k·x + (1 − k)μ
        if t_next == 0:
            mean, var = D_mean, D_var
            continue
        ab, ab_prev = 1 / (1 + t_cur ** 2), 1 / (1 + t_next ** 2)
        if kind == 'ddim':
            sigma_eta = eta * math.sqrt((1 - ab_prev) / (1 - ab)) * math.sqrt(1 - ab / ab_prev)
            c_eps = math.sqrt(1 - ab_prev - sigma_eta ** 2) / math.sqrt(1 - ab)
            c0, ct, std = math.sqrt(ab_prev) - c_eps * math.sqrt(ab), c_eps, sigma_eta
        else:
            beta = 1 - ab / ab_prev
            c0, ct = math.sqrt(ab_prev) * beta / (1 - ab), math.sqrt(ab / ab_prev) * (1 - ab_prev) / (1 - ab)
            std = math.sqrt(beta if kind == 'beta' else (1 - ab_prev) / (1 - ab) * beta)
        # x_prev = c0·x̂0 + ct·sqrt(ᾱ)·x_σ + std·z; x̂0 = D_gain·x_σ + const.
        gain = c0 * D_gain + ct * math.sqrt(ab)
        mean = (c0 * (D_mean - D_gain * mean) + gain * mean) / math.sqrt(ab_prev)
        var = (gain ** 2 * var + std ** 2) / ab_prev
    return mean, math.sqrt(var)


def seeded_randn_like(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda v: torch.randn(v.shape, generator=g, dtype=v.dtype)


def no_noise(v):
    raise AssertionError('this step must not draw noise')

# ----------------------------------------------------------------------------
# 1. DDIM(η = 0) is EDM's Euler solver on the same grid.


def test_ddim_eta0_equals_euler_edm_sampler():
    net = SmoothCleanNet()
    latents = torch.randn([3, 2, 5, 5], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kwargs = dict(num_steps=7, sigma_min=0.01, sigma_max=20)
    x_euler = samplers.edm_sampler(net, latents, solver='euler', randn_like=no_noise, **kwargs)
    x_ddim = samplers.edm_sampler(net, latents, solver='ddim', eta=0.0, randn_like=no_noise, **kwargs)
    assert x_ddim.dtype == torch.float64
    torch.testing.assert_close(x_ddim, x_euler, rtol=1e-12, atol=1e-12)
    # Not trivially equal: Heun differs from both on this coarse grid.
    x_heun = samplers.edm_sampler(net, latents, solver='heun', **kwargs)
    assert (x_heun - x_euler).abs().max() > 1e-3


@pytest.mark.parametrize('k, guidance_scale', [(1, 0.0), (3, 0.4)])
def test_ddim_eta0_equals_euler_ambient_sampler(k, guidance_scale):
    net = SmoothNet()
    g = torch.Generator().manual_seed(1)
    latents = torch.randn([2, 2, 5, 5], generator=g, dtype=torch.float64)
    masks = (torch.rand([2, k, 2, 5, 5], generator=g) > 0.3).float()
    kwargs = dict(num_steps=6, sigma_min=0.01, sigma_max=20, guidance_scale=guidance_scale, clipping='dynamic')
    x_euler = samplers.ambient_sampler(net, latents, masks, solver='euler', randn_like=no_noise, **kwargs)
    x_ddim = samplers.ambient_sampler(net, latents, masks, solver='ddim', eta=0.0, randn_like=no_noise, **kwargs)
    torch.testing.assert_close(x_ddim, x_euler, rtol=1e-12, atol=1e-12)

# ----------------------------------------------------------------------------
# 2. Exact Gaussian denoiser: every solver reaches N(μ, s²), closer with more steps.

SOLVER_CASES = {'ddim(0)': (dict(solver='ddim', eta=0.0), ('ddim', 0.0)),
                'ddim(0.5)': (dict(solver='ddim', eta=0.5), ('ddim', 0.5)),
                'ddpm(beta_tilde)': (dict(solver='ddpm', variance='beta_tilde'), ('beta_tilde', 0.0)),
                'ddpm(beta)': (dict(solver='ddpm', variance='beta'), ('beta', 0.0))}


def test_gaussian_chain_moments_converge_to_the_data():
    """The exact moments of each discrete chain (VP-form recursion) tend to N(μ, s²) as the steps grow."""
    mu, s = 0.3, 0.5
    for name, (_, (kind, eta)) in SOLVER_CASES.items():
        errors = [abs(gaussian_chain_moments(n, mu, s, kind, eta)[1] / s - 1) for n in (5, 10, 18, 50, 200, 1000)]
        assert all(a > b for a, b in zip(errors, errors[1:])), (name, errors)   # fewer steps are worse
        assert errors[-2] < 0.035 and errors[-1] < 0.007, (name, errors)       # first order in the step
        mean = gaussian_chain_moments(200, mu, s, kind, eta)[0]
        # The ODE keeps the prior mismatch N(0, σmax²) vs N(μ, s² + σmax²): a mean offset ≈ μ·s/σmax.
        assert abs(mean - mu) < mu * s / 80 + 1e-4, (name, mean)


@pytest.mark.slow
@pytest.mark.parametrize('name', list(SOLVER_CASES))
def test_solvers_sample_the_exact_gaussian_chain(name):
    mu, s, n_samples = 0.3, 0.5, 4096
    kwargs, (kind, eta) = SOLVER_CASES[name]
    latents = torch.randn([n_samples, 1, 4, 4], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    n = latents.numel()                                                # pixels are i.i.d.
    std_error = {}
    for num_steps in (10, 200):
        x = samplers.edm_sampler(GaussianNet(mu, s), latents, num_steps=num_steps, randn_like=seeded_randn_like(5),
                                 **kwargs)
        mean, std = gaussian_chain_moments(num_steps, mu, s, kind, eta)
        assert abs(float(x.mean()) - mean) < 4 * std / math.sqrt(n), (num_steps, float(x.mean()), mean)
        assert abs(float(x.std()) / std - 1) < 4 * math.sqrt(0.5 / n), (num_steps, float(x.std()), std)
        std_error[num_steps] = abs(float(x.std()) / s - 1)
    # 200 steps reach the data within the discretisation error (< 3.5% in scale), 10 steps are far off.
    assert std_error[200] < 0.035 + 4 * math.sqrt(0.5 / n)
    assert std_error[10] > std_error[200] + 0.05

# ----------------------------------------------------------------------------
# 3. DDIM(η = 1) is DDPM with β̃, sample for sample.


@pytest.mark.parametrize('ambient', [False, True])
def test_ddim_eta1_equals_ddpm_beta_tilde(ambient):
    net = tiny_songunet(ambient=ambient, label_dim=2)
    kwargs = dict(num_steps=4)
    if ambient:
        kwargs.update(corruption=MaskCorruption('dust', corruption_probability=0.4, delta_probability=0.1))
    ddim = samplers.generate_batch(net, [0, 1, 2], solver='ddim', eta=1.0, **kwargs)
    ddpm = samplers.generate_batch(net, [0, 1, 2], solver='ddpm', variance='beta_tilde', **kwargs)
    assert torch.equal(ddim, ddpm)
    # The noise matters: another variance or η gives other samples.
    beta = samplers.generate_batch(net, [0, 1, 2], solver='ddpm', variance='beta', **kwargs)
    half = samplers.generate_batch(net, [0, 1, 2], solver='ddim', eta=0.5, **kwargs)
    assert (beta - ddpm).abs().max() > 1e-3 and (half - ddpm).abs().max() > 1e-3

# ----------------------------------------------------------------------------
# 4. ddim_step against the VP-form references.

T_PAIRS = [(80.0, 57.3), (2.5, 1.7), (1.0, 0.4), (0.05, 0.002)]


@pytest.mark.parametrize('t_cur, t_next', T_PAIRS)
@pytest.mark.parametrize('eta', [0.0, 0.3, 1.0])
def test_ddim_step_matches_vp_form(t_cur, t_next, eta):
    g = torch.Generator().manual_seed(2)
    x = torch.randn([2, 3, 4, 4], generator=g, dtype=torch.float64) * math.sqrt(1 + t_cur ** 2)
    D = torch.randn([2, 3, 4, 4], generator=g, dtype=torch.float64) * 0.5
    z = torch.randn([2, 3, 4, 4], generator=g, dtype=torch.float64)
    calls = []
    out = samplers.ddim_step(x, D, torch.tensor(t_cur, dtype=torch.float64), torch.tensor(t_next, dtype=torch.float64),
                             eta=eta, randn_like=lambda v: calls.append(1) or z)
    expected = vp_ddim_step(x.numpy(), D.numpy(), t_cur, t_next, eta, z.numpy())
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-9, atol=1e-12 * (1 + t_cur))
    assert len(calls) == (1 if eta > 0 else 0)
    if eta == 1.0:   # DDIM(1) is the DDPM posterior step with β̃ (Ho et al. Eq. 7)
        np.testing.assert_allclose(out.numpy(), vp_ddpm_step(x.numpy(), D.numpy(), t_cur, t_next, 'beta_tilde',
                                                              z.numpy()), rtol=1e-9, atol=1e-12 * (1 + t_cur))


@pytest.mark.parametrize('t_cur, t_next', T_PAIRS)
def test_ddpm_beta_step_matches_vp_form(t_cur, t_next):
    g = torch.Generator().manual_seed(3)
    x = torch.randn([2, 1, 4, 4], generator=g, dtype=torch.float64) * math.sqrt(1 + t_cur ** 2)
    D = torch.randn([2, 1, 4, 4], generator=g, dtype=torch.float64) * 0.5
    z = torch.randn([2, 1, 4, 4], generator=g, dtype=torch.float64)
    out = samplers.ddim_step(x, D, torch.tensor(t_cur, dtype=torch.float64), torch.tensor(t_next, dtype=torch.float64),
                             eta=0.0, variance='beta', randn_like=lambda v: z)   # η is ignored with 'beta'
    expected = vp_ddpm_step(x.numpy(), D.numpy(), t_cur, t_next, 'beta', z.numpy())
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-9, atol=1e-12 * (1 + t_cur))


@pytest.mark.parametrize('eta, variance', [(0.0, 'beta_tilde'), (0.7, 'beta_tilde'), (1.0, 'beta_tilde'), (0.0, 'beta')])
def test_last_step_returns_D_without_noise(eta, variance):
    x = torch.randn([2, 1, 3, 3], dtype=torch.float64)
    D = torch.randn([2, 1, 3, 3], dtype=torch.float64)
    zero = torch.zeros([], dtype=torch.float64)
    out = samplers.ddim_step(x, D, torch.tensor(0.002, dtype=torch.float64), zero, eta, variance, no_noise)
    assert torch.equal(out, D)
    # Through the sampler: a one-step sampler returns D(σmax·z) itself.
    latents = torch.randn([2, 1, 4, 4], dtype=torch.float64)
    solver = 'ddpm' if variance == 'beta' or eta == 1.0 else 'ddim'
    opts = dict(variance=variance) if solver == 'ddpm' else dict(eta=eta)
    out = samplers.edm_sampler(GaussianNet(0.1, 0.4), latents, num_steps=1, solver=solver, randn_like=no_noise, **opts)
    torch.testing.assert_close(out, GaussianNet(0.1, 0.4)(latents * 80, 80.0), rtol=0, atol=0)

# ----------------------------------------------------------------------------
# 5. Per-seed randomness: a sample does not depend on its batch.


@pytest.mark.slow
@pytest.mark.parametrize('ambient, options', [
    (False, dict(solver='ddim', eta=0.5)), (False, dict(solver='ddpm')),
    (True, dict(solver='ddim', eta=0.5)), (True, dict(solver='ddpm', variance='beta'))],
    ids=['clean-ddim', 'clean-ddpm', 'ambient-ddim', 'ambient-ddpm-beta'])
def test_stochastic_solvers_are_batch_independent(ambient, options):
    net = tiny_songunet(ambient=ambient, label_dim=3)
    kwargs = dict(num_steps=3, **options)
    if ambient:
        kwargs.update(corruption=MaskCorruption('dust', corruption_probability=0.5, delta_probability=0.1),
                      num_masks=2, guidance_scale=0.3)
    whole = samplers.generate_batch(net, list(range(5)), **kwargs)
    parts = torch.cat([samplers.generate_batch(net, [0], **kwargs), samplers.generate_batch(net, [1, 2, 3, 4], **kwargs)])
    torch.testing.assert_close(whole, parts, atol=1e-5, rtol=0)
    assert not torch.allclose(whole[0], whole[1], atol=1e-3)

# ----------------------------------------------------------------------------
# 6. Classifier-free guidance.


def one_hot(classes, label_dim=3):
    return torch.nn.functional.one_hot(torch.as_tensor(classes), label_dim).to(torch.float64)


def test_cfg_is_the_linear_combination_in_one_call():
    net = ToyConditionalNet()
    g = torch.Generator().manual_seed(4)
    x = torch.randn([4, 1, 4, 4], generator=g, dtype=torch.float64)
    labels, zeros = one_hot([0, 2, 1, 2]), torch.zeros([4, 3], dtype=torch.float64)
    sigma = torch.tensor([0.3, 1.0, 2.0, 5.0], dtype=torch.float64)         # per-sample σ
    D_c, D_u = net(x, sigma, labels), net(x, sigma, zeros)
    assert (D_c - D_u).abs().mean() > 0.1
    for w, expected in [(1.0, D_c), (0.0, D_u), (2.0, 2 * D_c - D_u), (3.5, D_u + 3.5 * (D_c - D_u))]:
        recorder = Recorder(net)
        D = samplers.ClassifierFreeGuidance(recorder, w)(x, sigma, labels)
        torch.testing.assert_close(D, expected, rtol=1e-13, atol=1e-13)
        assert [c['rows'] for c in recorder.calls] == [8]                 # one network call of batch 2N
    # Scalar σ too.
    torch.testing.assert_close(samplers.ClassifierFreeGuidance(net, 2.0)(x, 1.5, labels),
                               2 * net(x, 1.5, labels) - net(x, 1.5, zeros), rtol=1e-13, atol=1e-13)


@pytest.mark.slow
def test_cfg_on_a_songunet_and_through_the_samplers():
    net = tiny_songunet(ambient=False, label_dim=3)
    g = torch.Generator().manual_seed(5)
    x = torch.randn([3, 3, 16, 16], generator=g) * 2
    labels = one_hot([0, 1, 2]).float()
    with torch.no_grad():
        D_c, D_u = net(x, 2.0, labels), net(x, 2.0, torch.zeros_like(labels))
        assert (D_c - D_u).abs().max() > 1e-2
        for w, expected in [(1.0, D_c), (0.0, D_u), (2.0, 2 * D_c - D_u)]:
            torch.testing.assert_close(samplers.ClassifierFreeGuidance(net, w)(x, 2.0, labels), expected,
                                       atol=1e-5, rtol=1e-5)
    # Samplers: one call of batch 2N per evaluation (Euler/DDIM: N evaluations, Heun: 2N − 1).
    for solver, expected_calls in [('ddim', 4), ('ddpm', 4), ('heun', 7)]:
        recorder = Recorder(net).eval()
        cfg = samplers.ClassifierFreeGuidance(recorder, 2.0)
        samplers.generate_batch(cfg, [0, 1, 2], num_steps=4, solver=solver)
        assert [c['rows'] for c in recorder.calls] == [6] * expected_calls, solver
    # w = 1 samples like the plain conditional network (same seeds, same classes).
    plain = samplers.generate_batch(net, [0, 1], num_steps=3, solver='ddim', eta=0.5)
    torch.testing.assert_close(samplers.generate_batch(samplers.ClassifierFreeGuidance(net, 1.0), [0, 1], num_steps=3,
                                                       solver='ddim', eta=0.5), plain, atol=1e-4, rtol=0)
    # An ambient conditional network: the wrapper passes the masks' [N·K] batch through.
    amb = tiny_songunet(ambient=True, label_dim=3)
    kwargs = dict(corruption=MaskCorruption('dust', corruption_probability=0.4, delta_probability=0.1), num_masks=2,
                  guidance_scale=0.5, num_steps=3, solver='ddpm')
    torch.testing.assert_close(samplers.generate_batch(samplers.ClassifierFreeGuidance(amb, 1.0), [0, 1], **kwargs),
                               samplers.generate_batch(amb, [0, 1], **kwargs), atol=1e-4, rtol=0)


def test_cfg_refusals():
    with pytest.raises(ValueError, match='class-conditional'):
        samplers.ClassifierFreeGuidance(tiny_songunet(ambient=False), 2.0)
    with pytest.raises(ValueError, match='class-conditional'):
        samplers.ClassifierFreeGuidance(GaussianNet(0, 1), 2.0)
    cfg = samplers.ClassifierFreeGuidance(ToyConditionalNet(), 2.0)
    with pytest.raises(ValueError, match='class labels'):
        cfg(torch.zeros([2, 1, 4, 4], dtype=torch.float64), 1.0, None)
    for bad in (-1.0, math.inf, True):
        with pytest.raises(ValueError, match='cfg_scale'):
            samplers.ClassifierFreeGuidance(ToyConditionalNet(), bad)

# ----------------------------------------------------------------------------
# 7. Command lines.


def error_line(result, *words):
    """The command failed with one `Error: ...` line (no traceback) that contains `words`."""
    assert result.exit_code != 0 and 'Traceback' not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert len(lines) == 1 and all(w in lines[0] for w in words), result.output
    return lines[0]


def randomize(net, seed=0):
    """Larger random weights than two training steps give, so that labels change the samples visibly."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for p in net.parameters():
            p.data.normal_(0, 0.1) if p.ndim > 1 else None
    return net


@pytest.fixture(scope='module')
def cond_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('cond')
    data = write_edm_dataset(root / 'data.zip', random_images(8, channels=3, resolution=16, seed=4),
                             labels=np.arange(8) % 3)
    invoke(train.main, ['--outdir', root / 'run', '--data', data, '--cond=True', '--label_dropout=0.2', *TINY])
    return root / 'run'


def pngs(folder):
    return sorted(glob.glob(os.path.join(folder, '*.png')))


def read_png(path):
    return np.array(PIL.Image.open(path))


@pytest.mark.slow
def test_generate_with_ddim_and_ddpm(run_dir, tmp_path):
    common = ['generate', '--network', run_dir, '--latest', '--seeds=0-2', '--steps=3']
    for name, options in [('ddim', ['--solver=ddim', '--eta=0.5']), ('ddpm', ['--solver=ddpm', '--ddpm_variance=beta']),
                          ('ddpm_tilde', ['--solver=ddpm'])]:
        invoke(eval_cli.cli, common + ['--outdir', tmp_path / name, *options])
        assert len(pngs(tmp_path / name / '000000.008')) == 3
    # The options reach the sampler: the images are generate_batch's for these options.
    net, info = snapshots.load_network(sorted(glob.glob(str(run_dir / 'network-snapshot-*.pt')))[-1])
    corruption = cli.sampling_corruption(info, dnnlib.EasyDict(corruption_pattern=None, corruption_probability=None,
                                                               delta_probability=None, mask_full_rgb=None))
    for name, options in [('ddim', dict(solver='ddim', eta=0.5)), ('ddpm', dict(solver='ddpm', variance='beta'))]:
        expected = to_uint8(samplers.generate_batch(net, [0, 1, 2], corruption=corruption, num_steps=3, clipping='static',
                                                    **options))
        got = np.stack([read_png(p) for p in pngs(tmp_path / name / '000000.008')])
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1, name
    beta = np.stack([read_png(p) for p in pngs(tmp_path / 'ddpm' / '000000.008')])
    tilde = np.stack([read_png(p) for p in pngs(tmp_path / 'ddpm_tilde' / '000000.008')])
    assert not np.array_equal(beta, tilde)


@pytest.mark.parametrize('options, words', [
    (['--eta=0.5'], ['--eta', 'ddim']),
    (['--solver=ddpm', '--eta=0.5'], ['--eta', 'ddim']),
    (['--ddpm_variance=beta'], ['--ddpm_variance', 'ddpm']),
    (['--solver=ddim', '--ddpm_variance=beta'], ['--ddpm_variance', 'ddpm']),
    (['--S_churn=1', '--solver=ddim'], ['--S_churn']),
    (['--S_churn=1', '--solver=ddpm'], ['--S_churn']),
    (['--S_churn=1', '--solver=dpmpp2m'], ['--S_churn', 'no churn']),
    (['--cfg_scale=2'], ['class-conditional']),
    (['--class_grid=2', '--class=1'], ['--class_grid', '--class']),
    (['--class_grid=2'], ['--class_grid', 'unconditional'])])
def test_generate_refuses(run_dir, tmp_path, options, words):
    result = invoke(eval_cli.cli, ['generate', '--network', run_dir, '--latest', '--outdir', tmp_path / 'out',
                                   '--seeds=0-1', '--steps=2', *options], expect_ok=False)
    error_line(result, *words)
    assert not pngs(tmp_path / 'out' / '000000.008')   # refused before generating anything


@pytest.mark.slow
def test_cfg_class_grid_on_a_conditional_run(cond_run, tmp_path, monkeypatch):
    load_network = snapshots.load_network

    def load_randomized(*args, **kwargs):
        net, info = load_network(*args, **kwargs)
        return randomize(net), info

    monkeypatch.setattr(eval_cli.snapshots, 'load_network', load_randomized)
    out = tmp_path / 'out'
    invoke(eval_cli.cli, ['generate', '--network', cond_run, '--latest', '--outdir', out, '--seeds=0-3', '--steps=3',
                          '--cfg_scale=2', '--class_grid=3', '--solver=ddim', '--eta=0.5', '--num_masks=2',
                          '--guidance_scale=0.5', '--resample_guidance_masks'])
    grid = read_png(out / 'class-grid-000000.008.png')
    assert grid.shape == (3 * 16, 3 * 16, 3)   # one row per class, the first 3 seeds; save_image_grid pads 0
    assert len(pngs(out / '000000.008')) == 4

    net, info = snapshots.load_network(sorted(glob.glob(str(cond_run / 'network-snapshot-*.pt')))[-1])
    assert info.label_dim == 3
    corruption = cli.sampling_corruption(info, dnnlib.EasyDict(corruption_pattern=None, corruption_probability=None,
                                                               delta_probability=None, mask_full_rgb=None))
    cfg = samplers.ClassifierFreeGuidance(randomize(net), 2.0)
    kwargs = dict(corruption=corruption, num_steps=3, solver='ddim', eta=0.5, clipping='static',  # the CLI's default
                  num_masks=2, guidance_scale=0.5, resample_guidance_masks=True)
    for k in range(3):
        row = to_uint8(samplers.generate_batch(cfg, [0, 1, 2], class_labels=k, **kwargs))   # [3, 16, 16, 3]
        assert np.abs(grid[16 * k:16 * (k + 1)].astype(int) - np.concatenate(list(row), axis=1).astype(int)).max() <= 1
    assert not np.array_equal(grid[:16], grid[16:32]) and not np.array_equal(grid[16:32], grid[32:])
    # The per-seed images are guided too (random classes), and guidance changes them.
    got = np.stack([read_png(p) for p in pngs(out / '000000.008')])
    guided = to_uint8(samplers.generate_batch(cfg, [0, 1, 2, 3], **kwargs))
    unguided = to_uint8(samplers.generate_batch(cfg.net, [0, 1, 2, 3], **kwargs))
    assert np.abs(got.astype(int) - guided.astype(int)).max() <= 1
    assert np.abs(got.astype(int) - unguided.astype(int)).max() > 5


def test_train_refuses_label_dropout_without_labels(tmp_path):
    data = write_edm_dataset(tmp_path / 'data.zip', random_images(4, channels=3, resolution=16, seed=4),
                             labels=np.arange(4) % 2)
    result = invoke(train.main, ['--outdir', tmp_path / 'run', '--data', data, '--label_dropout=0.2', *TINY],
                    expect_ok=False)
    error_line(result, '--label_dropout', '--cond=True')
    assert not os.path.exists(tmp_path / 'run' / 'log.txt')

# ----------------------------------------------------------------------------
# 8. train.py --label_dropout drops labels in training mode.


@pytest.mark.slow
def test_label_dropout_drops_labels_in_training_mode(cond_run):
    net, info = snapshots.load_network(sorted(glob.glob(str(cond_run / 'network-snapshot-*.pt')))[-1])
    assert info.network_kwargs['label_dropout'] == 0.2 and net.model.label_dropout == 0.2
    randomize(net)
    g = torch.Generator().manual_seed(6)
    n = 256
    x = torch.randn([n, net.img_channels, 16, 16], generator=g)
    labels = torch.eye(3)[torch.randint(3, [n], generator=g)]
    with torch.no_grad():
        D_c, D_u = net.eval()(x, 1.0, labels), net(x, 1.0, torch.zeros_like(labels))
        gap = (D_c - D_u).flatten(1).abs().amax(1)
        assert gap.min() > 1e-3
        net.train()
        draws = []
        with torch.random.fork_rng():
            torch.manual_seed(0)
            for _ in range(2):
                D = net(x, 1.0, labels)
                err_c, err_u = [(D - ref).flatten(1).abs().amax(1) for ref in (D_c, D_u)]
                dropped = err_u < 1e-5
                assert torch.all(dropped ^ (err_c < 1e-5))       # each sample: its label or no label
                draws.append(dropped)
    for dropped in draws:
        assert abs(float(dropped.float().mean()) - 0.2) < 4 * math.sqrt(0.2 * 0.8 / n)
    assert not torch.equal(draws[0], draws[1])                 # redrawn at every call
    net.eval()


def test_cfg_needs_a_network_trained_with_label_dropout():
    net = tiny_songunet(ambient=False, label_dim=3)
    net.model.label_dropout = 0
    with pytest.raises(ValueError, match='label dropout'):
        samplers.ClassifierFreeGuidance(net, 2.0)


# ----------------------------------------------------------------------------
# DPM-Solver++(2M).

def _dpmpp_2m_vp(denoise, latents, t_steps):
    """DPM-Solver++(2M) written in the paper's VP form (Lu et al. 2022, Alg. 2): α_t = 1/sqrt(1 + σ²), σ_t = σ·α_t,
    λ = log(α_t/σ_t), x_t = (σ_t/σ_s)·x_s − α_t·(e^{−h} − 1)·D̃; returns the σ-form x at the end (x_vp/α)."""
    alpha = lambda s: 1 / (1 + s ** 2).sqrt()  # noqa: E731
    lam = lambda s: -torch.log(s)  # noqa: E731
    x = latents.double() * t_steps[0] * alpha(t_steps[0])
    D_prev = None
    for i in range(len(t_steps) - 1):
        s, t = t_steps[i], t_steps[i + 1]
        D = denoise(x / alpha(s), s)
        if t == 0:
            return D
        h = lam(t) - lam(s)
        D_tilde = D if D_prev is None else (1 + 1 / (2 * (lam(s) - lam(t_steps[i - 1])) / h)) * D - (
            1 / (2 * (lam(s) - lam(t_steps[i - 1])) / h)) * D_prev
        x = (t * alpha(t)) / (s * alpha(s)) * x - alpha(t) * torch.expm1(-h) * D_tilde
        D_prev = D
    return x / alpha(t_steps[-1])


def test_dpmpp_2m_is_the_papers_vp_form_and_second_order():
    mu, s = 0.3, 0.5
    exact = lambda x, sigma: mu + s ** 2 / (s ** 2 + torch.as_tensor(sigma, dtype=torch.float64) ** 2) * (x - mu)  # noqa: E731
    latents = torch.randn(64, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t_steps = samplers.edm_time_steps(12, 0.002, 80, 7)
    ours = solvers._integrate(exact, latents, t_steps, None, lambda t: t, 0, 0, float('inf'), 1, 'dpmpp2m')
    torch.testing.assert_close(ours, _dpmpp_2m_vp(exact, latents, t_steps), rtol=1e-10, atol=1e-10)

    # The probability-flow ODE of N(μ, s²) data is solved exactly by x(σ) = μ + (x(σ_0) − μ)·sqrt((s² + σ²)/(s² + σ_0²)).
    def error(solver, n):
        t = samplers.edm_time_steps(n, 0.002, 80, 7)
        x = solvers._integrate(exact, latents, t, None, lambda v: v, 0, 0, float('inf'), 1, solver)
        truth = mu + (latents * 80 - mu) * ((s ** 2 + 0.002 ** 2) / (s ** 2 + 80 ** 2)) ** 0.5
        truth = exact(truth, 0.002)  # the last step denoises at σ_min
        return float((x - truth).abs().max())
    e2m = [error('dpmpp2m', n) for n in (16, 32, 64)]
    eul = [error('euler', n) for n in (16, 32, 64)]
    assert e2m[0] / e2m[1] > 3 and e2m[1] / e2m[2] > 3  # second order: halving the step quarters the error
    assert eul[1] / eul[2] < 2.5 and all(a < b for a, b in zip(e2m, eul))


def test_dpmpp_2m_in_samplers_and_its_refusals():
    torch.manual_seed(0)
    net = EDMPrecond(8, 1, model_type='SongUNet', model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    latents = torch.randn(2, 1, 8, 8)
    calls = []
    counted = lambda x, sigma, labels=None: calls.append(1) or net(x, sigma, labels)  # noqa: E731
    counted.sigma_min, counted.sigma_max = 0, float('inf')
    out = samplers.edm_sampler(counted, latents, num_steps=7, solver='dpmpp2m')
    assert len(calls) == 7 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match='takes no churn'):
        samplers.edm_sampler(net, latents, num_steps=4, solver='dpmpp2m', S_churn=1)
    with pytest.raises(ValueError, match='multistep'):
        solvers.solver_step(lambda x, t: x, latents.double(), torch.tensor(1.0), torch.tensor(0.5), 'dpmpp2m')


def test_dpmpp_2m_on_a_discrete_grid_with_repeated_levels_and_in_the_ambient_sampler():
    from training.networks import DDPMPrecond
    torch.manual_seed(0)
    net = DDPMPrecond(8, 1, T=100, model_type='SongUNet', model_channels=8, channel_mult=[1], num_blocks=1,
                      attn_resolutions=[]).eval()
    t_steps = samplers.sampling_time_steps(net, 100, 0.002, 80, 7, 'dpmpp2m')
    assert (t_steps[1:-1] == t_steps[:-2]).any()  # the rounded grid repeats levels
    out = samplers.edm_sampler(net, torch.randn(2, 1, 8, 8), num_steps=100, solver='dpmpp2m')
    assert torch.isfinite(out).all()
    # A repeated level is no step: x is unchanged, and the next step is first order.
    x, D = torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.randn(2, 1, 4, 4, dtype=torch.float64)
    one = torch.tensor(1.0, dtype=torch.float64)
    assert torch.equal(solvers.dpmpp_2m_step(x, D, D + 1, one * 2, one, one), x)
    torch.testing.assert_close(solvers.dpmpp_2m_step(x, D, D + 1, one, one, one / 2),
                               solvers.dpmpp_2m_step(x, D, None, None, one, one / 2))
    ambient = EDMPrecond(8, 2, ambient=True, model_type='SongUNet', model_channels=8, channel_mult=[1], num_blocks=1,
                         attn_resolutions=[]).eval()
    masks = torch.ones(2, 1, 8, 8)
    out = samplers.ambient_sampler(ambient, torch.randn(2, 1, 8, 8), masks, num_steps=5, solver='dpmpp2m')
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match='guidance_units'):
        samplers.ambient_sampler(ambient, torch.randn(2, 1, 8, 8), masks, num_steps=5, solver='dpmpp2m',
                                 guidance_units='original')
