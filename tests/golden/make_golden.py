"""Regenerate the golden files of the tests:

    python tests/golden/make_golden.py

- `ddpmpp32_keys.txt`: the state-dict keys and shapes of the original's gated DDPM++ 32x32. The network is the
  one the original Ambient Diffusion CIFAR-10 checkpoints hold: EDMPrecond over a SongUNet DDPM++
  (model_channels 128, channel_mult [2,2,2], 4 blocks, attention at 16x16, augment_dim 9) with [image, mask]
  input and output (6 channels) and double-sigmoid gates on every convolution. It is built on the meta
  device, so no memory is allocated and no random numbers are drawn.
- `values.json`: short expected-value slices of a tiny gated ambient network's forward pass, of the ambient
  Heun sampler with reconstruction guidance on that network, and of the ambient loss for fixed inputs.
  Everything is drawn from local generators (the network is built under `torch.random.fork_rng`), so the
  values do not depend on the global RNG state; computed on CPU in float32 (trajectories in float64).

Rerun the script only when a change of these numbers is intended, and say why in the commit.
"""

import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, 'ddpmpp32_keys.txt')
GOLDEN_VALUES = os.path.join(HERE, 'values.json')
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

CONFIG = dict(img_resolution=32, img_channels=6, out_channels=6, gate='double_sigmoid', model_type='SongUNet',
              model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], augment_dim=9,
              embedding_type='positional', encoder_type='standard', decoder_type='standard', resample_filter=[1, 1],
              channel_mult_noise=1, dropout=0.13)

# The tiny network of the value slices: what train.py builds for a new ambient run, at test size.
TINY_CONFIG = dict(img_resolution=16, img_channels=6, ambient=True, gate='sigmoid', model_type='SongUNet',
                   model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0,
                   hidden_precond='mask_aware', cond_sigma_min=0.1)


def build_state_shapes():
    """[(key, shape)] of the configured network, in state-dict order."""
    from training.networks import EDMPrecond
    with torch.device('meta'):
        net = EDMPrecond(**CONFIG)
    return [(key, tuple(value.shape)) for key, value in net.state_dict().items()]


def format_line(key, shape):
    return f'{key}\t{",".join(str(d) for d in shape)}'


# ----------------------------------------------------------------------------
# Value slices.

def _gen(seed):
    return torch.Generator().manual_seed(seed)


def tiny_net():
    """TINY_CONFIG's EDMPrecond in eval mode; weight tensors redrawn at std 0.1 (the zero-initialised output
    layers would otherwise hide F behind c_skip·x)."""
    from training.networks import EDMPrecond
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = EDMPrecond(**TINY_CONFIG)
    g = _gen(1)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net.eval().requires_grad_(False)


def _corrupted_batch(n=2, seed=2):
    """Clean images x0 [n, 3, 16, 16] and masks A, Ã from dust and box corruption (float32)."""
    from torch_utils.ambient_diffusion import MaskCorruption
    g = _gen(seed)
    x0 = torch.rand([n, 3, 16, 16], generator=g) * 2 - 1
    corruption = MaskCorruption('dust', corruption_probability=0.3, delta_probability=0.2)
    A = corruption.sample_mask(x0.shape, generator=g)
    A_hat = corruption.sample_hat_mask(A, generator=g)
    return x0, A, A_hat


def network_slice(net):
    """D([Ã ⊙ x, Ã], σ)[0, 0, 0, :6] and [1, 2, 5, :6] at σ = (0.05, 2)."""
    x0, _, A_hat = _corrupted_batch()
    x = x0 + torch.randn(x0.shape, generator=_gen(3)) * torch.tensor([0.05, 2.0]).reshape(2, 1, 1, 1)
    D = net(torch.cat([A_hat * x, A_hat], dim=1), torch.tensor([0.05, 2.0]))
    return torch.cat([D[0, 0, 0, :6], D[1, 2, 5, :6]])


def sampler_slice(net):
    """ambient_sampler, 4 Heun steps, K = 2 masks, guidance w = 0.5: x_N[0, 0, 0, :6] and x_N[1, 1, 7, :6]."""
    from torch_utils.ambient_diffusion import MaskCorruption
    from training import samplers
    g = _gen(4)
    latents = torch.randn([2, 3, 16, 16], generator=g, dtype=torch.float64)
    corruption = MaskCorruption('box', corruption_probability=0.3, delta_probability=0.1)
    masks = samplers.sample_masks(corruption, latents.shape, 2, g)
    x = samplers.ambient_sampler(net, latents, masks, num_steps=4, sigma_max=10, guidance_scale=0.5)
    return torch.cat([x[0, 0, 0, :6], x[1, 1, 7, :6]])


def loss_values(net):
    """AmbientLoss (mask-aware weights) on fixed observations: the total, then per sample `loss` and `loss_hat`."""
    from training.loss import AmbientLoss
    x0, A, A_hat = _corrupted_batch()
    loss, diagnostics = AmbientLoss(hidden_precond='mask_aware')(net, A * x0, A, A_hat, generator=[_gen(5), _gen(6)])
    return torch.cat([loss.sum().reshape(1), diagnostics['loss'], diagnostics['loss_hat']])


def golden_values():
    """{name: [floats]} of every value slice, recomputed now."""
    net = tiny_net()
    with torch.no_grad():
        slices = dict(network=network_slice(net), ambient_heun_sampler=sampler_slice(net),
                      ambient_loss=loss_values(net))
    return {name: [float(v) for v in values.flatten()] for name, values in slices.items()}


if __name__ == '__main__':
    with open(GOLDEN, 'w') as f:
        for key, shape in build_state_shapes():
            f.write(format_line(key, shape) + '\n')
    print(f'Wrote {GOLDEN}')
    with open(GOLDEN_VALUES, 'w') as f:
        json.dump(golden_values(), f, indent=2)
        f.write('\n')
    print(f'Wrote {GOLDEN_VALUES}')
