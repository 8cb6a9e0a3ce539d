"""Test doubles: tiny random models that stand in for downloads (IF stage I and II, the Inception detector).

Tests import them with `from fixtures import ...` (tests/ is on sys.path, as for conftest). Builders seed their
own RNG and leave the global RNG state as they found it, so building a model does not change other tests' draws.
"""

import warnings

import torch
import torch.nn.functional as F

from training.ambient_if import if_scheduler

#----------------------------------------------------------------------------
# Tiny random IF models.

TINY_VOCAB = ['a', 'the', 'of', 'photo', 'person', 'face', 'cat', 'dog', 'digit', 'image', 'blurry', 'brain', 'scan']


def _tiny_text(seed, dim=24):
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast
    vocab = [('<pad>', 0.0), ('</s>', 0.0), ('<unk>', 0.0)] + [(f'\u2581{w}', -float(i)) for i, w in enumerate(TINY_VOCAB)]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0)
    with torch.random.fork_rng(devices=[]):  # The constructors draw their initial weights from the global RNG.
        torch.manual_seed(seed)
        encoder = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=dim, d_kv=8, d_ff=32, num_layers=1,
            num_heads=2, relative_attention_num_buckets=8, decoder_start_token_id=0))
    return tokenizer, encoder


def _tiny_unet(resolution, in_channels, text_dim, seed, channels=(16, 32), class_embed_type=None):
    from diffusers import UNet2DConditionModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(sample_size=resolution, in_channels=in_channels, out_channels=6,
            layers_per_block=1, block_out_channels=channels,
            down_block_types=('ResnetDownsampleBlock2D', 'SimpleCrossAttnDownBlock2D'),
            up_block_types=('SimpleCrossAttnUpBlock2D', 'ResnetUpsampleBlock2D'),
            mid_block_type='UNetMidBlock2DSimpleCrossAttn', cross_attention_dim=channels[-1], attention_head_dim=8,
            addition_embed_type='text', addition_embed_type_num_heads=2, encoder_hid_dim=text_dim, norm_num_groups=8,
            resnet_time_scale_shift='scale_shift', act_fn='gelu', class_embed_type=class_embed_type)


def save_tiny_if(dest, resolution=16, seed=0, channels=(16, 32)):
    """Write a tiny random IF stage-I pipeline (IF's UNet layout, scheduler config, T5 + tokenizer) to `dest`."""
    from diffusers import IFPipeline
    tokenizer, encoder = _tiny_text(seed)
    unet = _tiny_unet(resolution, 3, encoder.config.d_model, seed, channels)
    pipe = IFPipeline(tokenizer=tokenizer, text_encoder=encoder, unet=unet, scheduler=if_scheduler(),
        safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    pipe.save_pretrained(dest)
    return str(dest)


def save_tiny_if_upscaler(dest, resolution=32, seed=0):
    """Write a tiny random IF stage-II (super-resolution) pipeline to `dest`."""
    from diffusers import IFSuperResolutionPipeline
    tokenizer, encoder = _tiny_text(seed)
    unet = _tiny_unet(resolution, 6, encoder.config.d_model, seed + 1, class_embed_type='timestep')
    pipe = IFSuperResolutionPipeline(tokenizer=tokenizer, text_encoder=encoder, unet=unet,
        scheduler=if_scheduler(), image_noising_scheduler=if_scheduler(variance_type='fixed_small', thresholding=False),
        safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    pipe.save_pretrained(dest)
    return str(dest)

#----------------------------------------------------------------------------
# Tiny random Inception-like detector (training/metrics.py).

class TinyDetector(torch.nn.Module):
    """A small random network with the Inception detector's calling convention.

    Its numbers mean nothing: it only lets the whole metric pipeline run without the 90 MB download.
    Weights come from a private generator seeded by `seed`. Scriptable with `torch.jit.script`;
    `save_tiny_detector` writes it as a TorchScript file that `metrics.load_detector` reads.
    """

    def __init__(self, seed=0, feature_dim=2048, num_classes=1008, resolution=32, channels=(16, 32)):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        c0, c1 = channels
        self.resolution = resolution
        self.conv0 = torch.nn.Parameter(torch.randn([c0, 3, 3, 3], generator=gen) / 27 ** 0.5)
        self.conv1 = torch.nn.Parameter(torch.randn([c1, c0, 3, 3], generator=gen) / (9 * c0) ** 0.5)
        self.fc = torch.nn.Parameter(torch.randn([feature_dim, 4 * c1], generator=gen) * 2 / (4 * c1) ** 0.5)
        self.out_weight = torch.nn.Parameter(torch.randn([num_classes, feature_dim], generator=gen) * 3 / feature_dim ** 0.5)
        self.out_bias = torch.nn.Parameter(torch.randn([num_classes], generator=gen))

    def forward(self, images, return_features: bool = False, no_output_bias: bool = False):
        x = (images.to(torch.float32) - 128) / 128  # uint8 -> about [-1, 1]
        x = F.interpolate(x, size=(self.resolution, self.resolution), mode='bilinear', align_corners=False)
        x = F.silu(F.conv2d(x, self.conv0, stride=2, padding=1))
        x = F.silu(F.conv2d(x, self.conv1, stride=2, padding=1))
        x = F.adaptive_avg_pool2d(x, 2)  # [N, c1, 2, 2]
        x = (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-5)  # so features vary between images
        features = F.softplus(x.flatten(1) @ self.fc.t())  # [N, feature_dim], >= 0 like Inception's pool3
        if return_features:
            return features
        logits = features @ self.out_weight.t()
        if not no_output_bias:
            logits = logits + self.out_bias
        return logits.softmax(dim=1)


def save_tiny_detector(path, **kwargs):
    """Script a `TinyDetector(**kwargs)` and save it as a TorchScript file; returns `path`."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', category=DeprecationWarning, message=r'.*torch\.jit')
        torch.jit.save(torch.jit.script(TinyDetector(**kwargs)), str(path))
    return path
