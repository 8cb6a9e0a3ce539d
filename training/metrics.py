"""Fréchet Inception Distance and Inception Score of uint8 images (library; `eval.py` is the command).

Definitions: FID (Heusel et al. 2017) = ‖μ − μr‖² + Tr(Σ + Σr − 2 (Σ Σr)^½) on 2048-d Inception-v3 pool
features, with μ and the unbiased Σ in float64, exactly as EDM's `fid.py` computes them, so its published
reference statistics (`.npz` with `mu`, `sigma`) are interchangeable with ours. IS (Salimans et al. 2016)
= exp(E_x KL(p(y|x) ‖ p(y))) from the detector's softmax without the output bias, as a mean ± std over
10 splits, and also as the original ambient-diffusion eval.py reports it (one split, probabilities
clamped to >= 1e-6).

The detector is NVIDIA's `inception-2015-12-05.pkl` (StyleGAN3/EDM) or any TorchScript module with its
calling convention: `detector(images_uint8 [N, 3, H, W], return_features=True)` -> [N, 2048] and
`detector(images_uint8, no_output_bias=True)` -> softmax probabilities [N, 1008]; it resizes internally.

Multi-process: each rank takes every W-th image, and only sums (of features, outer products and the
IS split statistics) cross processes, so ranks may hold different numbers of images.
"""

import io
import math
import os
import warnings
import zipfile

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
import tqdm

import dnnlib
from torch_utils import distributed as dist
from torch_utils import pickles
from torch_utils.images import to_uint8
from torch_utils.ambient_diffusion import gaussian_kernel

INCEPTION_URL = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl'
ORIGINAL_IS_CLAMP = 1e-6  # The original eval.py clamps probabilities to [1e-6, 1] before its single-split IS.

# ----------------------------------------------------------------------------
# Detector loading.


class DetectorError(ValueError):
    """A detector that cannot be loaded (safely); the one-line message names the file and the fix."""


def _missing_detector(what):
    return DetectorError(f'Inception detector {what}; download {INCEPTION_URL} and pass its path with '
                         f'--detector=PATH (or copy it to {dnnlib.util.url_cache_path(INCEPTION_URL)})')


def _jit_load(data):
    # torch.jit is deprecated upstream, but the published detector is TorchScript: keep it quiet.
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', category=DeprecationWarning, message=r'.*torch\.jit')
        return torch.jit.load(io.BytesIO(data), map_location='cpu')


def _is_torchscript_archive(data):
    """True for the bytes of a `torch.jit.save` zip (a `torch.save` zip has no code/ or constants.pkl)."""
    if not isinstance(data, (bytes, bytearray)) or not data.startswith(b'PK\x03\x04'):
        return False
    try:
        names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    except zipfile.BadZipFile:
        return False
    return any(name.endswith('/constants.pkl') or '/code/' in name for name in names)


def _find_torchscript(obj, found, calls, seen):
    """Collect TorchScript archives (bytes) anywhere in an object built by `pickles.restricted_load`,
    and the names of the code the pickle would have called (`calls`)."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, (bytes, bytearray)):
        if _is_torchscript_archive(obj):
            found.append(bytes(obj))
    elif isinstance(obj, pickles.PickledObject):
        calls.add(obj.pickled_global)
        for part in (obj.pickled_args, obj.pickled_kwargs, obj.pickled_state, obj.pickled_items):
            _find_torchscript(part, found, calls, seen)
    elif isinstance(obj, dict):
        for value in obj.values():
            _find_torchscript(value, found, calls, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for value in obj:
            _find_torchscript(value, found, calls, seen)


def _load_pickled_torchscript(data, path):
    """The TorchScript module embedded in a pickle, found without running any code, or None."""
    try:
        obj = pickles.restricted_load(io.BytesIO(data))
    except Exception as err:  # Truncated or corrupt data, or a layout the restricted reader cannot rebuild.
        raise DetectorError(f'{path} is not a readable pickle ({type(err).__name__}: {err})') from None
    found, calls = [], set()
    _find_torchscript(obj, found, calls, set())
    if len(found) > 1:
        raise DetectorError(f'{path} holds {len(found)} TorchScript archives; cannot tell which one is the detector')
    if found:
        return _jit_load(found[0]), None
    return None, 'it holds no TorchScript archive' + (f' and would call {", ".join(sorted(calls))}' if calls else '')


def load_detector(path_or_url=INCEPTION_URL, device=None, allow_unsafe_pickle=False):
    """Load a feature detector as a `Detector`: a TorchScript file, or NVIDIA's `inception-2015-12-05.pkl`.

    URLs are fetched once into the dnnlib cache (`$DNNLIB_CACHE_DIR/downloads`), so a copy placed there by
    hand works offline. A pickle is first read with a restricted unpickler that runs no code: if it holds a
    TorchScript archive (bytes) anywhere in its (persistence) state, that archive is the detector. Otherwise
    loading needs `allow_unsafe_pickle=True`, which executes the source code the pickle embeds.

    What was verified: TorchScript files, and pickles built by our tests with the persistence layout
    (a `_reconstruct_persistent_obj(meta)` call whose state holds TorchScript bytes). The real NVIDIA file
    could not be downloaded here; that its wrapper stores the TorchScript archive as bytes in its state
    is our understanding of it, not a checked fact. If it does not, the error says to pass
    `allow_unsafe_pickle=True`. `device=None` means CPU.
    """
    name = os.fspath(path_or_url)
    if dnnlib.util.is_url(name):
        try:
            local = dnnlib.util.open_url(name, return_filename=True)
        except OSError as err:
            raise _missing_detector(f'is not available ({str(err).split(";")[0]})') from None
    else:
        if not os.path.isfile(name):
            raise _missing_detector(f'not found: {name}')
        local = name
    with open(local, 'rb') as f:
        data = f.read()

    if _is_torchscript_archive(data):
        net = _jit_load(data)
    elif data[:1] == b'\x80':  # pickle protocol >= 2
        net, reason = _load_pickled_torchscript(data, name)
        if net is None:
            if not allow_unsafe_pickle:
                raise DetectorError(f'{name} cannot be loaded without running the code it contains ({reason}); '
                                    'if you trust the file, pass --allow_unsafe_pickle (allow_unsafe_pickle=True)')
            net = pickles.unsafe_load(io.BytesIO(data), name)
    else:
        raise DetectorError(f'{name} is neither a TorchScript archive nor a pickle; pass the Inception detector '
                            f'({INCEPTION_URL}) with --detector=PATH')
    if not isinstance(net, torch.nn.Module):
        raise DetectorError(f'{name} holds a {type(net).__name__}, not a torch module; pass the Inception detector with --detector=PATH')
    return Detector(net, name=name).to(torch.device('cpu') if device is None else device)


class Detector(torch.nn.Module):
    """A loaded detector with checked outputs; calling it forwards to the wrapped module unchanged."""

    def __init__(self, net, name='detector'):
        super().__init__()
        self.net = net.eval()
        for param in net.parameters():  # ScriptModules lack requires_grad_(); features are no_grad anyway.
            param.requires_grad_(False)
        self.name = name

    def forward(self, images, return_features=False, no_output_bias=False):
        kwargs = {}
        if return_features:
            kwargs['return_features'] = True
        if no_output_bias:
            kwargs['no_output_bias'] = True
        return self.net(images, **kwargs)

    @staticmethod
    def _rgb_uint8(images):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f'the detector takes uint8 images [N, 1 or 3, H, W], got {images.dtype} '
                             f'{tuple(images.shape)}; load images with normalize=False')
        return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images  # grayscale -> RGB

    @torch.no_grad()
    def features(self, images):
        """Pool features [N, D] (D = 2048 for Inception-v3) of uint8 images [N, C, H, W]."""
        images = self._rgb_uint8(images)
        out = self(images, return_features=True)
        if out.ndim != 2 or out.shape[0] != images.shape[0]:
            raise DetectorError(f'{self.name} returned {tuple(out.shape)} for return_features=True on '
                                f'{images.shape[0]} images; expected [N, feature_dim]')
        return out

    @torch.no_grad()
    def probabilities(self, images):
        """Class probabilities [N, K] (K = 1008 for Inception-v3): softmax of the logits without output bias."""
        images = self._rgb_uint8(images)
        out = self(images, no_output_bias=True)
        if out.ndim != 2 or out.shape[0] != images.shape[0]:
            raise DetectorError(f'{self.name} returned {tuple(out.shape)} for no_output_bias=True; expected [N, classes]')
        if out.min() < 0 or (out.sum(1, dtype=torch.float64) - 1).abs().max() > 1e-3:
            raise DetectorError(f'{self.name} does not return softmax probabilities for no_output_bias=True '
                                '(rows must be >= 0 and sum to 1)')
        return out


# ----------------------------------------------------------------------------
# Statistics (sums that can be all-reduced).


class FeatureMoments:
    """Running float64 sums of features and their outer products -> mean and unbiased covariance."""

    def __init__(self, dim, device=None):
        self.count = torch.zeros([], dtype=torch.float64, device=device)
        self.sum = torch.zeros([dim], dtype=torch.float64, device=device)
        self.outer = torch.zeros([dim, dim], dtype=torch.float64, device=device)

    def add(self, features):  # features: [N, dim]
        f = features.to(self.sum.device, torch.float64)
        self.count += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.t() @ f

    def all_reduce(self):
        for t in (self.count, self.sum, self.outer):
            dist.all_reduce_sum(t)
        return self

    def mean_cov(self):
        """(μ [D], Σ [D, D]) as float64 numpy; Σ = (Σ f fᵀ − N μ μᵀ) / (N − 1)."""
        n = float(self.count)
        if n < 2:
            raise ValueError(f'the covariance needs at least 2 images, got {int(n)}')
        mu = self.sum / n
        sigma = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def feature_mean_cov(features):
    """Mean and unbiased covariance (float64 numpy) of features [N, D]."""
    features = torch.as_tensor(features)
    moments = FeatureMoments(features.shape[1])
    moments.add(features)
    return moments.mean_cov()


class InceptionScoreSums:
    """Per-split sufficient statistics of the Inception Score (Salimans et al. 2016).

    Image i (global index) falls in split s when s·N//K <= i < (s+1)·N//K (contiguous splits, as in the
    original TF code). With m = (Σ_i p_i)/n over a split, mean_i KL(p_i ‖ m) = (Σ_i Σ_y p_iy log p_iy −
    Σ_y (Σ_i p_iy) log m_y) / n, so the sums Σ_i p_i and Σ_i Σ_y p log p are all that crosses processes.
    `clamp_min` > 0 clamps probabilities first (the original eval.py used 1e-6); 0 uses 0·log 0 = 0.
    """

    def __init__(self, num_images, num_classes, num_splits=10, clamp_min=0.0, device=None):
        if not 1 <= num_splits <= num_images:
            raise ValueError(f'num_splits={num_splits} must be between 1 and the number of images ({num_images})')
        self.num_images = num_images
        self.clamp_min = clamp_min
        self.bounds = torch.tensor([s * num_images // num_splits for s in range(num_splits + 1)], device=device)
        self.count = torch.zeros([num_splits], dtype=torch.float64, device=device)
        self.plogp = torch.zeros([num_splits], dtype=torch.float64, device=device)
        self.colsum = torch.zeros([num_splits, num_classes], dtype=torch.float64, device=device)

    def add(self, probs, indices):  # probs: [B, K]; indices: [B] global image indices
        p = probs.to(self.colsum.device, torch.float64)
        if self.clamp_min > 0:
            p = p.clamp(self.clamp_min, 1)
        indices = torch.as_tensor(indices, device=self.colsum.device)
        if indices.min() < 0 or indices.max() >= self.num_images:
            raise ValueError(f'image indices must lie in [0, {self.num_images}), got {indices.min()}..{indices.max()}')
        split = torch.searchsorted(self.bounds, indices, right=True) - 1
        self.count.index_add_(0, split, torch.ones_like(split, dtype=torch.float64))
        self.plogp.index_add_(0, split, torch.special.xlogy(p, p).sum(1))
        self.colsum.index_add_(0, split, p)

    def all_reduce(self):
        for t in (self.count, self.plogp, self.colsum):
            dist.all_reduce_sum(t)
        return self

    def scores(self):
        """IS of each split, float64 numpy [K]."""
        n = self.count[:, None]
        mean_kl = (self.plogp - torch.special.xlogy(self.colsum, self.colsum / n).sum(1)) / self.count
        return mean_kl.exp().cpu().numpy()


def calculate_inception_score(probs, num_splits=10, clamp_min=0.0):
    """(mean, std) over `num_splits` contiguous splits of exp(E KL(p(y|x) ‖ p(y))); probs [N, K].

    `num_splits=1, clamp_min=ORIGINAL_IS_CLAMP` is the original ambient-diffusion number (std 0).
    """
    probs = torch.as_tensor(probs)
    sums = InceptionScoreSums(probs.shape[0], probs.shape[1], num_splits=num_splits, clamp_min=clamp_min)
    sums.add(probs, torch.arange(probs.shape[0]))
    scores = sums.scores()
    return float(np.mean(scores)), float(np.std(scores))


def calculate_fid(mu, sigma, mu_ref, sigma_ref):
    """FID = ‖μ − μr‖² + Tr(Σ + Σr − 2 sqrtm(Σ Σr)) (Heusel et al. 2017), in float64.

    Uses `scipy.linalg.sqrtm` and its real part, as EDM's fid.py does. If the square root is not finite
    (nearly singular product), it is retried with 1e-6 added to both diagonals, the usual remedy.
    """
    mu, mu_ref = np.asarray(mu, np.float64), np.asarray(mu_ref, np.float64)
    sigma, sigma_ref = np.asarray(sigma, np.float64), np.asarray(sigma_ref, np.float64)
    if mu.shape != mu_ref.shape or sigma.shape != sigma_ref.shape or sigma.shape != mu.shape * 2:
        raise ValueError(f'statistics do not match: mu {mu.shape}, sigma {sigma.shape} vs reference mu '
                         f'{mu_ref.shape}, sigma {sigma_ref.shape}; were they made with the same detector?')
    root = scipy.linalg.sqrtm(sigma @ sigma_ref)
    if not np.isfinite(root).all():
        offset = np.eye(sigma.shape[0]) * 1e-6
        root = scipy.linalg.sqrtm((sigma + offset) @ (sigma_ref + offset))
    m = np.square(mu - mu_ref).sum()
    return float(m + np.trace(sigma + sigma_ref - 2 * np.real(root)))


# ----------------------------------------------------------------------------
# Reference statistics files (EDM's format).


def load_stats(path_or_url):
    """Reference statistics {'mu': float64 [D], 'sigma': float64 [D, D]} from an EDM-format `.npz` (path or URL)."""
    name = os.fspath(path_or_url)
    hint = f'make them with `python eval.py ref --data=DATASET --dest={name}`'
    try:
        with dnnlib.util.open_url(name) as f:
            loaded = np.load(f)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise ValueError('not an .npz archive')
            data = dict(loaded)
    except FileNotFoundError:
        raise FileNotFoundError(f'reference statistics not found: {name} ({hint})') from None
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f'cannot read reference statistics {name}: {str(err).splitlines()[0]} ({hint})') from None
    missing = [key for key in ('mu', 'sigma') if key not in data]
    if missing:
        raise ValueError(f'reference statistics {name} lack {missing} (keys: {sorted(data)}); {hint}')
    mu, sigma = data['mu'].astype(np.float64), data['sigma'].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != mu.shape * 2:
        raise ValueError(f'reference statistics {name} have mu {mu.shape} and sigma {sigma.shape}; expected [D] and [D, D]')
    return dict(mu=mu, sigma=sigma)


def save_stats(path, mu, sigma):
    """Write `mu`, `sigma` (float64) to an `.npz` as EDM's `fid.py ref` does, atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with dnnlib.util.atomic_write(path, 'wb') as f:
        np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
    return path


# ----------------------------------------------------------------------------
# Images -> statistics.


def subset_indices(num_available, num=None, seed=0):
    """Sorted indices of a seeded random subset of `num` images (all when `num` is None or >= available).

    Same rule as EDM's dataset `max_size` (shuffle with np.random.RandomState(seed), keep the first `num`),
    so the subset of a folder matches the one EDM's fid.py scores.
    """
    indices = np.arange(num_available, dtype=np.int64)
    if num is not None and num < num_available:
        np.random.RandomState(seed % (1 << 31)).shuffle(indices)
        indices = np.sort(indices[:num])
    return indices


class _IndexedImages(torch.utils.data.Dataset):
    """(position in the subset, uint8 image [C, H, W]) for a dataset yielding an image or (image, ...)."""

    def __init__(self, dataset, indices):
        self.dataset = dataset
        self.indices = indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, pos):
        item = self.dataset[int(self.indices[pos])]
        image = torch.as_tensor(item[0] if isinstance(item, (tuple, list)) else item)
        return pos, image


def open_image_dataset(path):
    """A folder (recursive) or zip of images as uint8 [C, H, W] items, all pixels (`mode='clean'`)."""
    from training.dataset import ImageFolderDataset  # Imported here: only path inputs need it.

    if not os.path.exists(path):
        raise FileNotFoundError(f'images not found: {path}')
    return ImageFolderDataset(path, mode='clean', normalize=False)


def compute_feature_stats(batches, detector, num_images, device=None, compute_is=True, num_splits=10,
                          progress=False, total=None):
    """Sums over this rank's batches, all-reduced: FID moments and (optionally) IS split statistics.

    `batches` yields (global indices [B], uint8 images [B, C, H, W]); `num_images` is the total over all
    ranks (it defines the IS splits). Returns an EasyDict with mu, sigma, num_images and, with `compute_is`,
    inception_score / inception_score_std (`num_splits` splits) and inception_score_original (one split,
    clamped like the original).
    """
    device = torch.device('cpu') if device is None else torch.device(device)
    moments, splits, single = None, None, None
    for indices, images in tqdm.tqdm(batches, total=total, disable=not progress or dist.get_rank() != 0,
                                     unit='batch', desc='Inception features'):
        images = images.to(device)
        features = detector.features(images)
        if moments is None:
            moments = FeatureMoments(features.shape[1], device=device)
        moments.add(features)
        if compute_is:
            probs = detector.probabilities(images)
            if splits is None:
                splits = InceptionScoreSums(num_images, probs.shape[1], num_splits=num_splits, device=device)
                single = InceptionScoreSums(num_images, probs.shape[1], num_splits=1, clamp_min=ORIGINAL_IS_CLAMP, device=device)
            splits.add(probs, indices)
            single.add(probs, indices)
    # A rank without images still joins the all-reduce with zeros of the right size.
    feature_dim, num_classes = dist.broadcast_object(
        (moments.sum.shape[0] if moments else None, splits.colsum.shape[1] if splits else None), src=0)
    if feature_dim is None:
        raise ValueError('no images to compute statistics of')
    moments = moments or FeatureMoments(feature_dim, device=device)
    mu, sigma = moments.all_reduce().mean_cov()
    result = dnnlib.EasyDict(mu=mu, sigma=sigma, num_images=int(moments.count))
    if compute_is:
        splits = splits or InceptionScoreSums(num_images, num_classes, num_splits=num_splits, device=device)
        single = single or InceptionScoreSums(num_images, num_classes, num_splits=1, clamp_min=ORIGINAL_IS_CLAMP, device=device)
        scores = splits.all_reduce().scores()
        result.update(inception_score=float(np.mean(scores)), inception_score_std=float(np.std(scores)),
                      inception_score_original=float(single.all_reduce().scores()[0]), is_num_splits=num_splits)
    return result


def calculate_inception_stats(source, detector, num_expected=None, max_size=None, seed=0, max_batch_size=64,
                              device=None, compute_is=True, num_splits=10, num_workers=0, progress=True):
    """FID statistics (and IS) of the images in `source`: a folder/zip path, or a dataset of uint8 images.

    `num_expected`: score a seeded random subset of exactly that many images (error if fewer exist, as in
    EDM's fid.py). `max_size`: at most that many (no error). Rank r of W takes subset positions r, r+W, ...
    in batches of up to `max_batch_size`. IS uses min(num_splits, number of images) splits.
    """
    dataset = open_image_dataset(source) if isinstance(source, (str, os.PathLike)) else source
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__
    num_available = len(dataset)
    if num_expected is not None and num_available < num_expected:
        raise ValueError(f'found {num_available} images in {name}, but --num={num_expected} were asked for; '
                         'generate more images or lower --num')
    num = min(n for n in (num_expected, max_size, num_available) if n is not None)
    indices = subset_indices(num_available, num, seed)
    if len(indices) < 2:
        raise ValueError(f'{name} has {len(indices)} image(s); FID statistics need at least 2')

    rank, world_size = dist.get_rank(), dist.get_world_size()
    mine = np.arange(rank, len(indices), world_size)
    batches = [mine[i:i + max_batch_size].tolist() for i in range(0, len(mine), max_batch_size)]
    loader = torch.utils.data.DataLoader(_IndexedImages(dataset, indices), batch_sampler=batches,
                                         num_workers=num_workers)
    return compute_feature_stats(loader, detector, num_images=len(indices), device=device, compute_is=compute_is,
                                 num_splits=min(num_splits, len(indices)), progress=progress, total=len(batches))


# ---------------------------------------------------------------------------------------------
# Reconstruction quality (inverse problems, super-resolution).

def psnr(x, y):
    """PSNR = 10·log10(1/MSE) per image of x, y [N, C, H, W] in [0, 1] (float64 [N]; inf where x = y)."""
    mse = (x.double() - y.double()).square().flatten(1).mean(dim=1)
    return 10 * torch.log10(1 / mse)


def ssim(x, y, window_size=11, window_std=1.5, K1=0.01, K2=0.03):
    """SSIM (Wang et al. 2004) per image of x, y [N, C, H, W] in [0, 1]: float64 [N].

    Gaussian-weighted local statistics (window `window_size`, std `window_std`) over the valid region (no
    padding), C1 = (K1·L)², C2 = (K2·L)² with L = 1, the SSIM map averaged over pixels and channels. Images
    smaller than the window use a window of their smaller side (rounded down to odd).
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f'ssim needs two batches of the same shape [N, C, H, W], got {tuple(x.shape)} and {tuple(y.shape)}')
    x, y = x.double(), y.double()
    n, c, h, w = x.shape
    size = min(window_size, h, w)
    size -= 1 - size % 2
    window = gaussian_kernel(size, window_std, dtype=torch.float64).to(x.device).expand(c, 1, size, size)  # [C, 1, k, k]

    def local_mean(z):
        return F.conv2d(z, window, groups=c)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x ** 2
    var_y = local_mean(y * y) - mu_y ** 2
    cov = local_mean(x * y) - mu_x * mu_y
    C1, C2 = K1 ** 2, K2 ** 2
    s = ((2 * mu_x * mu_y + C1) * (2 * cov + C2)) / ((mu_x ** 2 + mu_y ** 2 + C1) * (var_x + var_y + C2))
    return s.flatten(1).mean(dim=1)


def as_saved_unit(images):
    """[N, C, H, W] in [−1, 1] -> the images as saved (uint8) in float64 [0, 1], so scores match the PNGs."""
    return torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).double() / 255


PSNR_CAP = 20 * math.log10(255)  # 48.13 dB: the PSNR of 8-bit images one level apart at every pixel


def mean_psnr(values):
    """Mean of per-image PSNRs with each capped at PSNR_CAP: an image reproduced exactly (MSE 0 after 8-bit
    saving, PSNR inf) counts as 48.13 dB instead of making the mean infinite."""
    return float(np.mean(np.minimum(np.asarray(values, dtype=np.float64), PSNR_CAP)))
