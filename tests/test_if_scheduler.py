"""AmbientDDPMScheduler: the parent's step without clean_image, the DDPM posterior with it."""

import pytest
import torch
from diffusers import DDPMScheduler

from scheduling_ddpm import AmbientDDPMScheduler

# IF's configs use learned_range; the others are covered where diffusers' own step is finite
# (its fixed_large_log takes the square root of a log-variance and returns NaN).
VARIANCES = ['fixed_small', 'fixed_small_log', 'fixed_large', 'learned', 'learned_range']
CLIPPING = [dict(thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5),
            dict(thresholding=False, clip_sample=True, clip_sample_range=1.0),
            dict(thresholding=False, clip_sample=False)]


def _pair(variance_type, clipping, steps=None):
    config = dict(num_train_timesteps=1000, beta_schedule='squaredcos_cap_v2', variance_type=variance_type,
                  prediction_type='epsilon', **clipping)
    parent, ours = DDPMScheduler(**config), AmbientDDPMScheduler(**config)
    if steps:
        parent.set_timesteps(steps)
        ours.set_timesteps(steps)
    return parent, ours


def _inputs(seed=0, channels=6):
    # ε̂ ~ N(0, 1); variance channels in [0, 1): a valid variance ('learned') and interpolation weight ('learned_range').
    g = torch.Generator().manual_seed(seed)
    eps, v = torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    return torch.cat([eps, v], dim=1)[:, :channels], torch.randn(2, 3, 8, 8, generator=g) * 1.5


@pytest.mark.parametrize('variance_type', VARIANCES)
@pytest.mark.parametrize('clipping', CLIPPING)
@pytest.mark.parametrize('t', [999, 500, 10, 0])
def test_step_without_clean_image_is_the_parents(variance_type, clipping, t):
    parent, ours = _pair(variance_type, clipping)
    output, sample = _inputs(channels=6 if variance_type in ('learned', 'learned_range') else 3)
    a = parent.step(output, t, sample, generator=torch.Generator().manual_seed(1))
    b = ours.step(output, t, sample, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.prev_sample, b.prev_sample)
    assert torch.equal(a.pred_original_sample, b.pred_original_sample)


@pytest.mark.parametrize('variance_type', VARIANCES)
@pytest.mark.parametrize('clipping', CLIPPING)
@pytest.mark.parametrize('t', [980, 500, 20, 0])
def test_clean_image_equal_to_the_eps_x0_reproduces_the_parent(variance_type, clipping, t):
    # With x̂0 = (x_t − √(1−ᾱ) ε̂)/√ᾱ given explicitly, the step (threshold, mean, variance, noise) is the parent's.
    parent, ours = _pair(variance_type, clipping, steps=50)
    output, sample = _inputs(seed=2)
    alpha = parent.alphas_cumprod[t]
    x0 = (sample - (1 - alpha) ** 0.5 * output[:, :3]) / alpha ** 0.5
    # The parent needs the variance channels cut off unless the variance is learned; ours takes either.
    learned = variance_type in ('learned', 'learned_range')
    a = parent.step(output if learned else output[:, :3], t, sample, generator=torch.Generator().manual_seed(3))
    b = ours.step(output, t, sample, generator=torch.Generator().manual_seed(3), clean_image=x0)
    torch.testing.assert_close(b.pred_original_sample, a.pred_original_sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.prev_sample, a.prev_sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('variance_type', ['fixed_small', 'learned_range'])
def test_posterior_against_float64_closed_form(variance_type):
    # Ho et al. 2020, eqs. 6-7, recomputed in float64 from the schedule; leading spacing, 10 steps.
    _, ours = _pair(variance_type, dict(thresholding=False, clip_sample=False), steps=10)
    output, sample = _inputs(seed=4)
    x0 = torch.randn(sample.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 0.5
    t, t_prev = 500, 400
    assert int(ours.previous_timestep(t)) == t_prev
    s = torch.linspace(0, 1, 1001, dtype=torch.float64)
    alpha_bar = lambda u: torch.cos((u + 0.008) / 1.008 * torch.pi / 2) ** 2  # squaredcos_cap_v2, β capped at 0.999
    ab = torch.cumprod(torch.clamp(alpha_bar(s[1:]) / alpha_bar(s[:-1]), min=1 - 0.999), 0)
    ab_t, ab_prev = ab[t], ab[t_prev]
    beta_t = 1 - ab_t / ab_prev
    mean = (ab_prev.sqrt() * beta_t / (1 - ab_t)) * x0 + ((ab_t / ab_prev).sqrt() * (1 - ab_prev) / (1 - ab_t)) * sample.double()
    posterior_var = (1 - ab_prev) / (1 - ab_t) * beta_t
    if variance_type == 'fixed_small':
        var = posterior_var
    else:  # log-variance interpolated between the posterior variance and β_t by v ∈ [-1, 1]
        frac = (output[:, 3:].double() + 1) / 2
        var = torch.exp(frac * beta_t.log() + (1 - frac) * posterior_var.log())
    z = torch.randn(sample.shape, generator=torch.Generator().manual_seed(6))
    got = ours.step(output, t, sample, generator=torch.Generator().manual_seed(6), clean_image=x0.float()).prev_sample
    torch.testing.assert_close(got.double(), mean + var.sqrt() * z.double(), rtol=1e-4, atol=1e-4)


def test_thresholding_applies_to_the_given_x0():
    _, ours = _pair('fixed_small', dict(thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5))
    output, sample = _inputs()
    x0 = torch.full(sample.shape, 3.0)
    res = ours.step(output, 0, sample, clean_image=x0)
    # Every |x̂0| = 3: s = clamp(3, 1, 1.5) = 1.5, x̂0 → clip(3, −1.5, 1.5)/1.5 = 1.
    torch.testing.assert_close(res.pred_original_sample, torch.ones_like(x0))


def test_config_round_trip(tmp_path):
    _, ours = _pair('learned_range', CLIPPING[0])
    ours.save_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith('_')}
    assert public(AmbientDDPMScheduler.from_pretrained(tmp_path).config) == public(ours.config)
    assert isinstance(AmbientDDPMScheduler.from_config(DDPMScheduler().config), AmbientDDPMScheduler)


def test_clean_image_shape_is_checked():
    _, ours = _pair('fixed_small', CLIPPING[2])
    output, sample = _inputs()
    with pytest.raises(ValueError, match='clean_image has shape'):
        ours.step(output, 5, sample, clean_image=sample[:1])
