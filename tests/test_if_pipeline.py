"""AmbientIFPipeline: stock-IF equality without corruption, masks fixed per trajectory, CFG, reproducibility."""

import pytest
import torch
from diffusers import IFPipeline

from pipeline_if import AmbientIFPipeline
from training.ambient_if import encode_prompts


@pytest.fixture(scope='module')
def pipes(tiny_if):
    stock = IFPipeline.from_pretrained(tiny_if)
    ambient = AmbientIFPipeline.from_pretrained(tiny_if)
    for p in (stock, ambient):
        p.set_progress_bar_config(disable=True)
    return stock, ambient


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize('guidance_scale', [0.0, 3.0])
def test_without_corruption_equals_the_stock_pipeline(pipes, guidance_scale):
    stock, ambient = pipes
    kwargs = dict(prompt=['a photo of a cat', 'a dog'], num_inference_steps=6, guidance_scale=guidance_scale, output_type='pt')
    a = stock(generator=_gen(0), **kwargs).images
    b = ambient(generator=_gen(0), **kwargs).images
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_mask_is_fixed_per_trajectory_and_hides_pixels(pipes):
    _, ambient = pipes
    inputs = []
    unet_forward = ambient.unet.forward

    def spy(sample, *args, **kwargs):
        inputs.append(sample.clone())
        return unet_forward(sample, *args, **kwargs)

    ambient.unet.forward = spy
    try:
        ambient(prompt='a face', num_inference_steps=5, guidance_scale=0.0, generator=_gen(1), output_type='pt',
                corruption_probability=0.6, delta_probability=0.1)
    finally:
        del ambient.unet.forward
    assert len(inputs) == 5
    zero = [(x == 0) for x in inputs]
    for z in zero[1:]:
        assert torch.equal(z, zero[0])  # one mask for the whole trajectory
    assert (zero[0][:, 0] == zero[0][:, 1]).all()  # shared over RGB
    assert 0.5 < zero[0].float().mean() < 0.8  # P(hidden) = 1 − 0.4 · 0.9 = 0.64


def test_generator_reproducible_and_batch_independent(pipes):
    _, ambient = pipes
    kwargs = dict(num_inference_steps=4, guidance_scale=0.0, output_type='pt', corruption_probability=0.5,
                  delta_probability=0.1)
    embeds = torch.randn(1, 77, 24, generator=_gen(9))
    one = ambient(prompt_embeds=embeds, generator=[_gen(5)], **kwargs).images
    again = ambient(prompt_embeds=embeds, generator=[_gen(5)], **kwargs).images
    both = ambient(prompt_embeds=embeds.repeat(2, 1, 1), generator=[_gen(7), _gen(5)], **kwargs).images
    assert torch.equal(one, again)
    torch.testing.assert_close(both[1:], one, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(both[0], both[1])


def test_classifier_free_guidance(pipes, tiny_if):
    _, ambient = pipes
    embeds = encode_prompts(ambient.tokenizer, ambient.text_encoder, ['a cat'])
    kwargs = dict(num_inference_steps=4, output_type='pt', corruption_probability=0.4, delta_probability=0.1)
    # With identical conditional and unconditional embeddings, guidance cannot change anything.
    same = ambient(prompt_embeds=embeds, negative_prompt_embeds=embeds, guidance_scale=5.0, generator=_gen(2), **kwargs).images
    plain = ambient(prompt_embeds=embeds, guidance_scale=0.0, generator=_gen(2), **kwargs).images
    torch.testing.assert_close(same, plain, rtol=1e-4, atol=1e-4)
    guided = ambient(prompt='a cat', guidance_scale=5.0, generator=_gen(2), **kwargs).images
    assert guided.shape == plain.shape and torch.isfinite(guided).all()
    assert not torch.allclose(guided, plain, atol=1e-3)


@pytest.mark.parametrize('output_type', ['pt', 'np', 'pil'])
def test_output_types(pipes, output_type):
    _, ambient = pipes
    images = ambient(prompt=['a cat', 'a dog'], num_inference_steps=2, guidance_scale=0.0, generator=_gen(3),
                     output_type=output_type, corruption_pattern='fixed_box', corruption_probability=0.4).images
    if output_type == 'pt':
        assert images.shape == (2, 3, 16, 16)
    elif output_type == 'np':
        assert images.shape == (2, 16, 16, 3) and images.min() >= 0 and images.max() <= 1
    else:
        assert len(images) == 2 and images[0].size == (16, 16)


def test_explicit_masks_and_bad_arguments(pipes):
    _, ambient = pipes
    masks = torch.zeros(1, 3, 16, 16)
    masks[..., :8] = 1
    inputs = []
    unet_forward = ambient.unet.forward
    ambient.unet.forward = lambda sample, *a, **k: inputs.append(sample.clone()) or unet_forward(sample, *a, **k)
    try:
        out = ambient(prompt='a cat', num_inference_steps=2, guidance_scale=0.0, generator=_gen(4), output_type='pt',
                      masks=masks)
    finally:
        del ambient.unet.forward
    assert out.images.shape == (1, 3, 16, 16) and len(inputs) == 2
    for x in inputs:  # The UNet sees exactly the left half.
        assert (x[..., 8:] == 0).all() and (x[..., :8] != 0).all()
    with pytest.raises(ValueError, match='masks has shape'):
        ambient(prompt='a cat', num_inference_steps=2, guidance_scale=0.0, masks=masks[..., :8])
    with pytest.raises(ValueError, match='corruption_pattern'):
        ambient(prompt='a cat', num_inference_steps=2, corruption_pattern='stripes')
    with pytest.raises(ValueError, match='corruption_probability'):
        ambient(prompt='a cat', num_inference_steps=2, corruption_probability=1.5)
