"""Tests for SR3-style super-resolution: the conditioned preconditioner (training/networks.py sr_factor), the
dataset's condition, the losses, train.py --task=superres, inverse.superres_batch and eval.py superres."""

import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import eval as eval_cli
import train
from conftest import random_images, train_options, write_edm_dataset
from torch_utils.ambient_diffusion import MaskCorruption
from training import inverse, samplers
from training.dataset import ImageFolderDataset, sr_condition
from training.loss import AmbientLoss, EDMLoss
from training.networks import EDMPrecond

TINY_NET = dict(model_type='SongUNet', model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[],
                dropout=0)


def _net(ambient=False, sr_factor=4, seed=0):
    torch.manual_seed(seed)
    return EDMPrecond(16, 2 if ambient else 1, ambient=ambient, sr_factor=sr_factor, **TINY_NET).eval()


def test_condition_is_extra_input_channels():
    net = _net()
    assert net.model.enc['16x16_conv'].weight.shape[1] == 2  # image + condition
    x, sigma = torch.randn(2, 1, 16, 16), torch.tensor([0.5, 2.0])
    c1, c2 = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(net(x, sigma, condition=c1), net(x, sigma, condition=c2))
        # F sees [c_in·x, condition]: the condition is not scaled by c_in.
        c_in = (1 / (0.25 + sigma ** 2).sqrt()).view(-1, 1, 1, 1)
        c_noise = sigma.log() / 4
        F_x = net.model(torch.cat([c_in * x, c1], 1), c_noise)
        c_skip = (0.25 / (sigma ** 2 + 0.25)).view(-1, 1, 1, 1)
        c_out = (sigma * 0.5 / (sigma ** 2 + 0.25).sqrt()).view(-1, 1, 1, 1)
        torch.testing.assert_close(net(x, sigma, condition=c1), c_skip * x + c_out * F_x)
    with pytest.raises(ValueError, match='called without one'):
        net(x, sigma)
    with pytest.raises(ValueError, match='takes no condition'):
        _net(sr_factor=None)(x, sigma, condition=c1)
    for bad in (1, 3, True, 2.0):
        with pytest.raises(ValueError, match='sr_factor'):
            _net(sr_factor=bad)


def test_dataset_condition_is_the_upsampled_block_means(tmp_path):
    data = write_edm_dataset(tmp_path / 'd.zip', random_images(3, channels=3, resolution=16, seed=1))
    dataset = ImageFolderDataset(data, sr_factor=4, xflip=True, corruption_probability=0.5)
    for idx in (0, 4):  # a plain and an x-flipped copy
        observation, _, A, _, condition = dataset[idx]
        x0 = ImageFolderDataset(data, mode='clean', xflip=True)[idx][0]
        expected = F.interpolate(F.avg_pool2d(x0[None].double(), 4), scale_factor=4, mode='bicubic',
                                 align_corners=False)[0]
        torch.testing.assert_close(condition.double(), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(observation, x0 * A)  # the observation is still A ⊙ x0
    torch.testing.assert_close(sr_condition(x0[None], 4)[0], sr_condition(x0, 4))


class _Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conditions = []

    def forward(self, x, sigma, labels=None, augment_labels=None, condition=None):
        self.conditions.append(condition)
        return x[:, :1] * 0.5


def test_losses_pass_the_condition():
    x0, condition = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)
    net = _Recorder()
    EDMLoss()(net, x0, condition=condition, generator=torch.Generator().manual_seed(0))
    A = torch.ones_like(x0)
    AmbientLoss()(net, x0, A, A, condition=condition, generator=torch.Generator().manual_seed(0))
    assert all(c is condition for c in net.conditions) and len(net.conditions) == 2
    EDMLoss()(net, x0, generator=torch.Generator().manual_seed(0))
    assert net.conditions[-1] is None


def test_train_config_and_errors():
    base = ['--outdir=unused', '--data=unused']
    c = train.build_config(train_options(base + ['--task=superres', '--precond=edm', '--corruption_probability=0']))
    assert c.network_kwargs.sr_factor == 4 and c.dataset_kwargs.sr_factor == 4 and c.augment_kwargs is None
    c = train.build_config(train_options(base + ['--task=superres', '--sr_factor=2']))
    assert c.network_kwargs.sr_factor == 2 and c.network_kwargs.ambient
    assert train.build_config(train_options(base)).augment_kwargs is not None  # 0.12 for generation
    for args, message in ((['--sr_factor=2'], 'add --task=superres'),
                          (['--task=superres', '--augment=0.1'], 'without augmentation'),
                          (['--task=superres', '--precond=ambient_noisy'], 'not available')):
        with pytest.raises(train.ConfigError, match=message):
            train.build_config(train_options(base + args))


def test_superres_batch_is_per_seed_and_checks_its_input():
    net = _net(ambient=True)
    lowres = torch.rand(3, 1, 4, 4) * 2 - 1
    kwargs = dict(corruption=MaskCorruption('dust', 0.3), num_steps=3)
    together = inverse.superres_batch(net, lowres, [5, 6, 7], **kwargs)
    alone = inverse.superres_batch(net, lowres[1:2], [6], **kwargs)
    torch.testing.assert_close(together[1:2], alone, rtol=0, atol=1e-6)
    other = inverse.superres_batch(net, lowres.flip(0), [5, 6, 7], **kwargs)
    assert not torch.allclose(other[0], together[0])  # the condition matters
    with pytest.raises(ValueError, match='super-resolves'):
        inverse.superres_batch(net, torch.zeros(1, 1, 8, 8), [0], **kwargs)
    with pytest.raises(ValueError, match='not trained for super-resolution'):
        inverse.superres_batch(_net(sr_factor=None), lowres, [5, 6, 7], num_steps=2)
    with pytest.raises(ValueError, match='one mask per sample'):
        inverse.superres_batch(net, lowres, [5, 6, 7], corruption=MaskCorruption('dust', 0.3), num_masks=2,
                               guidance_scale=1.0, num_steps=2)
    with pytest.raises(ValueError, match='not trained for super-resolution'):
        samplers.LowResConditioned(_net(sr_factor=None), lowres)


@pytest.mark.slow
def test_train_and_superres_end_to_end(tmp_path):
    images = random_images(8, channels=1, resolution=16, seed=2)
    data = write_edm_dataset(tmp_path / 'hr.zip', images)
    args = ['--outdir', tmp_path / 'run', '--data', data, '--task=superres', '--precond=edm', '--corruption_probability=0',
            '--cbase=8', '--cres=1,2', '--num_blocks=1', '--batch=4', '--duration=0.000008', '--nosubdir', '--seed=0',
            '--workers=0']
    result = CliRunner().invoke(train.main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = tmp_path / 'sr'
    cmd = ['superres', '--network', tmp_path / 'run', '--latest', '--data', data, '--outdir', out, '--seeds=0-3',
           '--steps=3', '--batch=3']
    result = CliRunner().invoke(eval_cli.cli, [str(a) for a in cmd], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert 'SR3 PSNR' in result.output and 'bicubic PSNR' in result.output
    for kind, size in (('sr', 16), ('bicubic', 16), ('lowres', 4), ('ref', 16)):
        assert sorted(os.listdir(out / kind)) == [f'{s:06d}.png' for s in range(4)]
        assert np.array(PIL.Image.open(out / kind / '000002.png')).shape == (size, size)
    rows = [json.loads(line) for line in open(out / 'metrics.jsonl')]
    assert [r['seed'] for r in rows] == [0, 1, 2, 3]
    ref = np.array(PIL.Image.open(out / 'ref' / '000001.png')).astype(np.float64) / 255
    sr = np.array(PIL.Image.open(out / 'sr' / '000001.png')).astype(np.float64) / 255
    assert rows[1]['psnr'] == pytest.approx(10 * np.log10(1 / np.mean((ref - sr) ** 2)))
    stamp = os.path.getmtime(out / 'sr' / '000000.png')
    result = CliRunner().invoke(eval_cli.cli, [str(a) for a in cmd[:-3] + ['--seeds=0-4', '--steps=3', '--batch=3']],
                                catch_exceptions=False)
    assert 'Super-resolving 1 of 5' in result.output and os.path.getmtime(out / 'sr' / '000000.png') == stamp
    # Low-resolution input: super-resolved, nothing to score against.
    low = write_edm_dataset(tmp_path / 'lr.zip', random_images(2, channels=1, resolution=4, seed=3))
    result = CliRunner().invoke(eval_cli.cli, ['superres', '--network', str(tmp_path / 'run'), '--latest', '--data',
                                               str(low), '--outdir', str(tmp_path / 'lr'), '--seeds=0-1', '--steps=2'],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path / 'lr' / 'sr')) == ['000000.png', '000001.png']
    assert not os.path.exists(tmp_path / 'lr' / 'ref')
    # Errors: one line each, nothing written.
    bad = write_edm_dataset(tmp_path / 'bad.zip', random_images(2, channels=1, resolution=8, seed=3))
    for extra, message in (([f'--data={bad}'], 'pass either size'), (['--num_masks=2'], '--num_masks'),
                           (['--seeds=0-50'], 'holds 8 images')):
        result = CliRunner().invoke(eval_cli.cli, ['superres', '--network', str(tmp_path / 'run'), '--latest',
                                                   '--data', str(data), '--outdir', str(tmp_path / 'e'), *extra])
        assert result.exit_code != 0 and message in result.output and 'Traceback' not in result.output, result.output
        assert not os.path.exists(tmp_path / 'e' / 'sr')


def test_sr_factor_must_divide_the_resolution(tmp_path):
    data = write_edm_dataset(tmp_path / 'hr.zip', random_images(4, channels=1, resolution=16, seed=2))
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path / 'run'), '--data', str(data), '--task=superres',
                                             '--sr_factor=3', '--precond=edm', '--corruption_probability=0', '-n'])
    assert result.exit_code != 0 and '--sr_factor=3 does not divide' in result.output
