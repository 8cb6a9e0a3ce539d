"""Tests for training/digit_score.py: the classifier-feature Fréchet distance of the demo and science bench."""

import numpy as np
import pytest
import torch

from training import digit_score


def blobs(n, seed=0, classes=3, resolution=8):
    """Images of `classes` kinds: a bright square in a class-specific corner, plus noise; uint8 [N, 1, R, R]."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    images = torch.rand(n, 1, resolution, resolution, generator=g) * 40
    h = resolution // 2
    for i, c in enumerate(labels.tolist()):
        r, q = divmod(c, 2)
        images[i, 0, r * h:(r + 1) * h, q * h:(q + 1) * h] += 200
    return images.clamp(0, 255).to(torch.uint8), labels


@pytest.fixture(scope='module')
def classifier():
    images, labels = blobs(120)
    return digit_score.train_classifier(images, labels, epochs=8, batch=32, seed=0)


def test_classifier_learns_and_caches(tmp_path, classifier):
    images, labels = blobs(60, seed=1)
    assert digit_score.accuracy(classifier, images, labels) > 0.95
    path = tmp_path / 'clf.pt'
    first = digit_score.load_or_train_classifier(str(path), *blobs(120), epochs=8, batch=32)
    again = digit_score.load_or_train_classifier(str(path), images[:0], labels[:0])  # loads, does not train
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    torch.save(dict(format='something else'), path)
    with pytest.raises(ValueError, match='not a digit classifier'):
        digit_score.load_or_train_classifier(str(path), images, labels)


def test_frechet_matches_closed_form_for_gaussians():
    g = np.random.RandomState(0)
    a = torch.from_numpy(g.randn(20000, 3))
    b = torch.from_numpy(g.randn(20000, 3) * 2 + 1)
    # N(0, I) vs N(1, 4I): |μ|² = 3, Tr(I + 4I − 2·2I) = 3.
    assert digit_score.frechet(a, b) == pytest.approx(6.0, rel=0.03)
    assert digit_score.frechet(a, a) == pytest.approx(0.0, abs=1e-6)


def test_scores_separate_good_from_collapsed_samples(classifier):
    reference, _ = blobs(90, seed=2)
    good, _ = blobs(90, seed=3)
    collapsed = good[torch.arange(90) % 3 == 0].repeat(3, 1, 1, 1)  # one class only
    s_good = digit_score.score_images(classifier, good, reference)
    s_bad = digit_score.score_images(classifier, collapsed, reference)
    assert s_good['classes'] == 3 and s_bad['classes'] == 1
    assert s_good['fd'] < s_bad['fd'] and s_good['fd_pixel'] < s_bad['fd_pixel']
    assert sum(s_good['class_counts']) == 90 and 0 < s_good['confidence'] <= 1
    # uint8 and [-1, 1] float inputs are the same images.
    s_float = digit_score.score_images(classifier, digit_score.to_float(good), reference)
    assert s_float['fd'] == pytest.approx(s_good['fd'], rel=1e-5)
