"""Tests for find_dataset_neighbors.py with a tiny random DINOv2 built from a config (no weights downloaded)."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import find_dataset_neighbors as fdn
from conftest import REPO, random_images, write_edm_dataset
from training.metrics import subset_indices

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]  # Not ImageNet's, so the test sees they were read.
COPIES = {0: 3, 1: 7}  # Generated image position -> the training image it copies.


def save_tiny_dinov2(path, seed=0, preprocessor=True):
    """A 2-layer DINOv2 (hidden 32, patch 4). initializer_range 0.5 spreads the random features apart (with
    the usual 0.02 all images look alike, cosine > 0.98)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          patch_size=4, image_size=16, initializer_range=0.5)
    Dinov2Model(config).save_pretrained(path)
    if preprocessor:
        with open(os.path.join(path, 'preprocessor_config.json'), 'w') as f:
            json.dump(dict(image_processor_type='BitImageProcessor', image_mean=MEAN, image_std=STD), f)
    return str(path)


def make_vit(path):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=4,
                       image_size=16)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp('models')
    return [save_tiny_dinov2(root / 'a', seed=0), save_tiny_dinov2(root / 'b', seed=1),
            save_tiny_dinov2(root / 'plain', seed=0, preprocessor=False)]


def make_data(root, channels=3):
    """A 10-image 16x16 dataset zip and a folder of 5 generated images in eval.py's layout (000000/00000N.png):
    copies of training images 3 and 7, then 3 new images."""
    train = random_images(10, channels=channels, resolution=16, seed=0)
    data = write_edm_dataset(root / 'data.zip', train)
    images = root / 'images'
    os.makedirs(images / '000000')
    fresh = random_images(3, channels=channels, resolution=16, seed=5)
    for pos, image in enumerate([train[COPIES[0]], train[COPIES[1]], *fresh]):
        PIL.Image.fromarray(image[:, :, 0] if channels == 1 else image).save(images / '000000' / f'{pos:06d}.png')
    return data, str(images)


def invoke(args, expect_ok=True):
    result = CliRunner().invoke(fdn.main, [str(a) for a in args], catch_exceptions=False)
    if expect_ok:
        assert result.exit_code == 0, result.output
    return result


def base_args(root, data, images, model, out='out'):
    return ['--input_dir', images, '--data', data, '--features_path', root / 'feat.npy', '--output_dir', root / out,
            '--model', model, '--image_size', 32, '--workers=0', '--batch=3']


def replace(args, changes):
    """`args` with the values of some options replaced, e.g. {'--model': path}."""
    args = list(args)
    for key, value in changes.items():
        args[args.index(key) + 1] = value
    return args


def read_rows(out):
    with open(os.path.join(out, 'similarities.jsonl')) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize('channels', [3, 1])
def test_copies_are_their_own_nearest_neighbour(models, tmp_path, channels):
    data, images = make_data(tmp_path, channels)
    invoke(base_args(tmp_path, data, images, models[0]) + ['--threshold=0.9999'])
    out = tmp_path / 'out'
    rows = read_rows(out)
    assert [r['file'] for r in rows] == [f'000000/{p:06d}.png' for p in range(5)]
    for pos, row in enumerate(rows):
        assert len(row['topk_indices']) == 3 and row['topk_similarities'] == sorted(row['topk_similarities'], reverse=True)
        assert row['max_similarity'] == row['topk_similarities'][0]
        if pos in COPIES:
            assert row['topk_indices'][0] == COPIES[pos]
            assert row['max_similarity'] == pytest.approx(1, abs=1e-5)
        else:
            assert row['max_similarity'] < 0.9999

    # The outputs agree with each other and with similarities recomputed from the cached features.
    features = np.load(tmp_path / 'feat.npy')
    assert features.shape == (10, 32) and np.allclose(np.linalg.norm(features, axis=1), 1, atol=1e-5)
    net = fdn.load_model(models[0], device='cpu')
    params = fdn.preprocessing(net, models[0], 16, image_size=32)
    gen = torch.stack([fdn._GeneratedImages(images, [r['file'] for r in rows])[p][1] for p in range(5)])
    sims = fdn.extract_features(net, gen, params) @ torch.from_numpy(features).T
    assert np.allclose([r['max_similarity'] for r in rows], sims.amax(1), atol=1e-5)
    assert np.allclose([r['softmax_max'] for r in rows], torch.softmax(sims, dim=1).amax(1), atol=1e-5)
    with open(out / 'max_products.pkl', 'rb') as f:
        max_products = pickle.load(f)
    assert max_products == [r['max_similarity'] for r in rows] and all(type(v) is float for v in max_products)
    summary = json.loads((out / 'summary.json').read_text())
    m = np.array(max_products)
    assert summary['count'] == 5 and summary['above_threshold'] == 2 and summary['fraction_above_threshold'] == 0.4
    for key, value in dict(mean=m.mean(), median=np.median(m), p95=np.percentile(m, 95), p99=np.percentile(m, 99)).items():
        assert summary[key] == pytest.approx(value)
    assert PIL.Image.open(out / 'max_similarity_hist.png').size == (600, 400)
    pair = np.array(PIL.Image.open(out / 'neighbors' / '000000_000000.png'))
    assert pair.shape == (128 + 16, 4 * 128 + 3 * 4, 3)  # 16 px tiles enlarged 8x, 4 px gaps, caption strip.
    assert sorted(os.listdir(out / 'neighbors')) == [f'000000_{p:06d}.png' for p in range(5)]


def test_preprocessing_matches_the_image_processor(models):
    from transformers import BitImageProcessorPil

    net = fdn.load_model(models[0], device='cpu')
    params = fdn.preprocessing(net, models[0], resolution=16, image_size=32)
    assert (params.mean, params.std, params.mean_std_from) == (MEAN, STD, 'preprocessor_config.json')
    uint8 = random_images(4, channels=3, resolution=16, seed=2)
    x = torch.from_numpy(uint8).permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1
    processor = BitImageProcessorPil(image_mean=MEAN, image_std=STD, do_center_crop=False, resample=PIL.Image.BICUBIC,
                                     size=dict(height=32, width=32))
    pil = [PIL.Image.fromarray(u) for u in uint8]
    # At the native size: exactly (u / 255 - mean) / std, as the transformers image processor computes it.
    native = fdn.preprocess(x, dnnlib.EasyDict(params, image_size=16))
    expected = (uint8.transpose(0, 3, 1, 2) / 255 - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]
    assert np.allclose(native, expected, atol=1e-5)
    assert np.allclose(native, processor(pil, do_resize=False, return_tensors='pt').pixel_values, atol=1e-5)
    # Resized: the processor's PIL bicubic (a = -0.5, on uint8) and our torch bicubic (a = -0.75) differ slightly.
    resized = fdn.preprocess(x, params)
    reference = processor(pil, return_tensors='pt').pixel_values
    assert resized.shape == reference.shape == (4, 3, 32, 32)
    assert (resized - reference).abs().mean() < 0.02 and (resized - reference).abs().max() < 0.3
    # Grayscale goes to all three channels; sizes are multiples of the patch size.
    gray = fdn.preprocess(x[:, :1], dnnlib.EasyDict(params, image_size=16))
    assert np.allclose(gray[:, 0] * STD[0] + MEAN[0], gray[:, 2] * STD[2] + MEAN[2], atol=1e-5)
    assert fdn.preprocessing(net, models[0], resolution=18, image_size=0).image_size == 20
    with pytest.raises(ValueError, match='multiple of the model\'s patch size 4'):
        fdn.preprocessing(net, models[0], resolution=16, image_size=30)
    no_proc = fdn.preprocessing(net, models[2], resolution=16)
    assert (no_proc.mean, no_proc.std, no_proc.mean_std_from) == (list(fdn.IMAGENET_MEAN), list(fdn.IMAGENET_STD), 'imagenet')


@pytest.mark.slow
def test_cache_is_reused_and_recomputed_when_stale(models, tmp_path, monkeypatch):
    data, images = make_data(tmp_path)
    calls = []
    compute = fdn.compute_features
    monkeypatch.setattr(fdn, 'compute_features', lambda *a, **kw: calls.append(kw['desc']) or compute(*a, **kw))
    # --output_dir inside --input_dir: a rerun must not take its own outputs for generated images.
    args = base_args(tmp_path, data, images, models[0], out=os.path.join('images', 'result'))
    result_dir = os.path.join(images, 'result')
    assert 'No cached dataset features' in invoke(args).output
    feat = tmp_path / 'feat.npy'
    stamp, first = os.stat(feat).st_mtime_ns, read_rows(result_dir)
    result = invoke(args + ['--max_size=3', '--seed=1'])
    assert 'Reusing cached dataset features' in result.output and os.stat(feat).st_mtime_ns == stamp
    assert calls == ['Dataset features', 'Generated features', 'Generated features']
    assert [r['file'] for r in read_rows(result_dir)] == [first[i]['file'] for i in subset_indices(5, 3, seed=1)]

    # Each change (cumulative) recomputes, and the message says what changed.
    changed = replace(args, {'--model': models[1]})
    assert 'stale (model, model_weights_sha256 changed)' in invoke(changed).output
    changed = replace(changed, {'--image_size': 16})
    assert 'stale (preprocessing changed)' in invoke(changed).output
    changed = changed + ['--normalize=False']
    assert 'stale (normalize changed)' in invoke(changed).output
    changed = replace(changed, {'--model': models[2]})  # Same weights as models[0], no preprocessor_config.json.
    assert 'stale (model, model_weights_sha256, preprocessing changed)' in invoke(changed).output
    assert 'stale (model, preprocessing, normalize changed)' in invoke(args).output
    assert 'Reusing' in invoke(args).output and calls.count('Dataset features') == 6
    write_edm_dataset(tmp_path / 'data.zip', random_images(10, channels=3, resolution=16, seed=9))  # Same size and shape.
    assert 'stale (dataset_fingerprint changed)' in invoke(args).output
    os.remove(str(feat) + '.json')
    assert 'no readable' in invoke(args).output and os.path.isfile(str(feat) + '.json')
    assert calls.count('Dataset features') == 8 and len(read_rows(result_dir)) == 5
    # The original's --cache=False recomputes even matching features; its --batch-gpu is --batch.
    assert '--cache=False' in invoke(args + ['--cache=False', '--batch-gpu=2']).output
    assert calls.count('Dataset features') == 9


@pytest.mark.slow  # a dozen command runs: 3 s
def test_errors_are_one_line(models, tmp_path):
    data, images = make_data(tmp_path)
    args = base_args(tmp_path, data, images, models[0])

    def error(extra, changes={}):
        result = invoke(replace(args, changes) + extra, expect_ok=False)
        lines = result.stderr.strip().splitlines()  # Progress bars (model loading) may come first.
        assert result.exit_code != 0 and lines[-1].startswith('Error: ') and 'Traceback' not in result.output, result.output
        return lines[-1]

    missing = str(tmp_path / 'no_such_model')
    message = error([], {'--model': missing})
    assert missing in message and '--model' in message and '--cache_dir' in message
    assert 'not DINOv2' in error([], {'--model': make_vit(tmp_path / 'vit')})
    os.makedirs(tmp_path / 'empty')
    assert 'no images found' in error([], {'--input_dir': str(tmp_path / 'empty')})
    assert 'dataset not found' in error([], {'--data': str(tmp_path / 'none.zip')})
    assert '--k=11' in error(['--k=11'])
    assert 'patch size 4' in error([], {'--image_size': 30})
    PIL.Image.fromarray(random_images(1, resolution=32)[0]).save(os.path.join(images, 'big.png'))
    assert 'big.png is a 32x32 RGB image but the dataset holds 16x16 3-channel images' in error([])
    os.remove(os.path.join(images, 'big.png'))
    PIL.Image.fromarray(random_images(1, channels=1)[0][:, :, 0]).save(os.path.join(images, 'gray.png'))
    assert 'gray.png is a 16x16 L image' in error([])
    os.remove(os.path.join(images, 'gray.png'))
    with open(os.path.join(images, 'broken.png'), 'wb') as f:
        f.write(b'not a png')
    assert 'cannot read image' in error([]) and 'broken.png' in error([])
    os.remove(os.path.join(images, 'broken.png'))
    png = (tmp_path / 'images' / '000000' / '000002.png').read_bytes()
    with open(os.path.join(images, 'truncated.png'), 'wb') as f:
        f.write(png[:len(png) // 2])  # A valid header: fails only when a DataLoader worker decodes it.
    message = error(['--workers=1'])
    assert 'cannot read image' in message and 'truncated.png' in message
    assert json.loads(invoke(args + ['--dry-run']).output)['k'] == 3


@pytest.mark.slow
def test_two_processes_give_the_same_results(models, tmp_path):
    data, images = make_data(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1')
    # A DataLoader worker reads the zip before the main process does: each must use its own file handle.
    common = [f'--input_dir={images}', f'--data={data}', f'--model={models[0]}', '--image_size=32', '--workers=1',
              '--batch=2']
    for name, launcher in [('one', [sys.executable]),
                           ('two', [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'])]:
        subprocess.run(launcher + ['find_dataset_neighbors.py', f'--features_path={tmp_path / name}.npy',
                                   f'--output_dir={tmp_path / name}'] + common, cwd=REPO, env=env, check=True,
                       capture_output=True)
    assert np.allclose(np.load(tmp_path / 'one.npy'), np.load(tmp_path / 'two.npy'), atol=1e-5)
    one, two = read_rows(tmp_path / 'one'), read_rows(tmp_path / 'two')
    assert [(r['file'], r['topk_indices']) for r in one] == [(r['file'], r['topk_indices']) for r in two]
    for a, b in zip(one, two):
        assert np.allclose(a['topk_similarities'], b['topk_similarities'], atol=1e-5)
        assert a['softmax_max'] == pytest.approx(b['softmax_max'], abs=1e-5)
    assert sorted(os.listdir(tmp_path / 'two' / 'neighbors')) == sorted(os.listdir(tmp_path / 'one' / 'neighbors'))
