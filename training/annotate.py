"""Noise-level annotations of low-quality images (Ambient Omni, Daras et al. 2025, Sec. 3; ambient-utils
`classifier.py`).

A corrupted image (blurred, masked, JPEG-compressed, ...) and a clean one look alike once enough Gaussian noise
is added to both. A noise-conditioned classifier c(x_σ, σ) = P(corrupted | x_σ), trained on trusted clean images
(label 0) and corrupted ones (label 1) with σ log-uniform over a range and x_σ = x + σ·n, says from which σ on
an image can no longer be told apart: its annotation σ_min (SPEC §3: 'corrupted' images are trusted above σ_min
once fixed noise of that std is added) is the smallest σ of a grid at which the image's P(corrupted), averaged
over a few seeded noise draws, is within ε of chance, |P − 0.5| ≤ ε; the largest grid σ when it never is.

Differences from ambient-utils: its rule is one-sided (first t with P < 0.5 + ε), so an image the classifier
confidently calls clean is trusted everywhere; ours asks for chance itself, which is never less conservative.
Its trajectories use one noise draw per t and leave the model in training mode; ours average `num_draws` seeded
draws in eval mode, so an annotation does not depend on the batch. Its JPEG round trip leaks temp files; ours
stays in memory.

Pieces: `parse_corruption` and `corrupt_images` (noise, blur, mask, jpeg; deterministic per image seed),
`NoiseConditionedClassifier` and `train_classifier`, `classifier_trajectories`, `first_confusion`,
`accuracy_vs_sigma`, and `annotate_dataset`, the whole `annotate.py` command (load, corrupt, train, annotate,
write the dataset folder and the report). Every draw comes from an explicit generator; tensors are drawn on
the CPU and moved to the compute device, so results do not depend on it beyond float rounding.
"""

import io
import json
import math
import os
import shutil

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
import tqdm

from dnnlib.util import atomic_write
from torch_utils import distributed as dist
from torch_utils.ambient_diffusion import GaussianBlur, MaskCorruption
from torch_utils.images import to_uint8
from torch_utils.misc import randn, seed_hash, seeded_generator
from training.dataset import ImageFolderDataset

# What a corruption level means and its admissible range (lowest, highest, whether the ends are included).
CORRUPTIONS = {
    'noise': ('Gaussian noise std (images in [-1, 1])', 0, 100, (False, True)),
    'blur': ('Gaussian blur std in pixels', 0, 64, (False, True)),
    'mask': ('fraction of pixels zeroed', 0, 1, (False, False)),
    'jpeg': ('JPEG quality (an integer)', 1, 100, (True, True)),
}
SIGMA_DATA = 0.5  # EDM's σ_d: the classifier's input scaling c_in = 1 / sqrt(σ² + σ_d²).

# Tags that keep the seed streams apart: corruption noise and masks, the clean share, the held-out split,
# classifier initialisation, classifier training, trajectory noise.
_TAG_CORRUPT, _TAG_SPLIT, _TAG_HOLDOUT, _TAG_INIT, _TAG_TRAIN, _TAG_TRAJ = 0xA1, 0xA2, 0xA3, 0xA4, 0xA5, 0xA6

def as_float(images):
    """uint8 images -> float32 in [-1, 1]; float images pass through (as float32)."""
    return images.to(torch.float32) / 127.5 - 1 if images.dtype == torch.uint8 else images.to(torch.float32)


# ----------------------------------------------------------------------------
# Corruptions (ambient-utils `noise.py`, reimplemented batch-wide, per-image seeds, in memory).


def check_corruption(kind, level):
    """`level` as the corruption needs it (an int for jpeg), or a ValueError saying the admissible range."""
    if kind not in CORRUPTIONS:
        raise ValueError(f'corruption {kind!r} is unknown; use one of {", ".join(CORRUPTIONS)}')
    what, lo, hi, (lo_in, hi_in) = CORRUPTIONS[kind]
    ok = isinstance(level, (int, float)) and not isinstance(level, bool) and math.isfinite(level)
    ok = ok and (lo <= level if lo_in else lo < level) and (level <= hi if hi_in else level < hi)
    if kind == 'jpeg':
        ok = ok and float(level).is_integer()
    if not ok:
        interval = f'{"[" if lo_in else "("}{lo:g}, {hi:g}{"]" if hi_in else ")"}'
        raise ValueError(f'{kind} level {level!r} is out of range: the {what} must lie in {interval}')
    return int(level) if kind == 'jpeg' else float(level)


def parse_corruption(spec):
    """'KIND:LEVEL' (e.g. 'blur:1.5', 'jpeg:10') -> (kind, level), or a one-line ValueError."""
    kind, sep, level = str(spec).partition(':')
    if not sep or kind not in CORRUPTIONS or not level.strip():
        raise ValueError(f'{spec!r} is not KIND:LEVEL with KIND one of {", ".join(CORRUPTIONS)} (e.g. blur:1.5)')
    try:
        value = float(level)
    except ValueError:
        raise ValueError(f'the level {level!r} of {spec!r} is not a number') from None
    return kind, check_corruption(kind, value)


def blur_kernel_size(std, height, width):
    """scipy.ndimage.gaussian_filter's window, 2·int(4σ + 0.5) + 1, cut to what reflect padding allows."""
    return min(2 * int(4 * std + 0.5) + 1, 2 * min(height, width) - 1)


def jpeg_round_trip(images, quality):
    """Images [N, C, H, W] in [-1, 1] -> their JPEG-compressed versions (PIL, in memory), same shape and device."""
    out = []
    for image in to_uint8(images):                                                      # [H, W, C] uint8
        gray = image.shape[2] == 1
        buf = io.BytesIO()
        PIL.Image.fromarray(image[:, :, 0] if gray else image).save(buf, format='jpeg', quality=int(quality))
        buf.seek(0)
        with PIL.Image.open(buf) as decoded:
            out.append(np.asarray(decoded.convert('L' if gray else 'RGB')).reshape(image.shape))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(images.device, torch.float32) / 127.5 - 1


def corrupt_images(images, kind, level, seeds):
    """Low-quality versions of clean images [N, C, H, W] (float, [-1, 1], any device); image i's randomness
    comes from `seeds[i]` alone, so it does not depend on the batch.

    noise: x + level·n (not clipped; see `annotate_dataset` for what PNG storage does to it); blur: Gaussian blur
    of std `level` pixels (`torch_utils.ambient_diffusion.GaussianBlur`, reflect padding); mask: a `dust`
    `MaskCorruption` with p = level shared over channels, hidden pixels set to 0 (A ⊙ x); jpeg: a PIL round trip
    at quality `level`.
    """
    level = check_corruption(kind, level)
    if len(seeds) != images.shape[0]:
        raise ValueError(f'{len(seeds)} seeds for {images.shape[0]} images; pass one seed per image')
    x = images.to(torch.float32)
    generators = [seeded_generator(_TAG_CORRUPT, seed) for seed in seeds]
    if kind == 'noise':
        return x + level * randn(x.shape, generators, x.device)
    if kind == 'blur':
        return GaussianBlur(blur_kernel_size(level, *x.shape[-2:]), level).corrupt(x)[0]
    if kind == 'mask':
        A = MaskCorruption('dust', level, mask_full_rgb=True).sample_mask(x.shape, generator=generators, device=x.device)
        return x * A
    return jpeg_round_trip(x, level)

# ----------------------------------------------------------------------------
# The noise-conditioned classifier.


class NoiseConditionedClassifier(torch.nn.Module):
    """c(x_σ, σ): the logit of P(corrupted | x_σ) (Ambient Omni, Sec. 3).

    EDM's c_in = 1/sqrt(σ² + σ_d²) keeps the input near unit variance at every σ, and c_noise = ln(σ)/4 enters
    twice: as an extra input channel and through FiLM (a per-channel scale and shift of every conv block, zero at
    initialisation). Four 3x3 conv blocks, two 2x average poolings, global average pooling, a linear logit.
    """

    def __init__(self, in_channels=1, width=32, emb_dim=64, generator=None):
        super().__init__()
        self.config = dict(in_channels=in_channels, width=width, emb_dim=emb_dim)
        widths = [width, width, 2 * width, 2 * width]
        self.pool_after = (False, True, True, False)
        with torch.random.fork_rng(devices=[]):  # torch's default init draws from the global RNG: leave it as it was
            self.convs = torch.nn.ModuleList(torch.nn.Conv2d(c_in, c_out, 3, padding=1)
                                             for c_in, c_out in zip([in_channels + 1] + widths[:-1], widths))
            self.emb = torch.nn.Sequential(torch.nn.Linear(1, emb_dim), torch.nn.SiLU(),
                                           torch.nn.Linear(emb_dim, emb_dim), torch.nn.SiLU())
            self.film = torch.nn.ModuleList(torch.nn.Linear(emb_dim, 2 * c) for c in widths)
            self.head = torch.nn.Linear(widths[-1], 1)
        self.reset_parameters(generator if generator is not None else torch.Generator().manual_seed(0))

    @torch.no_grad()
    def reset_parameters(self, generator):
        """He-uniform weights and zero biases drawn from `generator`; FiLM starts as the identity."""
        for module in self.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                bound = math.sqrt(6 / module.weight[0].numel())
                module.weight.copy_((torch.rand(module.weight.shape, generator=generator) * 2 - 1) * bound)
                module.bias.zero_()
        for film in self.film:
            film.weight.zero_()

    def forward(self, x, sigma):  # x [N, C, H, W], sigma [N] -> logits [N]
        sigma = sigma.to(x.dtype).reshape(-1, 1)                                        # [N, 1]
        c_in = (sigma ** 2 + SIGMA_DATA ** 2).rsqrt()
        c_noise = sigma.log() / 4
        h = torch.cat([x * c_in[:, :, None, None], c_noise[:, :, None, None].expand(-1, 1, *x.shape[2:])], dim=1)
        emb = self.emb(c_noise)                                                         # [N, E]
        for conv, film, pool in zip(self.convs, self.film, self.pool_after):
            scale, shift = film(emb)[:, :, None, None].chunk(2, dim=1)                  # [N, C', 1, 1] each
            h = F.silu(conv(h) * (1 + scale) + shift)
            if pool and min(h.shape[-2:]) >= 2:
                h = F.avg_pool2d(h, 2)
        return self.head(h.mean(dim=(2, 3)))[:, 0]


def sigma_grid(sigma_range, num_sigmas):
    """`num_sigmas` noise levels spaced geometrically from sigma_range[0] to sigma_range[1], float64 [S]."""
    lo, hi = sigma_range
    return np.exp(np.linspace(math.log(lo), math.log(hi), num_sigmas))


def train_classifier(clean, corrupted, kimg=50, batch=256, sigma_range=(0.01, 10), lr=2e-3, width=32, seed=0,
                     device=None, progress=True):
    """Train c(x_σ, σ) on clean images (label 0) and corrupted ones (label 1) (Ambient Omni, Sec. 3).

    Images are [N, C, H, W] on the CPU, uint8 or float in [-1, 1]; each step draws half a batch of each set, σ
    log-uniform over `sigma_range` and x_σ = x + σ·n, all from one generator seeded by `seed`, and moves the batch
    to `device` (default: CUDA if available, else CPU). Binary cross-entropy, Adam with a cosine decay of `lr` over
    ceil(1000·kimg / batch) steps. Returns (the classifier in eval mode, dict of training statistics).
    """
    device = torch.device(device) if device is not None else dist.device()
    net = NoiseConditionedClassifier(clean.shape[1], width, generator=seeded_generator(_TAG_INIT, seed)).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    steps = max(1, math.ceil(kimg * 1000 / batch))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    gen = seeded_generator(_TAG_TRAIN, seed)
    half = batch // 2
    labels = torch.cat([torch.zeros(half), torch.ones(batch - half)]).to(device)
    log_lo, log_hi = math.log(sigma_range[0]), math.log(sigma_range[1])
    loss_avg = acc_avg = None
    bar = tqdm.trange(steps, desc='Training classifier', unit='step', disable=not progress or dist.get_rank() != 0)
    for _step in bar:
        x = as_float(torch.cat([clean[torch.randint(len(clean), (half,), generator=gen)],
                                corrupted[torch.randint(len(corrupted), (batch - half,), generator=gen)]]))
        sigma = (log_lo + (log_hi - log_lo) * torch.rand(batch, generator=gen)).exp()
        noise = torch.randn(x.shape, generator=gen)
        x_sigma = (x + sigma[:, None, None, None] * noise).to(device)
        logits = net(x_sigma, sigma.to(device))
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        acc = ((logits > 0).float() == labels).float().mean().item()
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        acc_avg = acc if acc_avg is None else 0.98 * acc_avg + 0.02 * acc
        bar.set_postfix(loss=f'{loss_avg:.3f}', acc=f'{acc_avg:.3f}', refresh=False)
    stats = dict(steps=steps, images_seen=steps * batch, final_loss=loss_avg, final_accuracy=acc_avg)
    return net.eval().requires_grad_(False), stats

# ----------------------------------------------------------------------------
# Trajectories, the annotation rule and held-out accuracy.


@torch.no_grad()
def classifier_trajectories(net, images, sigmas, seeds, num_draws=4, batch=256, progress=True, desc='Trajectories'):
    """P(corrupted | x + σ·n) of each image [N, C, H, W] (uint8, or float in [-1, 1]) at each σ of `sigmas` [S],
    averaged over `num_draws` noise draws: float64 [N, S] on the CPU. Image i's noise comes from `seeds[i]` alone,
    so its trajectory does not depend on the batch (ambient-utils `get_classifier_trajectory`)."""
    if len(seeds) != images.shape[0]:
        raise ValueError(f'{len(seeds)} seeds for {images.shape[0]} images; pass one seed per image')
    device = next(net.parameters()).device
    sig = torch.as_tensor(np.asarray(sigmas), dtype=torch.float32)                      # [S]
    S, D = len(sig), int(num_draws)
    per_chunk = max(1, batch // (S * D))
    out = torch.empty(images.shape[0], S, dtype=torch.float64)
    starts = range(0, images.shape[0], per_chunk)
    for start in tqdm.tqdm(starts, desc=desc, unit='batch', disable=not progress or dist.get_rank() != 0):
        x = as_float(images[start:start + per_chunk]).cpu()                              # [B, C, H, W]
        noise = torch.stack([torch.randn([S, D, *x.shape[1:]], generator=seeded_generator(_TAG_TRAJ, s))
                             for s in seeds[start:start + per_chunk]])                   # [B, S, D, C, H, W]
        x_sigma = x[:, None, None] + sig[None, :, None, None, None, None] * noise
        sigma = sig[None, :, None].expand(x.shape[0], S, D).reshape(-1)                  # [B*S*D]
        logits = net(x_sigma.reshape(-1, *x.shape[1:]).to(device), sigma.to(device))
        out[start:start + x.shape[0]] = torch.sigmoid(logits.double()).reshape(x.shape[0], S, D).mean(dim=2).cpu()
    return out


def at_chance(p, epsilon):
    """|P − 0.5| ≤ ε, elementwise (with a margin for the float rounding of P = 0.5 ± ε itself)."""
    return (p - 0.5).abs() <= epsilon + 1e-12


def first_confusion(trajectories, sigmas, epsilon=0.05):
    """σ_min per image: the smallest σ of the grid at which P(corrupted) is within `epsilon` of chance,
    |P − 0.5| ≤ ε; the largest grid σ when it never is. trajectories [N, S] (or [S]) -> float64 [N] (or scalar)."""
    p = torch.as_tensor(np.asarray(trajectories), dtype=torch.float64)
    sig = torch.as_tensor(np.asarray(sigmas), dtype=torch.float64)
    if p.shape[-1] != sig.numel():
        raise ValueError(f'trajectories have {p.shape[-1]} noise levels but {sig.numel()} sigmas were given')
    near = at_chance(p.reshape(-1, sig.numel()), epsilon)
    index = torch.where(near.any(dim=1), near.int().argmax(dim=1), torch.full_like(near[:, 0], sig.numel() - 1, dtype=torch.long))
    result = sig[index].numpy()
    return result.reshape(p.shape[:-1]) if p.ndim > 1 else float(result[0])


def accuracy_vs_sigma(p_clean, p_corrupted):
    """Held-out accuracy per σ from trajectories of clean [Nc, S] and corrupted [Nk, S] images (right: P < 0.5 for
    clean, P ≥ 0.5 for corrupted): dict of float lists 'clean', 'corrupted' and 'balanced' (their mean)."""
    clean = (torch.as_tensor(p_clean) < 0.5).double().mean(dim=0)
    corrupted = (torch.as_tensor(p_corrupted) >= 0.5).double().mean(dim=0)
    return dict(clean=clean.tolist(), corrupted=corrupted.tolist(), balanced=((clean + corrupted) / 2).tolist())

# ----------------------------------------------------------------------------
# Datasets in and out.



def quantize(images):
    """Float images [N, C, H, W] in [-1, 1] -> uint8 [N, C, H, W] as a PNG stores them (rounded, clipped)."""
    return torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).contiguous()


def load_images(path, option, progress=True):
    """(uint8 images [N, C, H, W], labels: None or one JSON value per image) of a dataset_tool.py dataset."""
    try:
        dataset = ImageFolderDataset(path, mode='clean', normalize=False)
    except ValueError as err:
        raise ValueError(f'{option}: {err}') from None
    if dataset.has_annotations:
        raise ValueError(f'{option}={path} holds noise annotations already; pass the dataset before annotation')
    images = torch.stack([dataset[i][0] for i in tqdm.trange(len(dataset), desc=f'Loading {option}', unit='img',
                                                             disable=not progress or dist.get_rank() != 0)])
    labels = dataset._load_raw_labels()  # None | int64 [N] | float32 [N, L], parsed and checked by the dataset
    dataset.close()
    return images, None if labels is None else np.asarray(labels).tolist()


def image_name(idx):
    """dataset_tool.py's file name of image `idx`."""
    s = f'{idx:08d}'
    return f'{s[:5]}/img{s}.png'


def check_new_folder(path, option):
    """`path` is a folder this command may create: absent, or an empty folder (nothing is ever overwritten)."""
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ValueError(f'{option}={path} exists and is not an empty folder; choose another {option} or delete it')


def _staging_folder(dest):
    """A fresh hidden sibling of `dest` to fill before renaming it to `dest`, so `dest` is never half-written."""
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f'.{os.path.basename(os.path.abspath(dest))}.tmp-{os.getpid()}')
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def write_dataset(folder, images, labels, annotations, progress=True):
    """dataset_tool.py's layout in `folder`: uint8 images [N, C, H, W] as PNGs and a dataset.json with
    "labels" ([[file, label], ...] or null) and "annotations" ([[file, σ_min, σ_max, kind], ...])."""
    names = [image_name(i) for i in range(len(images))]
    for name, image in zip(names, tqdm.tqdm(images, desc='Writing images', unit='img', disable=not progress)):
        path = os.path.join(folder, *name.split('/'))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        hwc = image.permute(1, 2, 0).numpy()
        PIL.Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc).save(path, format='png', compress_level=0)
    meta = dict(labels=None if labels is None else [[n, label] for n, label in zip(names, labels)],
                annotations=[[names[i], float(smin), float(smax), kind] for i, smin, smax, kind in annotations])
    with atomic_write(os.path.join(folder, 'dataset.json'), 'w', encoding='utf-8') as f:
        json.dump(meta, f)


def save_report_plot(path, sigmas, accuracy, sigma_min, epsilon):
    """Held-out accuracy vs σ (log axis, chance ± ε shaded) and the histogram of the annotated σ_min."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax, hist = fig.subplots(1, 2)
    for key, style in (('balanced', '-'), ('clean', '--'), ('corrupted', ':')):
        ax.plot(sigmas, accuracy[key], style, marker='o' if key == 'balanced' else None, label=f'{key} accuracy')
    ax.axhspan(0.5 - epsilon, 0.5 + epsilon, color='tab:gray', alpha=0.25, label=f'chance ± {epsilon:g}')
    ax.set(xscale='log', ylim=(0, 1.02), xlabel='σ', ylabel='held-out accuracy', title='Classifier c(x_σ, σ)')
    ax.legend(loc='lower left')
    edges = np.exp(np.concatenate([[1.5 * np.log(sigmas[0]) - 0.5 * np.log(sigmas[1])],
                                   (np.log(sigmas[1:]) + np.log(sigmas[:-1])) / 2,
                                   [1.5 * np.log(sigmas[-1]) - 0.5 * np.log(sigmas[-2])]]))
    hist.hist(sigma_min, bins=edges, color='tab:blue')
    hist.set(xscale='log', xlabel='annotated σ_min', ylabel='images', title=f'σ_min of {len(sigma_min)} images')
    fig.tight_layout()
    with atomic_write(path, 'wb') as f:
        fig.savefig(f, format='png')

# ----------------------------------------------------------------------------
# The command's work.


def choose_clean(n, clean_fraction, seed):
    """bool [n]: the seeded share round(F·n) of the images that a synthetic experiment leaves clean."""
    clean = torch.zeros(n, dtype=torch.bool)
    clean[torch.randperm(n, generator=seeded_generator(_TAG_SPLIT, seed))[:round(clean_fraction * n)]] = True
    return clean


def holdout_split(n, fraction, seed, stream=0):
    """(training, held-out) sorted indices of n >= 2 items; a seeded share round(fraction·n), at least 1 and at
    most n - 1, is held out."""
    order = torch.randperm(n, generator=seeded_generator(_TAG_HOLDOUT, seed, stream))
    k = min(n - 1, max(1, round(fraction * n)))
    return order[k:].sort().values, order[:k].sort().values


def _corrupt_subset(data, index, kind, level, seed, chunk=1024):
    """The images `data[index]` (uint8) corrupted and stored as uint8, and the share of values PNG storage clipped."""
    out, clipped = [], 0
    for start in range(0, len(index), chunk):
        part = index[start:start + chunk]
        y = corrupt_images(as_float(data[part]), kind, level, [seed_hash(seed, i) for i in part.tolist()])
        clipped += int(((y < -1) | (y > 1)).sum())
        out.append(quantize(y))
    return torch.cat(out), clipped / max(1, index.numel() * data[0].numel())


def _classify(corrupted, corrupted_ids, clean, cls, seed, device, progress):
    """Train the classifier and annotate every corrupted image: (σ_min float64 [N], the report's 'classifier')."""
    if len(clean) < 2 or len(corrupted) < 2:
        raise ValueError(f'the classifier needs at least 2 clean and 2 corrupted images (one to train on, one held out) '
                         f'but has {len(clean)} clean and {len(corrupted)} corrupted; add images or use --fixed_sigma')
    clean_train, clean_hold = holdout_split(len(clean), cls.holdout, seed, 0)
    corrupted_train, corrupted_hold = holdout_split(len(corrupted), cls.holdout, seed, 1)
    dist.print0(f'Training the classifier on {len(clean_train)} clean and {len(corrupted_train)} corrupted images '
                f'({len(clean_hold)} and {len(corrupted_hold)} held out) for {cls.kimg:g} kimg ...')
    net, train_stats = train_classifier(clean[clean_train], corrupted[corrupted_train],
                                        kimg=cls.kimg, batch=cls.batch, sigma_range=cls.sigma_range, seed=seed,
                                        device=device, progress=progress)
    sigmas = sigma_grid(cls.sigma_range, cls.num_sigmas)
    traj = classifier_trajectories(net, corrupted, sigmas, [seed_hash(seed, i) for i in corrupted_ids.tolist()],
                                   cls.num_draws, cls.batch, progress, desc='Annotating')
    traj_clean = classifier_trajectories(net, clean[clean_hold], sigmas, [seed_hash(seed, 1 << 40, i) for i in
                                         clean_hold.tolist()], cls.num_draws, cls.batch, progress, desc='Held-out clean')
    accuracy = accuracy_vs_sigma(traj_clean, traj[corrupted_hold])
    sigma_min = first_confusion(traj, sigmas, cls.cls_epsilon)
    never = int((~at_chance(traj, cls.cls_epsilon).any(dim=1)).sum())
    report = dict(training=train_stats, num_train=dict(clean=len(clean_train), corrupted=len(corrupted_train)),
                  num_holdout=dict(clean=len(clean_hold), corrupted=len(corrupted_hold)), sigmas=sigmas.tolist(),
                  accuracy=accuracy, mean_trajectory=traj.mean(dim=0).tolist(), never_at_chance=never)
    for s, a in zip(sigmas, accuracy['balanced']):
        dist.print0(f'  σ = {s:8.4f}: held-out accuracy {a:.3f}')
    return sigma_min, report


def annotate_dataset(cfg, progress=True):
    """The annotate.py command: the images to annotate (`cfg.data`, plus trusted `cfg.clean`; or `cfg.data`
    corrupted synthetically by `cfg.corrupt` = (kind, level) except a seeded `cfg.clean_fraction`), their σ_min
    (known noise std, `cfg.fixed_sigma`, or the classifier `cfg.classifier`), written to the dataset folder
    `cfg.dest` and the report folder `cfg.report_dir` (annotate.json, classifier-accuracy.png). Returns the report."""
    check_new_folder(cfg.dest, '--dest')
    check_new_folder(cfg.report_dir, '--report_dir')
    device = torch.device(cfg.device) if cfg.get('device') else dist.device()
    data, labels = load_images(cfg.data, '--data', progress)
    report = dict(options=json.loads(json.dumps(cfg)), num_images=0)
    kind_name, known_sigma = 'corrupted', cfg.fixed_sigma
    if cfg.corrupt is not None:  # Synthetic experiment: a seeded share stays clean and serves as the clean set.
        kind, level = cfg.corrupt
        is_clean = choose_clean(len(data), cfg.clean_fraction, cfg.seed)
        target = (~is_clean).nonzero()[:, 0]
        if len(target) == 0:
            raise ValueError(f'--clean_fraction={cfg.clean_fraction:g} leaves none of the {len(data)} images to corrupt; '
                             'lower it')
        images = data.clone()
        images[target], clipped = _corrupt_subset(data, target, kind, level, cfg.seed)
        clean = images[is_clean]
        report.update(corruption=dict(kind=kind, level=level, clipped_fraction=clipped))
        if kind == 'noise':  # The std is known: the annotation needs no classifier.
            kind_name, known_sigma = 'noisy', level
            if clipped > 0.01:
                dist.print0(f'Warning: PNG storage clipped {clipped:.1%} of the noisy pixel values to [-1, 1], so those '
                            f'images do not carry exact Gaussian noise of std {level:g}; train.py --noise_sigma adds '
                            'synthetic noise in float instead')
    else:
        target, clean = torch.arange(len(data)), data[:0]
        images = data
        if cfg.clean is not None:
            clean, clean_labels = load_images(cfg.clean, '--clean', progress)
            if clean.shape[1:] != data.shape[1:]:
                raise ValueError(f'--clean={cfg.clean} holds {list(clean.shape[1:])} images but --data={cfg.data} holds '
                                 f'{list(data.shape[1:])} ([C, H, W]); make both at one resolution with dataset_tool.py')
            if (labels is None) != (clean_labels is None):
                dist.print0('Note: only one of --data and --clean has labels; the output has none')
            labels = None if labels is None or clean_labels is None else labels + clean_labels
            images = torch.cat([data, clean])
    if known_sigma is not None:
        sigma_min = np.full(len(target), float(known_sigma))
    else:
        sigma_min, report['classifier'] = _classify(images[target], target, clean, cfg.classifier, cfg.seed, device,
                                                    progress)
    report.update(num_images=len(images), num_annotated=len(target), kind=kind_name,
                  sigma_min=dict(mean=float(sigma_min.mean()), median=float(np.median(sigma_min)),
                                 min=float(sigma_min.min()), max=float(sigma_min.max())))

    dest_tmp, report_tmp = _staging_folder(cfg.dest), _staging_folder(cfg.report_dir)
    try:
        annotations = [(int(i), s, 0.0, kind_name) for i, s in zip(target.tolist(), sigma_min)]
        write_dataset(dest_tmp, images, labels, annotations, progress=progress and dist.get_rank() == 0)
        if 'classifier' in report:
            save_report_plot(os.path.join(report_tmp, 'classifier-accuracy.png'), np.asarray(report['classifier']['sigmas']),
                             report['classifier']['accuracy'], sigma_min, cfg.classifier.cls_epsilon)
        with atomic_write(os.path.join(report_tmp, 'annotate.json'), 'w', encoding='utf-8') as f:
            json.dump(report, f, indent=2)
        os.replace(dest_tmp, cfg.dest)  # Renaming replaces an empty folder too.
        os.replace(report_tmp, cfg.report_dir)
    finally:
        for tmp in (dest_tmp, report_tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    dist.print0(f'Annotated {len(target)} of {len(images)} images as {kind_name}: σ_min mean '
                f'{report["sigma_min"]["mean"]:.4g}, median {report["sigma_min"]["median"]:.4g}, range '
                f'[{report["sigma_min"]["min"]:.4g}, {report["sigma_min"]["max"]:.4g}]')
    dist.print0(f'Dataset in {cfg.dest}, report in {cfg.report_dir}')
    return report
