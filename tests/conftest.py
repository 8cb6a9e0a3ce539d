"""Shared fixtures: tiny EDM-format datasets written by the tests themselves (no downloads)."""

import io
import json
import os
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason='needs a CUDA device')
        for item in items:
            if 'gpu' in item.keywords:
                item.add_marker(skip)


def random_images(n, channels=3, resolution=16, seed=0):
    """Smooth random uint8 images [n, H, W, C] (low-frequency patterns, like small natural images)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, resolution), np.linspace(0, 1, resolution), indexing='ij')
    images = []
    for _ in range(n):
        f = rng.uniform(1, 4, size=(channels, 2))
        phase = rng.uniform(0, 2 * np.pi, size=(channels,))
        img = np.stack([np.sin(2 * np.pi * (f[c, 0] * yy + f[c, 1] * xx) + phase[c]) for c in range(channels)], axis=-1)
        images.append(np.clip((img + 1) * 127.5, 0, 255).astype(np.uint8))
    return np.stack(images)


def write_edm_dataset(dest, images, labels=None):
    """Write images [N, H, W, C] (and integer labels) in dataset_tool.py's layout to a folder or .zip."""
    entries = []
    files = {}
    for idx, img in enumerate(images):
        idx_str = f'{idx:08d}'
        fname = f'{idx_str[:5]}/img{idx_str}.png'
        pil = PIL.Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
        buf = io.BytesIO()
        pil.save(buf, format='png', compress_level=0)
        files[fname] = buf.getvalue()
        entries.append([fname, int(labels[idx])] if labels is not None else None)
    files['dataset.json'] = json.dumps({'labels': entries if labels is not None else None}).encode()
    dest = str(dest)
    if dest.endswith('.zip'):
        with zipfile.ZipFile(dest, 'w', compression=zipfile.ZIP_STORED) as zf:
            for fname, data in files.items():
                zf.writestr(fname, data)
    else:
        for fname, data in files.items():
            path = os.path.join(dest, fname)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, 'wb') as f:
                f.write(data)
    return dest


@pytest.fixture
def image_folder(tmp_path):
    """A 12-image RGB 16x16 folder dataset with labels 0..2; returns (path, images, labels)."""
    images = random_images(12, channels=3, resolution=16)
    labels = np.arange(12) % 3
    return write_edm_dataset(tmp_path / 'data', images, labels), images, labels


@pytest.fixture
def image_zip(tmp_path):
    """The same kind of dataset as a zip, without labels; returns (path, images)."""
    images = random_images(10, channels=1, resolution=16, seed=1)
    return write_edm_dataset(tmp_path / 'data.zip', images), images


@pytest.fixture(scope='session')
def tiny_if(tmp_path_factory):
    """A tiny random IF stage-I pipeline (16x16, IF's UNet layout, T5 + tokenizer) saved as a local model dir."""
    from fixtures import save_tiny_if
    return save_tiny_if(tmp_path_factory.mktemp('tiny_if') / 'IF-I-tiny', resolution=16)


def train_options(args):
    """The option values `train.py` parses from `args`, as `train.build_config` takes them (nothing runs)."""
    import dnnlib
    import train
    return dnnlib.EasyDict(train.main.make_context('train.py', [str(a) for a in args]).params)


def steps(n, batch=4):
    """train.py's --duration (Mimg) of n optimizer steps of `batch` images."""
    return f'--duration={n * batch / 1e6}'


def assert_one_line_error(result, *needles):
    """A click result that failed through click (no traceback) with one `Error` line holding every needle."""
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), (result.exception, result.output)
    errors = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert len(errors) == 1 and 'Traceback' not in result.output, result.output
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
