"""Tests for training/loss.py against closed forms, float64 recomputations and invariants."""

import inspect
import json
import math

import numpy as np
import pytest
import torch

import dnnlib
import train
from conftest import train_options
from training.loss import AmbientLoss, AmbientVPLoss, EDMLoss, VELoss, VPLoss, edm_weight, vp_sigma


class Recorder(torch.nn.Module):
    """A fake denoiser: a fixed linear function of its input; remembers what it was called with."""

    def __init__(self, out_channels=3, in_channels=None):
        super().__init__()
        torch.manual_seed(0)
        self.out_channels = out_channels
        self.in_channels = in_channels
        self.conv = torch.nn.Conv2d(in_channels or out_channels, out_channels, 3, padding=1)
        self.calls = []

    def forward(self, x, sigma, labels=None, augment_labels=None):
        self.calls.append(dict(x=x.detach().clone(), sigma=sigma.detach().clone(), augment_labels=augment_labels))
        return self.conv(x) * 0.1 + x[:, :self.out_channels]


def batch(n=4, c=3, r=8, p=0.5, delta=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, c, r, r, generator=g) * 2 - 1
    A = (torch.rand(n, c, r, r, generator=g) >= p).float()
    A_hat = A * (torch.rand(n, c, r, r, generator=g) >= delta).float()
    return x0, A, A_hat


def test_edm_sigma_distribution_and_weight():
    loss = EDMLoss()
    x = torch.zeros(20000, 1, 1, 1)
    sigma = loss.sample_sigma(x, torch.Generator().manual_seed(1)).double().log().flatten()
    se = 1.2 / math.sqrt(sigma.numel())
    assert abs(sigma.mean().item() + 1.2) < 5 * se
    assert abs(sigma.std().item() - 1.2) < 0.03
    s = torch.tensor([0.002, 0.5, 3.0, 80.0], dtype=torch.float64)
    expected = np.array([(v ** 2 + 0.25) / (v ** 2 * 0.25) for v in s.tolist()])
    np.testing.assert_allclose(edm_weight(s, 0.5).numpy(), expected, rtol=1e-12)


def test_vp_sigma_closed_form():
    t = np.array([1e-5, 0.1, 0.5, 1.0])
    expected = np.sqrt(np.expm1(0.5 * 19.9 * t ** 2 + 0.1 * t))  # float64
    np.testing.assert_allclose(vp_sigma(torch.tensor(t), 19.9, 0.1).numpy(), expected, rtol=1e-12)
    sig = VPLoss().sample_sigma(torch.zeros(5000, 1, 1, 1), torch.Generator().manual_seed(0))
    assert sig.min() >= vp_sigma(1e-5, 19.9, 0.1) * 0.999 and sig.max() <= vp_sigma(1.0, 19.9, 0.1) * 1.001
    # float32 at t = ε_t, where exp(x) - 1 would be 2% off; the loss and VPPrecond use this one function.
    np.testing.assert_allclose(vp_sigma(torch.tensor(t, dtype=torch.float32), 19.9, 0.1).numpy(), expected, rtol=1e-6)
    from training.networks import VPPrecond
    precond = VPPrecond(16, 2, model_type='SongUNet', model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    torch.testing.assert_close(precond.sigma(torch.tensor(t, dtype=torch.float32)), vp_sigma(torch.tensor(t, dtype=torch.float32), 19.9, 0.1))
    assert precond.sigma_min == pytest.approx(float(expected[0]), rel=1e-6)


def test_ve_sigma_range_and_weight():
    loss = VELoss(sigma_min=0.02, sigma_max=100)
    s = loss.sample_sigma(torch.zeros(5000, 1, 1, 1), torch.Generator().manual_seed(0))
    assert s.min() >= 0.02 and s.max() <= 100
    # log-uniform: the median is the geometric mean of the bounds.
    assert abs(s.log().median().item() - 0.5 * (math.log(0.02) + math.log(100))) < 0.2
    torch.testing.assert_close(loss.weight(torch.tensor(4.0)), torch.tensor(1 / 16))


@pytest.mark.parametrize('cls', [EDMLoss, VPLoss, VELoss])
def test_clean_loss_matches_float64_recomputation(cls):
    x0, _, _ = batch()
    net = Recorder()
    loss_fn = cls()
    loss, diag = loss_fn(net, x0, generator=torch.Generator().manual_seed(5))
    call = net.calls[0]
    sigma = call['sigma'].double()
    g = torch.Generator().manual_seed(5)
    sigma_ref = loss_fn.sample_sigma(x0, g).double()
    n = torch.randn(x0.shape, generator=g).double() * sigma_ref
    torch.testing.assert_close(sigma, sigma_ref)
    torch.testing.assert_close(call['x'].double(), x0.double() + n, rtol=1e-6, atol=1e-6)
    D = net(call['x'], call['sigma']).double()
    expected = loss_fn.weight(sigma_ref) * (D - x0.double()) ** 2
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert set(diag) == {'loss'}


def test_ambient_equals_edm_with_full_masks():
    x0, _, _ = batch()
    ones = torch.ones_like(x0)
    inner = Recorder()

    def ambient_net(x, sigma, labels=None, augment_labels=None):
        assert x.shape[1] == 6 and torch.equal(x[:, 3:], ones)
        return inner(x[:, :3], sigma)

    amb, diag = AmbientLoss()(ambient_net, x0, ones, ones, generator=torch.Generator().manual_seed(3))
    edm, _ = EDMLoss()(inner, x0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(amb, edm, rtol=0, atol=0)
    torch.testing.assert_close(diag['loss_hat'], edm.mean((1, 2, 3)))


def test_ambient_input_and_loss_formula():
    x0, A, A_hat = batch()
    obs = A * x0
    net = Recorder(out_channels=3, in_channels=6)
    loss_fn = AmbientLoss()
    loss, diag = loss_fn(net, obs, A, A_hat, clean=x0, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    sigma = loss_fn.sample_sigma(obs, g)
    n = torch.randn(obs.shape, generator=g) * sigma
    x_in = net.calls[0]['x']
    torch.testing.assert_close(x_in, torch.cat([A_hat * (obs + n), A_hat], 1))
    D = net(x_in, sigma)
    w = edm_weight(sigma, 0.5)
    torch.testing.assert_close(loss, w * (A * (D - x0)) ** 2)
    # Diagnostics: per-sample means over their own pixel sets, recomputed in float64.
    e2 = (w * (D - x0) ** 2).double()
    for name, m in (('loss', A), ('loss_hat', A_hat), ('loss_all', torch.ones_like(A))):
        m = m.double()
        expected = torch.stack([e2[i][m[i] == 1].mean() for i in range(len(m))])
        torch.testing.assert_close(diag[name].double(), expected, rtol=1e-5, atol=1e-7)
    assert 'loss_all' not in loss_fn(net, obs, A, A_hat)[1]


def test_l1_variant():
    x0, A, A_hat = batch()
    net = Recorder(out_channels=3, in_channels=6)
    loss, _ = AmbientLoss(norm=1)(net, A * x0, A, A_hat, generator=torch.Generator().manual_seed(2))
    sigma = net.calls[0]['sigma']
    D = net(net.calls[0]['x'], sigma)
    torch.testing.assert_close(loss, edm_weight(sigma, 0.5) * A * (D - x0).abs())
    with pytest.raises(ValueError, match='norm=3'):
        AmbientLoss(norm=3)


def test_zero_loss_when_denoiser_is_perfect():
    x0, A, A_hat = batch()

    def oracle(x, sigma, labels=None, augment_labels=None):
        return x0.clone()

    for loss_fn in (AmbientLoss(), AmbientVPLoss(), AmbientLoss(norm=1)):
        loss, diag = loss_fn(oracle, A * x0, A, A_hat, clean=x0)
        assert loss.abs().max() == 0 and diag['loss_all'].abs().max() == 0
    assert EDMLoss()(oracle, x0)[0].abs().max() == 0


@pytest.mark.parametrize('hidden_precond', ['original', 'mask_aware'])
@pytest.mark.parametrize('loss_cls', [AmbientLoss, AmbientVPLoss])
def test_hidden_pixels_get_zero_gradient(loss_cls, hidden_precond):
    x0, A, A_hat = batch(p=0.6)
    x0 = x0.clone().requires_grad_(True)
    net = Recorder(out_channels=3, in_channels=6)
    # Even an observation that (wrongly) still holds hidden pixels must not leak them.
    loss, _ = loss_cls(hidden_precond=hidden_precond)(net, x0, A, A_hat, generator=torch.Generator().manual_seed(0))
    loss.sum().backward()
    assert (x0.grad[A == 0] == 0).all()
    assert (x0.grad[A == 1] != 0).any()


def test_ambient_vp_weight():
    x0, A, A_hat = batch()
    net = Recorder(out_channels=3, in_channels=6)
    loss, _ = AmbientVPLoss()(net, A * x0, A, A_hat, generator=torch.Generator().manual_seed(4))
    sigma = net.calls[0]['sigma']
    D = net(net.calls[0]['x'], sigma)
    torch.testing.assert_close(loss, (A * (D - x0)) ** 2 / sigma ** 2)


def loss_value(loss_fn):
    """The per-pixel loss of `loss_fn` on fixed inputs, network and per-sample generators."""
    x0, A, A_hat = batch()
    generators = [torch.Generator().manual_seed(s) for s in range(len(x0))]
    if isinstance(loss_fn, (AmbientLoss, AmbientVPLoss)):
        return loss_fn(Recorder(out_channels=3, in_channels=6), A * x0, A, A_hat, generator=generators)[0]
    return loss_fn(Recorder(), x0, generator=generators)[0]


# Every option away from its default, so that a dropped or mangled one changes the reconstructed loss.
ROUND_TRIP = [
    (EDMLoss, dict(P_mean=-1.0, P_std=1.4, sigma_data=0.6)),
    (VPLoss, dict(beta_d=18.0, beta_min=0.2, epsilon_t=1e-3)),
    (VELoss, dict(sigma_min=0.05, sigma_max=50.0)),
    (AmbientLoss, dict(P_mean=-1.0, P_std=1.4, sigma_data=0.6, norm=1, hidden_precond='mask_aware')),
    (AmbientVPLoss, dict(beta_d=18.0, beta_min=0.2, epsilon_t=1e-3, norm=1, hidden_precond='mask_aware',
                         sigma_data=0.6)),
]


@pytest.mark.parametrize('cls,kwargs', ROUND_TRIP, ids=[cls.__name__ for cls, _ in ROUND_TRIP])
def test_config_round_trip(cls, kwargs):
    """kwargs -> loss -> to_dict() -> JSON (as checkpoints store it) -> construct_class_by_name -> the same loss."""
    original = cls(**kwargs)
    cfg = json.loads(json.dumps(original.to_dict()))
    assert cfg == dict(class_name=f'training.loss.{cls.__name__}', **kwargs)
    rebuilt = dnnlib.util.construct_class_by_name(**cfg)
    assert type(rebuilt) is cls
    expected = loss_value(original)
    assert torch.equal(loss_value(rebuilt), expected)
    for key in kwargs:  # each option matters on these inputs, so the equality above can fail
        default = inspect.signature(cls).parameters[key].default
        assert not torch.equal(loss_value(cls(**dict(kwargs, **{key: default}))), expected), key


@pytest.mark.parametrize('precond', ['ambient', 'ambient_vp', 'edm', 'vp', 've'])
def test_loss_kwargs_of_train_config_round_trip(precond):
    """The loss_kwargs train.py records build a loss whose to_dict() rebuilds the same loss."""
    extra = ['--norm=1', '--hidden_precond=original'] if precond.startswith('ambient') else ['--delta_probability=0']
    opts = train_options(['--outdir=unused', '--data=unused', '--precond', precond, *extra])
    loss_kwargs = json.loads(json.dumps(train.build_config(opts).loss_kwargs))
    original = dnnlib.util.construct_class_by_name(**loss_kwargs)
    cfg = json.loads(json.dumps(original.to_dict()))
    assert loss_kwargs.items() <= cfg.items()
    rebuilt = dnnlib.util.construct_class_by_name(**cfg)
    assert type(rebuilt) is type(original) and torch.equal(loss_value(rebuilt), loss_value(original))


def test_per_sample_generators_make_draws_batch_independent():
    x0, A, A_hat = batch(n=3)
    net = Recorder(out_channels=3, in_channels=6)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    full, _ = AmbientLoss()(net, A * x0, A, A_hat, generator=gens([10, 11, 12]))
    single, _ = AmbientLoss()(net, (A * x0)[1:2], A[1:2], A_hat[1:2], generator=gens([11]))
    torch.testing.assert_close(full[1:2], single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('augment', [False, True])
def test_hidden_pixels_get_zero_gradient_with_real_network_and_augmentation(augment):
    from training.augment import AugmentPipe
    from training.networks import EDMPrecond
    from torch_utils.ambient_diffusion import MaskCorruption
    torch.manual_seed(0)
    pipe = None
    if augment:
        pipe = AugmentPipe(p=1, xflip=1, yflip=1, rotate_int=1, translate_int=1, scale=1, rotate_frac=1, aniso=1,
                           translate_frac=1)
    net = EDMPrecond(img_resolution=16, img_channels=6, ambient=True, gated=True, model_type='SongUNet',
                     model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0,
                     augment_dim=pipe.label_dim if pipe else 0, hidden_precond='mask_aware')
    g = torch.Generator().manual_seed(1)
    corruption = MaskCorruption('box', corruption_probability=0.4, delta_probability=0.2)
    A = corruption.sample_mask([4, 3, 16, 16], generator=g)
    A_hat = corruption.sample_hat_mask(A, generator=g)
    x0 = (torch.rand(4, 3, 16, 16, generator=g) * 2 - 1).requires_grad_(True)
    loss, _ = AmbientLoss(hidden_precond='mask_aware')(net, x0, A, A_hat, augment_pipe=pipe,
                                                       generator=torch.Generator().manual_seed(2))
    loss.sum().backward()
    assert (x0.grad[A == 0] == 0).all()
    assert (x0.grad[A == 1] != 0).any()


# ---------------------------------------------------------------------------------------------
# Mask-aware weighting.


@pytest.mark.parametrize('loss_cls', [AmbientLoss, AmbientVPLoss])
def test_mask_aware_pixel_weight_is_one_over_c_out_squared(loss_cls):
    x0, A, A_hat = batch()
    net = Recorder(out_channels=3, in_channels=6)
    loss_fn = loss_cls(hidden_precond='mask_aware')
    loss, diag = loss_fn(net, A * x0, A, A_hat, generator=torch.Generator().manual_seed(4))
    sigma = net.calls[0]['sigma'].double()
    D = net(net.calls[0]['x'], net.calls[0]['sigma']).double()
    # c_out of the preconditioner where Ã = 1 (EDM: σ σd / sqrt(σ² + σd²); VP: σ), σd where Ã = 0.
    c_out = sigma * 0.5 / (sigma ** 2 + 0.25).sqrt() if loss_cls is AmbientLoss else sigma
    c_out = A_hat * c_out + (1 - A_hat) * 0.5
    torch.testing.assert_close(loss.double(), (A * (D - x0)) ** 2 / c_out ** 2, rtol=1e-5, atol=1e-6)
    # Visible pixels keep the original weight, so the Ã diagnostic is unchanged.
    original, diag_original = loss_cls()(net, A * x0, A, A_hat, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(loss[A_hat == 1], original[A_hat == 1])
    torch.testing.assert_close(diag['loss_hat'], diag_original['loss_hat'])


def test_bad_hidden_precond():
    with pytest.raises(ValueError, match='hidden_precond'):
        AmbientLoss(hidden_precond='per_pixel')


class _LinearF(torch.nn.Module):
    """A raw network F that is linear in the image channels of its input: F = W·x + b, per pixel."""

    def __init__(self, pixels):
        super().__init__()
        self.W = torch.nn.Parameter(torch.zeros(pixels, pixels))
        self.b = torch.nn.Parameter(torch.zeros(pixels))

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):  # x: [N, 2, 1, P]
        return (x[:, 0, 0] @ self.W.T + self.b)[:, None, None, :]


@pytest.mark.parametrize('hidden_precond', ['mask_aware', 'original'])
def test_optimum_is_the_posterior_mean_under_a_gaussian_prior(hidden_precond):
    """Theorem 1 with the mask-aware weights: minimising the ambient loss over all F gives, on every pixel,
    E[x0 | Ã x_σ, Ã] — here, for x0 ~ N(0, Σ), the closed form Σ_h0 / (Σ_00 + σ²) · y0 (pixel 0 seen)."""
    from training.networks import EDMPrecond
    sigma, n = 0.3, 40000
    cov = torch.tensor([[0.25, 0.15, -0.1], [0.15, 0.3, 0.05], [-0.1, 0.05, 0.2]], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.randn(n, 3, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T).float()
    x0 = x0[:, None, None, :]                                              # [N, 1, 1, 3]
    A_hat = torch.tensor([1.0, 0, 0]).expand(n, 1, 1, 3)                   # the network sees pixel 0 only
    A = torch.maximum(A_hat, (torch.rand(n, 1, 1, 3, generator=g) < 0.5).float())  # A independent of x0
    net = EDMPrecond(16, 2, ambient=True, model_type='SongUNet', model_channels=8, channel_mult=[1], num_blocks=1,
                     attn_resolutions=[], dropout=0, hidden_precond=hidden_precond)
    net.model = _LinearF(3)

    class FixedSigma(AmbientLoss):
        def sample_sigma(self, images, generator=None):
            return torch.full([images.shape[0], 1, 1, 1], sigma)

    loss_fn = FixedSigma(hidden_precond=hidden_precond)
    names = [name for name, _ in net.model.named_parameters()]
    shapes = [p.shape for p in net.model.parameters()]

    def objective(theta):
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            params[f'model.{name}'] = theta[offset:offset + shape.numel()].reshape(shape)
            offset += shape.numel()
        D = lambda *args, **kwargs: torch.func.functional_call(net, params, args, kwargs)  # noqa: E731
        loss, _ = loss_fn(D, A * x0, A, A_hat, generator=torch.Generator().manual_seed(1))
        return loss.double().sum() / n

    theta = torch.zeros(sum(s.numel() for s in shapes), dtype=torch.float32)
    grad = torch.autograd.functional.jacobian(objective, theta).double()
    hess = torch.autograd.functional.hessian(objective, theta).double()
    theta = (theta.double() - torch.linalg.pinv(hess) @ grad).float()  # exact: the loss is quadratic in θ
    probe = torch.tensor([[0.0, 0, 0], [1.0, 0, 0]])[:, None, None, :]     # y0 = 0 and y0 = 1
    with torch.no_grad():
        W = theta[:9].reshape(3, 3)
        net.model.W.copy_(W)
        net.model.b.copy_(theta[9:])
        D = net(torch.cat([probe * A_hat[:2], A_hat[:2]], dim=1), torch.full([2], sigma))[:, 0, 0]  # [2, 3]
    slope = (D[1] - D[0]).double()
    expected = cov[:, 0] / (cov[0, 0] + sigma ** 2)  # E[x0 | y0] = Σ_:0 / (Σ_00 + σ²) · y0
    torch.testing.assert_close(slope, expected, atol=0.03, rtol=0)
    assert D[0].abs().max() < 0.03  # zero-mean prior: no offset
