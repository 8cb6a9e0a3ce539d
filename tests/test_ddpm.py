"""Tests for discrete DDPM training (training/networks.py: ddpm_alpha_bar, DDPMPrecond; training/loss.py: DDPMLoss,
AmbientDDPMLoss) against VP-form recomputations, and train.py's DDPM options."""


import numpy as np
import pytest
import torch
from click.testing import CliRunner

import train
from conftest import random_images, train_options, write_edm_dataset
from training.loss import AmbientDDPMLoss, DDPMLoss
from training.networks import DDPMPrecond, ddpm_alpha_bar

TINY_NET = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0)


def test_linear_and_cosine_schedules_match_their_definitions():
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(ddpm_alpha_bar('linear').numpy(), np.cumprod(1 - betas), rtol=1e-12)
    f = lambda t: np.cos((t / 50 + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    t = np.arange(1, 51)
    np.testing.assert_allclose(ddpm_alpha_bar('cosine', T=50).numpy()[:-1], (f(t) / f(0))[:-1], rtol=1e-10)
    for bad in (dict(beta_schedule='quadratic'), dict(T=1), dict(beta_start=0.1, beta_end=0.01)):
        with pytest.raises(ValueError):
            ddpm_alpha_bar(**bad)


def test_precond_is_epsilon_prediction_on_the_vp_input():
    """D(x0 + σε, σ_t) = x − σ·F(x_t; t − 1) with x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε, DDPM's network input."""
    torch.manual_seed(0)
    net = DDPMPrecond(8, 3, T=100, **TINY_NET).eval()
    alpha_bar = ddpm_alpha_bar(T=100)
    x0, eps = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 3, 8, 8)
    t = torch.tensor([7, 80])  # 1-based
    sigma = ((1 - alpha_bar[t - 1]) / alpha_bar[t - 1]).sqrt().float()
    x_t = alpha_bar[t - 1].sqrt().view(-1, 1, 1, 1).float() * x0 + (1 - alpha_bar[t - 1]).sqrt().view(-1, 1, 1, 1).float() * eps
    with torch.no_grad():
        eps_hat = net.model(x_t, (t - 1).float())
        D = net(x0 + sigma.view(-1, 1, 1, 1) * eps, sigma)
    torch.testing.assert_close(D, x0 + sigma.view(-1, 1, 1, 1) * (eps - eps_hat), rtol=1e-4, atol=1e-4)
    # σ snaps to the nearest level (in log σ); its index is c_noise.
    levels = net.discrete_sigmas
    assert torch.equal(net.round_sigma(levels[[3, 50]] * 1.001), levels[[3, 50]])
    assert net.round_sigma(levels[[3, 50]], return_index=True).tolist() == [3, 50]
    assert net.sigma_min == pytest.approx(float(levels[0])) and net.sigma_max == pytest.approx(float(levels[-1]))


def test_ddpm_loss_is_the_epsilon_loss_at_uniform_t():
    torch.manual_seed(1)
    net = DDPMPrecond(8, 3, T=50, **TINY_NET)
    loss_fn = DDPMLoss(T=50)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    loss, _ = loss_fn(net, x0, generator=gens)
    # Replay the draws: t then ε, per sample.
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    u = torch.stack([torch.rand([1, 1, 1], generator=g) for g in gens])
    eps = torch.stack([torch.randn([3, 8, 8], generator=g) for g in gens])
    index = (u.flatten() * 50).long()
    alpha_bar = ddpm_alpha_bar(T=50)[index].view(-1, 1, 1, 1).float()
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
    eps_hat = net.model(x_t, index.float())
    torch.testing.assert_close(loss, (eps_hat - eps).square(), rtol=1e-3, atol=1e-5)
    # t is uniform over the T levels.
    sigmas = loss_fn.sample_sigma(torch.zeros(20000, 1, 1, 1), torch.Generator().manual_seed(0)).flatten()
    counts = torch.bucketize(sigmas, net.discrete_sigmas.double() * (1 + 1e-6)).bincount(minlength=50)
    assert counts.min() > 300 and counts.max() < 500  # 400 expected per level
    assert torch.isin(sigmas.float(), net.discrete_sigmas).all()


def test_ambient_ddpm_loss_ignores_hidden_pixels():
    torch.manual_seed(2)
    net = DDPMPrecond(8, 6, T=50, ambient=True, hidden_precond='mask_aware', **TINY_NET)
    loss_fn = AmbientDDPMLoss(T=50, hidden_precond='mask_aware')
    x0 = (torch.rand(2, 3, 8, 8) * 2 - 1).requires_grad_(True)
    A = (torch.rand(2, 3, 8, 8) > 0.5).float()
    A_hat = A * (torch.rand(2, 3, 8, 8) > 0.2).float()
    loss, diagnostics = loss_fn(net, x0, A, A_hat, generator=torch.Generator().manual_seed(0))
    loss.sum().backward()
    assert x0.grad[A == 0].abs().max() == 0 and x0.grad[A == 1].abs().max() > 0
    assert set(diagnostics) == {'loss', 'loss_hat'}


def test_train_config_and_errors():
    c = train.build_config(train_options(['--outdir=unused', '--data=unused', '--precond=ddpm', '--T=200', '--beta_end=0.03', '--corruption_probability=0']))
    assert c.network_kwargs.class_name == 'training.networks.DDPMPrecond' and c.network_kwargs.T == 200
    assert c.loss_kwargs.class_name == 'training.loss.DDPMLoss'
    assert (c.loss_kwargs.beta_end, c.network_kwargs.beta_end, c.loss_kwargs.beta_schedule) == (0.03, 0.03, 'linear')
    c = train.build_config(train_options(['--outdir=unused', '--data=unused', '--precond=ambient_ddpm', '--beta_schedule=cosine']))
    assert c.network_kwargs.ambient and c.loss_kwargs.class_name == 'training.loss.AmbientDDPMLoss'
    assert c.loss_kwargs.hidden_precond == c.network_kwargs.hidden_precond == 'mask_aware'
    for args, message in ((['--precond=edm', '--T=100'], '--T sets the discrete DDPM schedule'),
                          (['--precond=ddpm', '--beta_schedule=cosine', '--beta_start=0.001'], 'cosine schedule has none')):
        with pytest.raises(train.ConfigError, match=message):
            train.build_config(train_options(['--outdir=unused', '--data=unused', *args]))


@pytest.mark.slow
def test_ddpm_training_and_sampling_end_to_end(tmp_path):
    import eval as eval_cli
    data = write_edm_dataset(tmp_path / 'data.zip', random_images(8, channels=1, resolution=8, seed=0))
    args = ['--outdir', tmp_path / 'run', '--data', data, '--precond=ddpm', '--T=100', '--cbase=8', '--cres=1,2',
            '--num_blocks=1', '--batch=4', '--duration=0.000008', '--nosubdir', '--seed=0', '--workers=0',
            '--augment=0', '--corruption_probability=0']
    result = CliRunner().invoke(train.main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = tmp_path / 'gen'
    result = CliRunner().invoke(eval_cli.cli, ['generate', '--network', str(tmp_path / 'run'), '--latest', '--outdir',
                                               str(out), '--seeds=0-2', '--solver=ddim', '--steps=5'],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(eval_cli.cli, ['generate', '--network', str(tmp_path / 'run'), '--latest', '--outdir',
                                               str(tmp_path / 'g2'), '--seeds=0', '--solver=ddim', '--steps=101'])
    assert result.exit_code != 0 and 'at most 100' in result.output and 'Traceback' not in result.output
