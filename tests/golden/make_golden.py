"""Regenerate `ddpmpp32_keys.txt`: the state-dict keys and shapes of the original's gated DDPM++ 32x32.

    python tests/golden/make_golden.py

The network is the one the original Ambient Diffusion CIFAR-10 checkpoints hold: EDMPrecond over a
SongUNet DDPM++ (model_channels 128, channel_mult [2,2,2], 4 blocks, attention at 16x16, augment_dim 9)
with [image, mask] input and output (6 channels) and double-sigmoid gates on every convolution.
It is built on the meta device, so no memory is allocated and no random numbers are drawn.
"""

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, 'ddpmpp32_keys.txt')

CONFIG = dict(img_resolution=32, img_channels=6, out_channels=6, gate='double_sigmoid', model_type='SongUNet',
              model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], augment_dim=9,
              embedding_type='positional', encoder_type='standard', decoder_type='standard', resample_filter=[1, 1],
              channel_mult_noise=1, dropout=0.13)


def build_state_shapes():
    """[(key, shape)] of the configured network, in state-dict order."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
    from training.networks import EDMPrecond
    with torch.device('meta'):
        net = EDMPrecond(**CONFIG)
    return [(key, tuple(value.shape)) for key, value in net.state_dict().items()]


def format_line(key, shape):
    return f'{key}\t{",".join(str(d) for d in shape)}'


if __name__ == '__main__':
    with open(GOLDEN, 'w') as f:
        for key, shape in build_state_shapes():
            f.write(format_line(key, shape) + '\n')
    print(f'Wrote {GOLDEN}')
