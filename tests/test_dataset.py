"""Tests for training/dataset.py: EDM-format reading and the corruption built into items."""

import json
import os

import numpy as np
import PIL.Image
import pytest
import torch

from training.dataset import DatasetError, ImageFolderDataset
from torch_utils.misc import InfiniteSampler
from conftest import random_images, write_edm_dataset


def corrupted(path, **kw):
    kw = dict(dict(corruption_probability=0.6, delta_probability=0.2), **kw)
    return ImageFolderDataset(path, **kw)


def test_reads_folder_with_labels(image_folder):
    path, images, labels = image_folder
    ds = ImageFolderDataset(path, use_labels=True, mode='clean', normalize=False)
    assert len(ds) == 12 and ds.image_shape == [3, 16, 16] and ds.resolution == 16 and ds.num_channels == 3
    assert ds.has_labels and ds.label_dim == 3 and ds.name == 'data'
    for i in (0, 5, 11):
        x0, label, mask, hat = ds[i]
        assert x0.dtype == torch.uint8
        np.testing.assert_array_equal(x0.numpy(), images[i].transpose(2, 0, 1))
        assert label.argmax().item() == labels[i] and label.sum().item() == 1


def test_reads_zip_grayscale_without_labels(image_zip):
    path, images = image_zip
    ds = ImageFolderDataset(path, mode='clean', normalize=False)
    assert len(ds) == 10 and ds.image_shape == [1, 16, 16] and not ds.has_labels
    x0, label, _, _ = ds[3]
    assert label.shape == (0,)
    np.testing.assert_array_equal(x0.numpy()[0], images[3][:, :, 0])
    with pytest.raises(DatasetError, match='labels were requested'):
        ImageFolderDataset(path, use_labels=True)


def test_corrupted_items_hide_pixels(image_folder):
    path, images, _ = image_folder
    ds = corrupted(path)
    clean = ImageFolderDataset(path, mode='clean')
    for i in range(len(ds)):
        obs, _, A, A_hat = ds[i]
        x0 = clean[i][0]
        assert obs.dtype == torch.float32 and A.shape == obs.shape == A_hat.shape
        assert set(A.unique().tolist()) <= {0.0, 1.0}
        torch.testing.assert_close(obs, A * x0, rtol=0, atol=0)
        assert (obs[A == 0] == 0).all()
        assert (A_hat <= A).all()
    x0 = clean[0][0]
    assert x0.min() >= -1 and x0.max() <= 1


def test_mask_is_fixed_per_image_and_hat_redrawn(image_folder):
    path, _, _ = image_folder
    ds = corrupted(path)
    A1, H1 = ds[(4, 0)][2:]
    A2, H2 = ds[(4, 1)][2:]
    A3, H3 = ds[(4, 0)][2:]
    assert torch.equal(A1, A2) and torch.equal(A1, A3)
    assert not torch.equal(H1, H2), 'B must be redrawn for a new draw id'
    assert torch.equal(H1, H3), 'the same draw id reproduces B'
    # A new dataset object (a new process, another worker) gives the same A.
    assert torch.equal(corrupted(path)[4][2], A1)
    # Different images get different masks; another corruption seed another dataset.
    assert not torch.equal(ds[5][2], A1)
    assert not torch.equal(corrupted(path, corruption_seed=1)[4][2], A1)
    # Without draw ids, repeated draws still redraw B.
    assert not torch.equal(ds[4][3], ds[4][3])


def test_hat_seed_changes_only_B(image_folder):
    path, _, _ = image_folder
    a, b = corrupted(path, hat_seed=0), corrupted(path, hat_seed=1)
    assert torch.equal(a[(2, 7)][2], b[(2, 7)][2])
    assert not torch.equal(a[(2, 7)][3], b[(2, 7)][3])


def test_fixed_hat_mask(image_folder):
    path, _, _ = image_folder
    ds = corrupted(path, fixed_hat_mask=True)
    hats = [ds[(3, d)][3] for d in range(4)] + [ds[3][3], corrupted(path, fixed_hat_mask=True)[3][3]]
    assert all(torch.equal(h, hats[0]) for h in hats)


def test_missing_rate_matches_probability(tmp_path):
    images = random_images(40, channels=3, resolution=16, seed=3)
    path = write_edm_dataset(tmp_path / 'd', images)
    p, delta = 0.7, 0.3
    ds = ImageFolderDataset(path, corruption_probability=p, delta_probability=delta)
    A = torch.stack([ds[(i, i)][2] for i in range(len(ds))])
    H = torch.stack([ds[(i, i)][3] for i in range(len(ds))])
    n = A.numel()
    for rate, expected in ((A.mean().item(), 1 - p), (H.mean().item(), (1 - p) * (1 - delta))):
        assert abs(rate - expected) < 5 * np.sqrt(expected * (1 - expected) / n)


def test_xflip_flips_masks_with_image(image_folder):
    path, images, _ = image_folder
    ds = corrupted(path, xflip=True, fixed_hat_mask=True)
    clean = ImageFolderDataset(path, xflip=True, mode='clean', normalize=False)
    assert len(ds) == 24
    obs, _, A, H = ds[2]
    obs_f, _, A_f, H_f = ds[2 + 12]
    assert ds.get_details(14)['xflip'] and ds.get_details(14)['raw_idx'] == 2
    torch.testing.assert_close(obs_f, obs.flip(-1), rtol=0, atol=0)
    assert torch.equal(A_f, A.flip(-1)) and torch.equal(H_f, H.flip(-1))
    np.testing.assert_array_equal(clean[14][0].numpy(), images[2].transpose(2, 0, 1)[:, :, ::-1])


def test_max_size_subset_keeps_each_images_mask(image_folder):
    path, _, _ = image_folder
    full = corrupted(path)
    sub = corrupted(path, max_size=5, random_seed=7)
    assert len(sub) == 5
    assert sub._raw_idx.tolist() == sorted(sub._raw_idx.tolist())
    assert corrupted(path, max_size=5, random_seed=7)._raw_idx.tolist() == sub._raw_idx.tolist()
    for i in range(5):
        raw = sub.get_details(i)['raw_idx']
        assert torch.equal(sub[i][2], full[raw][2])


def test_cache_returns_same_items(image_folder):
    path, _, _ = image_folder
    ds = corrupted(path, cache=True)
    first = ds[(1, 3)]
    assert 1 in ds._cached_images
    again = ds[(1, 3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize('pattern', ['box', 'fixed_box', 'keep_patch'])
def test_spatial_patterns(image_folder, pattern):
    path, _, _ = image_folder
    ds = ImageFolderDataset(path, corruption_pattern=pattern, corruption_probability=0.5, delta_probability=0.25)
    obs, _, A, H = ds[(0, 0)]
    assert (H <= A).all() and (obs[A == 0] == 0).all()
    assert torch.equal(A[0], A[1]) and torch.equal(A[1], A[2]), 'spatial masks are shared over channels'


def test_dataloader_workers_match_main_process(image_folder):
    path, _, _ = image_folder
    ds = corrupted(path)
    sampler = InfiniteSampler(ds, seed=1, yield_positions=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler, num_workers=2)
    it = iter(loader)
    batches = [next(it) for _ in range(3)]
    keys = []
    ref_sampler = iter(InfiniteSampler(ds, seed=1, yield_positions=True))
    keys = [next(ref_sampler) for _ in range(12)]
    expected = [ds[k] for k in keys]
    got_obs = torch.cat([b[0] for b in batches])
    got_hat = torch.cat([b[3] for b in batches])
    assert torch.equal(got_obs, torch.stack([e[0] for e in expected]))
    assert torch.equal(got_hat, torch.stack([e[3] for e in expected]))


def test_errors(tmp_path, image_folder):
    path, _, _ = image_folder
    with pytest.raises(DatasetError, match='dataset not found'):
        ImageFolderDataset(tmp_path / 'nope.zip')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(DatasetError, match='no images'):
        ImageFolderDataset(tmp_path / 'empty')
    with pytest.raises(DatasetError, match='resolution 32'):
        ImageFolderDataset(path, resolution=32)
    with pytest.raises(DatasetError, match='mode'):
        ImageFolderDataset(path, mode='raw')
    with pytest.raises(ValueError, match='corruption_probability'):
        ImageFolderDataset(path, corruption_probability=1.0)
    with pytest.raises(ValueError, match='delta_probability'):
        ImageFolderDataset(path, delta_probability=-0.1)
    bad = tmp_path / 'bad.zip'
    bad.write_bytes(b'not a zip')
    with pytest.raises(DatasetError, match='not a readable zip'):
        ImageFolderDataset(bad)


def test_mixed_shapes_and_unreadable_images(tmp_path):
    folder = write_edm_dataset(tmp_path / 'mixed', random_images(3, resolution=16))
    write_edm_dataset(tmp_path / 'other', random_images(1, resolution=8))
    os.replace(tmp_path / 'other/00000/img00000000.png', tmp_path / 'mixed/00000/img00000003.png')
    ds = ImageFolderDataset(folder)
    with pytest.raises(DatasetError, match='img00000003.png'):
        ds[3]
    (tmp_path / 'mixed/00000/img00000003.png').write_bytes(b'garbage')
    with pytest.raises(DatasetError, match='cannot read image 00000/img00000003.png'):
        ImageFolderDataset(folder)[3]
    nonsquare = tmp_path / 'ns'
    write_edm_dataset(nonsquare, random_images(1, resolution=16)[:, :, :8])
    with pytest.raises(DatasetError, match='not square'):
        ImageFolderDataset(nonsquare)


def test_bad_labels(tmp_path):
    folder = write_edm_dataset(tmp_path / 'l', random_images(3, resolution=8), labels=np.array([0, 1, 2]))
    meta = json.loads(open(os.path.join(folder, 'dataset.json')).read())
    meta['labels'] = meta['labels'][:2]
    open(os.path.join(folder, 'dataset.json'), 'w').write(json.dumps(meta))
    with pytest.raises(DatasetError, match='no label for 00000/img00000002.png'):
        ImageFolderDataset(folder, use_labels=True)


def test_corruption_config_round_trip(image_folder):
    path, _, _ = image_folder
    ds = corrupted(path, corruption_seed=3, hat_seed=4, mask_full_rgb=True)
    cfg = ds.corruption_config()
    json.dumps(cfg)
    assert cfg['corruption_probability'] == 0.6 and cfg['delta_probability'] == 0.2
    assert cfg['corruption_seed'] == 3 and cfg['hat_seed'] == 4 and cfg['fixed_hat_mask'] is False


def test_zip_is_reopened_in_each_process(image_zip, monkeypatch):
    # A forked DataLoader worker must not share the parent's zip handle (and its file position).
    path, images = image_zip
    ds = ImageFolderDataset(path)
    parent = ds._get_zipfile()
    assert ds._get_zipfile() is parent
    monkeypatch.setattr(os, 'getpid', lambda: -1)
    child = ds._get_zipfile()
    assert child is not parent
    assert torch.equal(ds[3][0], ImageFolderDataset(path)[3][0])
    monkeypatch.undo()
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)
    assert sum(batch[0].shape[0] for batch in loader) == len(images)


def test_hf_image_dataset_keeps_hidden_pixels_hidden(tmp_path):
    # 🤗 image folder, non-square images, random crops fixed per image, mirrored copies with mirrored masks.
    from training.dataset import HFImageDataset
    folder = tmp_path / 'imagefolder'
    folder.mkdir()
    raw = random_images(3, 3, 24, seed=5)
    for i, img in enumerate(raw):
        PIL.Image.fromarray(np.concatenate([img, img[:, :6]], axis=1)).save(folder / f'{i}.png')  # 30x24
    kwargs = dict(resolution=16, corruption_probability=0.5, delta_probability=0.2, mask_full_rgb=True, xflip=True)
    ds = HFImageDataset(str(folder), **kwargs)
    clean = HFImageDataset(str(folder), mode='clean', **kwargs)
    assert len(ds) == 6
    for idx in range(3):
        image, _, mask, hat = ds[idx]
        x0, _, mask_c, _ = clean[idx]
        assert image.shape == (3, 16, 16)
        assert torch.equal(mask, mask_c) and torch.equal(image, x0 * mask)  # the item is A ⊙ x0
        assert (hat <= mask).all()
        assert torch.equal(ds[idx][0], image)  # same crop and A on every draw
        flipped, _, fmask, _ = ds[idx + 3]
        assert torch.equal(fmask, mask.flip(-1)) and torch.equal(flipped, image.flip(-1))
    with pytest.raises(DatasetError, match="no caption column 'text'"):
        HFImageDataset(str(folder), caption_column='text')
    with pytest.raises(DatasetError, match='cannot load dataset'):
        HFImageDataset(str(tmp_path / 'missing'))
