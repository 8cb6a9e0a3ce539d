"""training.ambient_if: the mixed x̂0, the ambient IF loss, model and embedding I/O."""

import os

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from training.ambient_if import (ModelLoadError, ambient_if_loss, ambient_if_step, empty_prompt_embeds, load_scheduler,
    load_text_encoder, load_unet, load_unet_state_dict, mixed_x0, strip_wrapper_prefixes)


def test_mixed_x0_by_hand():
    # One observed and one hidden pixel, ᾱ = 0.64: observed → (x_t − 0.6 ε̂)/0.8, hidden → ε̂.
    x_t = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)
    eps = torch.tensor([0.5, -0.25]).view(1, 2, 1, 1)
    hat = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    got = mixed_x0(x_t, eps, hat, torch.tensor(0.64))
    torch.testing.assert_close(got.flatten(), torch.tensor([(1.0 - 0.6 * 0.5) / 0.8, -0.25]))


def test_mixed_x0_per_sample_alphas_against_float64():
    g = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(3, 3, 4, 4, generator=g), torch.randn(3, 3, 4, 4, generator=g)
    hat = (torch.rand(3, 3, 4, 4, generator=g) < 0.5).float()
    a = torch.tensor([0.9, 0.5, 0.01])
    ref = hat.double() * (x_t.double() - (1 - a.double()).sqrt().view(-1, 1, 1, 1) * eps.double()) \
        / a.double().sqrt().view(-1, 1, 1, 1) + (1 - hat.double()) * eps.double()
    torch.testing.assert_close(mixed_x0(x_t, eps, hat, a).double(), ref, rtol=1e-5, atol=1e-5)


def test_loss_and_diagnostics_by_hand():
    x0 = torch.zeros(1, 1, 2, 2)
    x0_hat = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0]).view(1, 1, 2, 2)
    hat = torch.tensor([1.0, 0.0, 1.0, 0.0]).view(1, 1, 2, 2)
    clean = torch.tensor([0.0, 0.0, 0.0, 2.0]).view(1, 1, 2, 2)
    loss, stats = ambient_if_loss(x0_hat, x0, mask, hat, clean=clean)
    assert loss.item() == pytest.approx((1 + 4 + 9) / 4)  # the original's mean over all elements
    assert stats['loss_hat'].item() == pytest.approx(4.0)  # pixel 2 only: in A, not in Ã
    assert stats['loss_unobserved'].item() == pytest.approx(4.0)  # pixel 4: (4 − 2)²
    assert stats['loss_all'].item() == pytest.approx((1 + 4 + 9 + 4) / 4)
    _, no_clean = ambient_if_loss(x0_hat, x0, mask, hat)
    assert set(no_clean) == {'loss', 'loss_hat'}


@pytest.fixture(scope='module')
def unet_and_scheduler(tiny_if):
    return load_unet(tiny_if), load_scheduler(tiny_if)


def test_hidden_pixels_get_exactly_zero_gradient(unet_and_scheduler):
    unet, scheduler = unet_and_scheduler
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 16, 16, generator=g).clamp(-1, 1).requires_grad_(True)
    mask = (torch.rand(2, 1, 16, 16, generator=g) < 0.4).float().repeat(1, 3, 1, 1)
    hat = mask * (torch.rand(2, 1, 16, 16, generator=g) < 0.8).float().repeat(1, 3, 1, 1)
    embeds = torch.randn(2, 77, 24, generator=g)
    loss, _, _ = ambient_if_step(unet, scheduler, x0, mask, hat, embeds, generator=torch.Generator().manual_seed(1))
    loss.backward()
    grad = x0.grad
    assert (grad[mask == 0] == 0).all()
    assert (grad[mask == 1] != 0).any()


def test_all_ones_masks_give_the_plain_epsilon_x0_loss(unet_and_scheduler):
    # A = Ã = 1: x̂0 is the usual ε-parameterised estimate and the loss is its MSE to x0.
    unet, scheduler = unet_and_scheduler
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 3, 16, 16, generator=g).clamp(-1, 1)
    ones = torch.ones_like(x0)
    embeds = torch.randn(2, 77, 24, generator=g)
    loss, stats, pics = ambient_if_step(unet, scheduler, x0, ones, ones, embeds, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, 1000, (2,), generator=gen)
    x_t = scheduler.add_noise(x0, noise, t)
    with torch.no_grad():
        eps = unet(x_t, t, encoder_hidden_states=embeds).sample[:, :3]
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = ((x_t - (1 - a).sqrt() * eps) / a.sqrt() - x0).square().mean()
    assert torch.equal(pics['timesteps'], t)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-6)
    assert stats['loss_hat'].item() == 0  # A \\ Ã is empty


def test_epsilon_prediction_is_required(unet_and_scheduler):
    unet, _ = unet_and_scheduler
    x = torch.zeros(1, 3, 16, 16)
    with pytest.raises(ValueError, match='epsilon'):
        ambient_if_step(unet, DDPMScheduler(prediction_type='v_prediction'), x, x, x, torch.zeros(1, 77, 24))


def test_state_dict_prefixes_and_strict_loading(tmp_path, unet_and_scheduler):
    unet, _ = unet_and_scheduler
    assert strip_wrapper_prefixes({'_orig_mod.module.conv_in.weight': 1, 'module.a': 2, 'b': 3}) == \
        {'conv_in.weight': 1, 'a': 2, 'b': 3}
    prefixed = {f'_orig_mod.module.{k}': v + 1 for k, v in unet.state_dict().items()}
    torch.save(prefixed, tmp_path / 'original.pt')
    fresh = UNet2DConditionModel.from_config(unet.config)
    load_unet_state_dict(fresh, str(tmp_path / 'original.pt'))
    k = 'conv_in.weight'
    torch.testing.assert_close(fresh.state_dict()[k], unet.state_dict()[k] + 1)
    other = {k: v for k, v in unet.state_dict().items() if not k.startswith('conv_in')}
    torch.save(other, tmp_path / 'other.pt')
    with pytest.raises(ModelLoadError, match=r'does not fit this UNet \(missing 2'):
        load_unet_state_dict(fresh, str(tmp_path / 'other.pt'))
    with pytest.raises(ModelLoadError, match='checkpoint not found'):
        load_unet_state_dict(fresh, str(tmp_path / 'missing.pt'))
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(ModelLoadError, match='not a readable state dict'):
        load_unet_state_dict(fresh, str(tmp_path / 'junk.pt'))


def test_empty_prompt_embedding_is_computed_once_and_reused(tmp_path, tiny_if):
    path = str(tmp_path / 'empty_embeds.pt')
    embeds = empty_prompt_embeds(path, tiny_if)
    assert embeds.shape == (1, 77, 24) and os.path.isfile(path)
    tokenizer, encoder = load_text_encoder(tiny_if)
    with torch.no_grad():
        ids = tokenizer([''], padding='max_length', max_length=77, return_tensors='pt')
        ref = encoder(ids.input_ids, attention_mask=ids.attention_mask)[0]
    torch.testing.assert_close(embeds, ref)
    marker = torch.full((1, 77, 24), 7.0)
    torch.save(marker, path)
    assert torch.equal(empty_prompt_embeds(path, model=str(tmp_path / 'nowhere')), marker)  # a file is used as is


def test_missing_models_and_files_are_one_line_errors(tmp_path):
    missing = str(tmp_path / 'no-model')
    with pytest.raises(ModelLoadError, match=r'cannot load the UNet from .*no-model.*--pretrained_model_name_or_path'):
        load_unet(missing)
    with pytest.raises(ModelLoadError) as err:
        empty_prompt_embeds(str(tmp_path / 'e.pt'), missing)
    assert '--empty_embeds' in str(err.value) and '\n' not in str(err.value)
    with pytest.raises(ModelLoadError, match='no text encoder'):
        empty_prompt_embeds(str(tmp_path / 'e.pt'), None)


def test_min_snr_weighting_of_the_x0_loss():
    """--snr_gamma: each sample's x0 loss times min(SNR_t, γ), SNR = ᾱ/(1 − ᾱ) (float64 reference); the diagnostics
    stay unweighted; no weights is the plain loss."""
    from training.ambient_if import ambient_if_loss, min_snr_weights
    gen = torch.Generator().manual_seed(0)
    alpha = torch.tensor([0.99, 0.5, 0.01])
    gamma = 5.0
    snr = alpha.double() / (1 - alpha.double())
    torch.testing.assert_close(min_snr_weights(alpha, gamma).double(), snr.clamp(max=gamma), rtol=1e-6, atol=0)
    x0_hat, x0 = torch.randn(3, 3, 4, 4, generator=gen), torch.randn(3, 3, 4, 4, generator=gen)
    mask = (torch.rand(3, 3, 4, 4, generator=gen) > 0.3).float()
    hat = mask * (torch.rand(3, 3, 4, 4, generator=gen) > 0.2).float()
    plain, stats = ambient_if_loss(x0_hat, x0, mask, hat)
    weighted, weighted_stats = ambient_if_loss(x0_hat, x0, mask, hat, weights=min_snr_weights(alpha, gamma))
    per_sample = (mask * (x0_hat - x0)).double().square().flatten(1).mean(1)
    torch.testing.assert_close(weighted.double(), (snr.clamp(max=gamma) * per_sample).mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(plain.double(), per_sample.mean(), rtol=1e-5, atol=0)
    assert torch.equal(stats['loss'], weighted_stats['loss'])
