"""Tests for training/metrics.py and eval.py (fid, ref): formulas against float64 references, detector
loading (TorchScript, restricted pickles), and the commands end to end with a tiny random detector."""

import json
import os
import pickle
import subprocess
import sys
import types
from collections import OrderedDict

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch
from click.testing import CliRunner

import dnnlib
import eval as eval_cmd
from conftest import REPO, random_images, write_edm_dataset
from fixtures import TinyDetector, save_tiny_detector
from torch_utils import distributed
from training import metrics

FEATURES = 16  # Small feature dimension: sqrtm of 2048x2048 takes ~30 s on one CPU core.


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        monkeypatch.delenv(name, raising=False)
    distributed.shutdown()
    yield
    distributed.shutdown()


@pytest.fixture
def detector_file(tmp_path):
    return save_tiny_detector(str(tmp_path / 'tiny.pt'), seed=3, feature_dim=FEATURES)


def _random_stats(rng, dim, shift=0.0):
    x = rng.normal(size=(4 * dim, dim)) @ rng.normal(size=(dim, dim)) + shift
    return x.mean(0), np.cov(x, rowvar=False)


def _fid_reference(mu1, s1, mu2, s2):
    """FID through the symmetric form: Tr sqrtm(S1 S2) = sum sqrt eig(S1^½ S2 S1^½)."""
    w, v = scipy.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = scipy.linalg.eigvalsh(root1 @ s2 @ root1)
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(eig, 0, None)))


def _inception_score_reference(probs, splits, clamp=0.0):
    """Salimans et al.'s IS loop (contiguous parts i*N//K .. (i+1)*N//K), in float64 numpy."""
    p = np.clip(probs.astype(np.float64), clamp, 1) if clamp > 0 else probs.astype(np.float64)
    n, scores = len(p), []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        py = part.mean(0, keepdims=True)
        with np.errstate(divide='ignore', invalid='ignore'):
            kl = np.where(part > 0, part * (np.log(part) - np.log(py)), 0.0)
        scores.append(np.exp(kl.sum(1).mean()))
    return np.mean(scores), np.std(scores)


# ---- formulas --------------------------------------------------------------------------------


def test_fid_matches_float64_reference():
    rng = np.random.default_rng(0)
    mu1, s1 = _random_stats(rng, 24)
    mu2, s2 = _random_stats(rng, 24, shift=0.5)
    fid = metrics.calculate_fid(mu1, s1, mu2, s2)
    assert fid == pytest.approx(_fid_reference(mu1, s1, mu2, s2), rel=1e-9)
    assert fid == pytest.approx(metrics.calculate_fid(mu2, s2, mu1, s1), rel=1e-9)  # symmetric
    assert abs(metrics.calculate_fid(mu1, s1, mu1, s1)) < 1e-9 * np.trace(s1)
    # Closed form for isotropic covariances: ‖Δμ‖² + D (√a − √b)².
    d, a, b = 10, 4.0, 9.0
    assert metrics.calculate_fid(np.zeros(d), a * np.eye(d), np.ones(d), b * np.eye(d)) == pytest.approx(d + d * (2 - 3) ** 2)
    with pytest.raises(ValueError, match='same detector'):
        metrics.calculate_fid(mu1, s1, mu1[:5], s1[:5, :5])


def test_unbiased_covariance_matches_numpy():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(50, 7)) * 3 + 100  # a large mean stresses the sum-of-outer-products form
    moments = metrics.FeatureMoments(7)
    for chunk in np.array_split(features, [3, 20, 21]):
        moments.add(torch.from_numpy(chunk).to(torch.float32))
    mu, sigma = moments.mean_cov()
    f32 = features.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(mu, f32.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f32, rowvar=False), rtol=1e-7, atol=1e-9)
    assert mu.dtype == sigma.dtype == np.float64
    mu2, sigma2 = metrics.feature_mean_cov(torch.from_numpy(f32))
    np.testing.assert_allclose(sigma2, np.cov(f32, rowvar=False), rtol=1e-7, atol=1e-9)
    with pytest.raises(ValueError, match='at least 2'):
        metrics.feature_mean_cov(torch.ones(1, 3))


def test_inception_score_closed_forms():
    assert metrics.calculate_inception_score(np.full((20, 1008), 1 / 1008), num_splits=1)[0] == pytest.approx(1.0)
    onehot = np.eye(8)  # 8 images, 8 distinct classes
    assert metrics.calculate_inception_score(onehot, num_splits=1) == pytest.approx((8.0, 0.0))
    # 10 splits of 10 images, each split holding all 10 classes once: every split scores 10.
    probs = np.tile(np.eye(10), (10, 1))
    assert metrics.calculate_inception_score(probs, num_splits=10) == pytest.approx((10.0, 0.0))
    # Clamping (the original's 1e-6) only perturbs the one-hot score slightly.
    clamped = metrics.calculate_inception_score(onehot, num_splits=1, clamp_min=metrics.ORIGINAL_IS_CLAMP)[0]
    assert clamped == pytest.approx(_inception_score_reference(onehot, 1, clamp=1e-6)[0], rel=1e-10)
    assert 7.9 < clamped < 8.0
    with pytest.raises(ValueError, match='num_splits=10'):
        metrics.calculate_inception_score(onehot, num_splits=10)


@pytest.mark.parametrize('n', [100, 103])
def test_inception_score_splits_match_reference(n):
    probs = np.random.default_rng(n).dirichlet(np.full(30, 0.3), size=n)
    mean, std = metrics.calculate_inception_score(probs, num_splits=10)
    ref_mean, ref_std = _inception_score_reference(probs, 10)
    assert (mean, std) == pytest.approx((ref_mean, ref_std), rel=1e-9)
    assert std > 0
    # Adding the same split statistics in shuffled batches (as ranks do) changes nothing.
    sums = metrics.InceptionScoreSums(n, 30, num_splits=10)
    order = np.random.default_rng(0).permutation(n)
    for chunk in np.array_split(order, 7):
        sums.add(torch.from_numpy(probs[chunk]), torch.from_numpy(chunk))
    np.testing.assert_allclose(sums.scores().mean(), ref_mean, rtol=1e-9)


def test_subset_indices():
    a = metrics.subset_indices(100, 10, seed=0)
    assert len(a) == 10 and len(set(a)) == 10 and np.all(np.diff(a) > 0)
    np.testing.assert_array_equal(a, metrics.subset_indices(100, 10, seed=0))
    assert not np.array_equal(a, metrics.subset_indices(100, 10, seed=1))
    np.testing.assert_array_equal(metrics.subset_indices(5, 10), np.arange(5))


# ---- detectors ---------------------------------------------------------------------------------


def test_tiny_detector_interface(tmp_path):
    rng_state = torch.get_rng_state()
    net = TinyDetector(seed=1, feature_dim=FEATURES)
    assert torch.equal(torch.get_rng_state(), rng_state)  # seeded privately
    images = torch.from_numpy(random_images(5, resolution=16)).permute(0, 3, 1, 2).contiguous()
    features = net(images, return_features=True)
    probs = net(images, no_output_bias=True)
    assert features.shape == (5, FEATURES) and probs.shape == (5, 1008)
    torch.testing.assert_close(probs.sum(1), torch.ones(5))
    assert not torch.allclose(probs, net(images))  # the output bias matters
    torch.testing.assert_close(features, TinyDetector(seed=1, feature_dim=FEATURES)(images, return_features=True))
    assert not torch.allclose(features, TinyDetector(seed=2, feature_dim=FEATURES)(images, return_features=True))

    detector = metrics.load_detector(save_tiny_detector(str(tmp_path / 'd.pt'), seed=1, feature_dim=FEATURES))
    torch.testing.assert_close(detector.features(images), features)
    torch.testing.assert_close(detector.probabilities(images), probs)
    gray = images[:, :1]
    torch.testing.assert_close(detector.features(gray), detector.features(gray.repeat(1, 3, 1, 1)))
    with pytest.raises(ValueError, match='uint8'):
        detector.features(images.float())


def test_detector_url_is_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    cached = dnnlib.util.url_cache_path(metrics.INCEPTION_URL)
    os.makedirs(os.path.dirname(cached))
    save_tiny_detector(cached, feature_dim=FEATURES)
    monkeypatch.setattr(dnnlib.util, '_download', lambda *a, **k: pytest.fail('must not download'))
    assert isinstance(metrics.load_detector(metrics.INCEPTION_URL), metrics.Detector)


def test_missing_detector_is_one_line(tmp_path, monkeypatch):
    missing = str(tmp_path / 'inception-2015-12-05.pkl')
    with pytest.raises(metrics.DetectorError) as info:
        metrics.load_detector(missing)
    message = str(info.value)
    assert '\n' not in message and missing in message and '--detector' in message and metrics.INCEPTION_URL in message

    def offline(url, dest, num_attempts, verbose):
        raise OSError('cannot connect')
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'empty-cache'))
    monkeypatch.setattr(dnnlib.util, '_download', offline)
    with pytest.raises(metrics.DetectorError) as info:
        metrics.load_detector(metrics.INCEPTION_URL)
    message = str(info.value)
    assert '\n' not in message and 'cannot connect' in message and '--detector' in message
    assert dnnlib.util.url_cache_path(metrics.INCEPTION_URL) in message


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_restricted_unpickler_refuses_arbitrary_globals(tmp_path):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pkl'
    path.write_bytes(pickle.dumps({'detector': _Evil(marker)}))
    with pytest.raises(metrics.DetectorError) as info:
        metrics.load_detector(str(path))
    assert 'system' in str(info.value) and '--allow_unsafe_pickle' in str(info.value)
    assert not marker.exists()


def _persistence_pickle(monkeypatch, module_src, class_name, state, protocol):
    """A pickle laid out like StyleGAN/EDM persistence: _reconstruct_persistent_obj(meta) with the class source."""
    fake = types.ModuleType('torch_utils.persistence')

    def _reconstruct_persistent_obj(meta):
        raise AssertionError('only used for pickling')
    _reconstruct_persistent_obj.__module__ = 'torch_utils.persistence'
    _reconstruct_persistent_obj.__qualname__ = '_reconstruct_persistent_obj'
    fake._reconstruct_persistent_obj = _reconstruct_persistent_obj
    monkeypatch.setitem(sys.modules, 'torch_utils.persistence', fake)
    meta = dict(type='class', version=6, module_src=module_src, class_name=class_name, state=state)

    class Persistent:
        def __reduce__(self):
            return _reconstruct_persistent_obj, (meta,)
    data = pickle.dumps(Persistent(), protocol=protocol)
    monkeypatch.delitem(sys.modules, 'torch_utils.persistence')
    return data


@pytest.mark.parametrize('protocol', [2, 4])
def test_persistence_pickle_with_torchscript_loads_without_running_code(tmp_path, monkeypatch, protocol):
    marker = tmp_path / 'source-ran'
    script = tmp_path / 'tiny.pt'
    save_tiny_detector(str(script), seed=4, feature_dim=FEATURES)
    src = f'import pathlib\npathlib.Path({str(marker)!r}).touch()\nclass InceptionWrapper: pass\n'
    state = dict(training=False, _parameters=OrderedDict(), _buffers=OrderedDict(scale=torch.ones(2)),
                 _modules=OrderedDict(), _non_persistent_buffers_set=set(), _init_kwargs=dnnlib.EasyDict(),
                 model_bytes=script.read_bytes())
    path = tmp_path / 'inception.pkl'
    path.write_bytes(_persistence_pickle(monkeypatch, src, 'InceptionWrapper', state, protocol))

    detector = metrics.load_detector(str(path))
    images = torch.from_numpy(random_images(3, resolution=16)).permute(0, 3, 1, 2)
    expected = TinyDetector(seed=4, feature_dim=FEATURES)(images, return_features=True)
    torch.testing.assert_close(detector(images, return_features=True), expected)
    assert not marker.exists()


_SOURCE_DETECTOR = '''
import pathlib
import torch
from torch_utils import persistence

pathlib.Path(MARKER).touch()

@persistence.persistent_class
class MeanColor(torch.nn.Module):
    def __setstate__(self, state):
        torch.nn.Module.__init__(self)
        self.register_buffer('weight', torch.tensor(state['weight'], dtype=torch.float32))

    def forward(self, images, return_features=False, no_output_bias=False):
        features = images.to(torch.float32).mean(dim=(2, 3)) @ self.weight
        return features if return_features else features.softmax(dim=1)
'''


def test_source_only_pickle_needs_allow_unsafe_pickle(tmp_path, monkeypatch):
    weight = np.random.default_rng(0).normal(size=(3, 5)).tolist()
    marker = tmp_path / 'source-ran'
    path = tmp_path / 'source.pkl'
    src = _SOURCE_DETECTOR.replace('MARKER', repr(str(marker)))
    path.write_bytes(_persistence_pickle(monkeypatch, src, 'MeanColor', dict(weight=weight), 4))
    with pytest.raises(metrics.DetectorError, match='allow_unsafe_pickle') as info:
        metrics.load_detector(str(path))
    assert '\n' not in str(info.value) and 'no TorchScript' in str(info.value)
    assert not marker.exists()
    detector = metrics.load_detector(str(path), allow_unsafe_pickle=True)
    assert marker.exists()  # the embedded source ran, as asked
    images = torch.from_numpy(random_images(2, resolution=8)).permute(0, 3, 1, 2)
    expected = images.float().mean((2, 3)) @ torch.tensor(weight, dtype=torch.float32)
    torch.testing.assert_close(detector.features(images), expected)


# ---- commands ----------------------------------------------------------------------------------


def _cli(args, ok=True):
    result = CliRunner().invoke(eval_cmd.cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    else:
        assert result.exit_code != 0, result.output
    return result


def _png_folder(path, images):
    os.makedirs(path, exist_ok=True)
    for i, image in enumerate(images):
        PIL.Image.fromarray(image).save(os.path.join(path, f'{i:06d}.png'))
    return str(path)


@pytest.fixture
def scored(tmp_path, detector_file):
    """A 24-image dataset zip, its reference statistics made with `ref`, and the images as a PNG folder."""
    images = random_images(24, channels=3, resolution=16, seed=7)
    data = write_edm_dataset(tmp_path / 'data.zip', images)
    stats = tmp_path / 'stats.npz'
    _cli(['ref', '--data', data, '--dest', stats, '--detector', detector_file, '--batch', 5, '--workers', 0])
    return images, str(stats), _png_folder(tmp_path / 'run' / 'images', images)


def test_ref_writes_edm_format(scored, detector_file):
    images, stats, _ = scored
    with np.load(stats) as f:
        assert sorted(f.files) == ['mu', 'sigma']
        mu, sigma = f['mu'], f['sigma']
    assert mu.dtype == sigma.dtype == np.float64 and mu.shape == (FEATURES,) and sigma.shape == (FEATURES, FEATURES)
    detector = metrics.load_detector(detector_file)
    features = detector.features(torch.from_numpy(images).permute(0, 3, 1, 2)).double().numpy()
    # The detector runs in float32 and its outputs depend slightly on the batch size (5 there, 24 here).
    np.testing.assert_allclose(mu, features.mean(0), rtol=1e-5)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-4, atol=1e-6 * np.abs(sigma).max())


def test_fid_of_the_same_images_is_zero_and_of_shifted_images_positive(tmp_path, scored, detector_file):
    images, stats, folder = scored
    result = _cli(['fid', '--images', folder, '--ref', stats, '--num', 24, '--detector', detector_file,
                   '--batch', 7, '--workers', 0])
    assert 'FID:' in result.output and 'single split' in result.output
    record = json.loads(open(tmp_path / 'run' / 'metrics.jsonl').read().splitlines()[-1])
    trace = np.trace(metrics.load_stats(stats)['sigma'])
    assert abs(record['fid']) < 1e-6 * trace
    assert record['num_images'] == 24 and record['is_num_splits'] == 10 and record['seed'] == 0
    assert record['images'] == os.path.abspath(folder) and 'timestamp' in record

    # IS over batches of 7 equals the formula applied to all probabilities at once (up to float32 noise).
    detector = metrics.load_detector(detector_file)
    probs = detector.probabilities(torch.from_numpy(images).permute(0, 3, 1, 2)).double().numpy()
    mean, std = _inception_score_reference(probs, 10)
    assert record['inception_score'] == pytest.approx(mean, rel=1e-6) and record['inception_score'] > 1.1
    assert record['inception_score_std'] == pytest.approx(std, rel=1e-3, abs=1e-6)
    assert record['inception_score_original'] == pytest.approx(_inception_score_reference(probs, 1, 1e-6)[0], rel=1e-6)

    shifted = _png_folder(tmp_path / 'shifted', (images // 2 + 100).astype(np.uint8))
    _cli(['fid', '--images', shifted, '--ref', stats, '--num', 24, '--detector', detector_file, '--workers', 0,
          '--outdir', tmp_path / 'out'])
    record = json.loads(open(tmp_path / 'out' / 'metrics.jsonl').read())
    assert record['fid'] > 1e-2 * trace


def test_fid_scores_a_seeded_subset(tmp_path, scored, detector_file):
    images, stats, folder = scored
    args = ['fid', '--images', folder, '--ref', stats, '--num', 12, '--detector', detector_file, '--workers', 0]
    _cli(args + ['--seed', 3])
    _cli(args + ['--seed', 3])
    _cli(args + ['--seed', 4])
    records = [json.loads(line) for line in open(tmp_path / 'run' / 'metrics.jsonl')]
    assert [r['num_images'] for r in records] == [12, 12, 12]
    assert records[0]['fid'] == records[1]['fid'] != records[2]['fid']
    subset = metrics.subset_indices(24, 12, seed=3)
    detector = metrics.load_detector(detector_file)
    features = detector.features(torch.from_numpy(images[subset]).permute(0, 3, 1, 2)).double().numpy()
    ref = metrics.load_stats(stats)
    expected = metrics.calculate_fid(features.mean(0), np.cov(features, rowvar=False), ref['mu'], ref['sigma'])
    assert records[0]['fid'] == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_fid_errors_are_one_line(tmp_path, scored, detector_file):
    _, stats, folder = scored
    base = ['fid', '--images', folder, '--workers', 0]
    result = _cli(base + ['--ref', stats, '--num', 100, '--detector', detector_file], ok=False)
    assert 'found 24 images' in result.output and '--num=100' in result.output
    missing = tmp_path / 'nowhere' / 'inception-2015-12-05.pkl'
    result = _cli(base + ['--ref', stats, '--num', 24, '--detector', missing], ok=False)
    errors = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert len(errors) == 1 and 'Traceback' not in result.output
    assert str(missing) in errors[0] and '--detector' in errors[0] and metrics.INCEPTION_URL in errors[0]
    result = _cli(base + ['--ref', tmp_path / 'nope.npz', '--num', 24, '--detector', detector_file], ok=False)
    assert 'reference statistics not found' in result.output and 'eval.py ref' in result.output
    np.savez(tmp_path / 'bad.npz', mean=np.zeros(3))
    result = _cli(base + ['--ref', tmp_path / 'bad.npz', '--num', 24, '--detector', detector_file], ok=False)
    assert "lack ['mu', 'sigma']" in result.output
    result = _cli(['fid', '--images', tmp_path / 'no-images', '--ref', stats, '--num', 24, '--detector', detector_file], ok=False)
    assert 'images not found' in result.output


def test_ref_of_grayscale_dataset_and_dry_run(tmp_path, image_zip, detector_file):
    path, images = image_zip
    dest = tmp_path / 'gray.npz'
    _cli(['ref', '--data', path, '--dest', dest, '--detector', detector_file, '--workers', 0, '--max_size', 6])
    assert metrics.load_stats(dest)['mu'].shape == (FEATURES,)
    result = _cli(['fid', '--images', path, '--ref', dest, '--dry-run'])
    assert json.loads(result.output)['num'] == 50000
    result = _cli(['ref', '--data', path, '--dest', dest, '--seed', 2], ok=False)
    assert '--max_size' in result.output


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, detector_file):
    """torchrun with 2 gloo processes (23 images: ranks hold 12 and 11) gives the 1-process statistics.

    Batches of 1 make every image's float32 features independent of how images are grouped, so only the
    float64 summation order differs between the runs.
    """
    images = random_images(23, channels=3, resolution=16, seed=11)
    data = write_edm_dataset(tmp_path / 'data.zip', images)
    folder = _png_folder(tmp_path / 'gen' / 'images', (255 - images).astype(np.uint8))
    common = ['--detector', detector_file, '--batch', 1, '--workers', 0]
    commands = {n: (['ref', '--data', data, '--dest', tmp_path / f'stats{n}.npz'],
                    ['fid', '--images', folder, '--ref', tmp_path / 'stats1.npz', '--num_images', 23, '--outdir', tmp_path / f'm{n}'])
                for n in (1, 2)}
    for args in commands[1]:
        _cli(args + common)
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'eval.py']
    for args in commands[2]:
        result = subprocess.run(launcher + [str(a) for a in args + common], cwd=REPO, text=True, capture_output=True,
                                env=dict(os.environ, OMP_NUM_THREADS='1'))
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]  # the workers' errors, if it fails
    one, two = metrics.load_stats(tmp_path / 'stats1.npz'), metrics.load_stats(tmp_path / 'stats2.npz')
    np.testing.assert_allclose(one['mu'], two['mu'], rtol=1e-10)
    np.testing.assert_allclose(one['sigma'], two['sigma'], rtol=1e-8, atol=1e-12)
    r1, r2 = (json.loads(open(tmp_path / f'm{n}' / 'metrics.jsonl').read()) for n in (1, 2))
    assert r2['world_size'] == 2 and r2['num_images'] == 23
    for key in ('fid', 'inception_score', 'inception_score_std', 'inception_score_original'):
        assert r1[key] == pytest.approx(r2[key], rel=1e-8), key
