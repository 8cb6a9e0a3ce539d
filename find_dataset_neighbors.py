"""Memorization check: nearest training images of generated images in DINOv2 feature space.

    python find_dataset_neighbors.py --input_dir=out/images --data=data.zip --features_path=data_dinov2.npy \
        --output_dir=neighbors
    torchrun --standalone --nproc_per_node=8 find_dataset_neighbors.py --input_dir=out/images --data=celeba.zip \
        --features_path=celeba_dinov2.npy --output_dir=neighbors --max_size=10000

Features (the paper's memorization experiments, Daras et al. 2023, after Somepalli et al. 2023): DINOv2
(Oquab et al. 2023; ViT-g/14 by default, through transformers) image embedding = the CLS token after the final layer norm
(`Dinov2Model(...).pooler_output`), L2-normalised so that dot products are cosine similarities. The training
set's features are cached in `--features_path` with a `<features_path>.json` record of what they were
computed from; any difference (model, dataset, preprocessing, normalisation) recomputes them.

Preprocessing (a documented fix): the original reflect-padded 64x64 images to 70x70 and fed (x + 1) / 2
without ImageNet mean/std. We map [-1, 1] to [0, 1], resize the whole image (no crop, which would cut away
the borders we compare) bicubically with antialiasing (torchvision's tensor `Resize`, as transformers' fast
image processors do) to `--image_size` (default 224: DINOv2's main training resolution and what its image
processor feeds it; a 64x64 image at its native size would give only 5x5 patches, far from what the model was
trained on), clamp to [0, 1] as resizing uint8 images does, and normalise with the image_mean / image_std of
the model's `preprocessor_config.json` when it has one, else ImageNet's. `--image_size=0` keeps the dataset
resolution rounded up to a multiple of the patch size (64 -> 70, the original's size, but resized, not padded).

Outputs in `--output_dir`: `neighbors/<image>.png` (the generated image and its k nearest training images,
similarities drawn under them), `similarities.jsonl`, `max_products.pkl` and `softmax_products.pkl` (lists
of floats, the original's files), `max_similarity_hist.png` and `summary.json`.
"""

import contextlib
import hashlib
import json
import math
import os
import pickle
import zipfile

import click
import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
import tqdm

import dnnlib
from dnnlib.util import atomic_write
from training.cli import check_output_dir, check_subset_seed, command_body
from torch_utils import distributed as dist
from torch_utils.images import make_grid, save_png, to_uint8
from training.dataset import ImageFolderDataset
from training.metrics import subset_indices

DEFAULT_MODEL = 'facebook/dinov2-giant'   # ViT-g/14, the paper's torch.hub `dinov2_vitg14`.
IMAGENET_MEAN = (0.485, 0.456, 0.406)     # torchvision / DINOv2 ImageNet statistics.
IMAGENET_STD = (0.229, 0.224, 0.225)
CACHE_FORMAT = 1
_VOLATILE_CONFIG_KEYS = ('_name_or_path', 'transformers_version', 'dtype', 'torch_dtype', '_commit_hash')

# ----------------------------------------------------------------------------
# Model and preprocessing.


class ModelError(ValueError):
    """A DINOv2 model that cannot be loaded; the one-line message names it and the options that point to it."""


def load_model(model, cache_dir=None, device=None):
    """DINOv2 from a Hugging Face id or local directory (`AutoModel.from_pretrained`), float32, eval mode."""
    import transformers

    try:
        net = transformers.AutoModel.from_pretrained(model, cache_dir=cache_dir, dtype=torch.float32)
    except (OSError, ValueError) as err:
        looks_like_path = os.path.isabs(model) or model.startswith(('.', '~')) or model.count('/') > 1
        reason = 'no such directory' if looks_like_path and not os.path.exists(model) else ' '.join(str(err).split())
        raise ModelError(f"cannot load DINOv2 model '{model}' ({reason}); pass a local model directory with "
                         f"--model=DIR, or a Hugging Face id already downloaded to --cache_dir={cache_dir or 'DIR'}") from None
    if not str(net.config.model_type).startswith('dinov2'):
        raise ModelError(f"--model={model} is a '{net.config.model_type}' model, not DINOv2")
    return net.to(device or dist.device()).eval().requires_grad_(False)


def model_fingerprint(net):
    """What identifies the model's computation: a hash of its config and a hash of evenly strided samples of
    every weight (exact and deterministic on any device, and cheap even for ViT-g)."""
    config = {k: v for k, v in net.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    weights = hashlib.sha256()
    for name, tensor in net.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // 4096)].to('cpu', torch.float32).contiguous()
        weights.update(f'{name}{tuple(tensor.shape)}'.encode())
        weights.update(sample.numpy().tobytes())
    return dict(model_config_sha256=config_hash, model_weights_sha256=weights.hexdigest()[:16])


def _preprocessor_config(model, cache_dir=None):
    """The model's `preprocessor_config.json` as a dict, or None when it has none (or it cannot be fetched)."""
    if os.path.isdir(model):
        path = os.path.join(model, 'preprocessor_config.json')
        path = path if os.path.isfile(path) else None
    else:
        import huggingface_hub
        try:
            path = huggingface_hub.hf_hub_download(model, 'preprocessor_config.json', cache_dir=cache_dir)
        except Exception:  # Missing entry, offline, no cache: the ImageNet statistics are the documented fallback.
            path = None
    if path is None:
        return None
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def preprocessing(net, model, resolution, image_size=224, cache_dir=None):
    """Preprocessing parameters: target size (a multiple of the patch size), mean, std and where they came from."""
    patch = net.config.patch_size
    size = image_size or math.ceil(resolution / patch) * patch
    if size % patch:
        raise ValueError(f'--image_size={image_size} is not a multiple of the model\'s patch size {patch}; '
                         f'use e.g. {16 * patch}, or 0 for the dataset resolution rounded up to a multiple')
    proc = _preprocessor_config(model, cache_dir) or {}
    found = 'image_mean' in proc and 'image_std' in proc
    mean, std = (proc['image_mean'], proc['image_std']) if found else (IMAGENET_MEAN, IMAGENET_STD)
    return dnnlib.EasyDict(image_size=size, resample='bicubic-antialias', mean=[float(m) for m in mean],
                           std=[float(s) for s in std], mean_std_from='preprocessor_config.json' if found else 'imagenet')


def preprocess(images, params, channels=3):
    """[-1, 1] images [B, C, H, W] -> the model's input [B, channels, S, S]: ((x + 1) / 2 resized - mean) / std."""
    x = (images.to(torch.float32) + 1) / 2
    if x.shape[1] == 1 and channels == 3:
        x = x.repeat(1, 3, 1, 1)  # Grayscale datasets: the same image in R, G and B.
    if x.shape[-2:] != (params.image_size, params.image_size):
        x = torch.nn.functional.interpolate(x, size=(params.image_size, params.image_size), mode='bicubic',
                                            align_corners=False, antialias=True).clamp(0, 1)
    mean = torch.tensor(params.mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    std = torch.tensor(params.std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def extract_features(net, images, params, normalize=True):
    """DINOv2 image embeddings [B, D]: CLS token after the final layer norm, L2-normalised if `normalize`."""
    device = next(net.parameters()).device
    x = preprocess(images.to(device), params, channels=net.config.num_channels)
    features = net(pixel_values=x).pooler_output.to(torch.float32)
    return torch.nn.functional.normalize(features, dim=1) if normalize else features

# ----------------------------------------------------------------------------
# Images.


class _DatasetImages(torch.utils.data.Dataset):
    """(index, clean training image [C, H, W] in [-1, 1])."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, idx):
        return idx, self.dataset[idx][0]

    def close(self):
        self.dataset.close()


class _GeneratedImages(torch.utils.data.Dataset):
    """(position, generated image [C, H, W] in [-1, 1]) for image files under `root`."""

    def __init__(self, root, files):
        self.root, self.files = root, files

    def __len__(self):
        return len(self.files)

    def load_uint8(self, pos):  # -> [H, W, C]
        path = os.path.join(self.root, self.files[pos])
        try:
            image = np.array(PIL.Image.open(path))
        except (OSError, PIL.UnidentifiedImageError) as err:
            raise ValueError(f'cannot read image {path}: {err}') from None
        return image[:, :, None] if image.ndim == 2 else image

    def __getitem__(self, pos):
        image = torch.from_numpy(self.load_uint8(pos)).permute(2, 0, 1)
        return pos, image.to(torch.float32) / 127.5 - 1


def list_images(input_dir, exclude=None):
    """Image files under `input_dir` (recursive), as sorted relative paths; files under `exclude` are skipped."""
    if not os.path.isdir(input_dir):
        raise FileNotFoundError(f'--input_dir={input_dir} is not a folder of generated images')
    PIL.Image.init()
    extensions = set(PIL.Image.EXTENSION)
    exclude = os.path.abspath(exclude) if exclude else None
    files = []
    for root, dirs, names in os.walk(input_dir):
        if exclude and os.path.abspath(root) == exclude:
            dirs[:] = []  # Our own outputs, when --output_dir lies inside --input_dir.
            continue
        files += [os.path.relpath(os.path.join(root, n), input_dir).replace(os.sep, '/') for n in names
                  if os.path.splitext(n)[1].lower() in extensions]
    if not files:
        raise ValueError(f'no images found in --input_dir={input_dir} (searched recursively)')
    return sorted(files)


def check_images(root, files, image_shape):
    """Every file is a readable image with the dataset's channels and resolution (reads headers only)."""
    channels, height, width = image_shape
    for name in files:
        path = os.path.join(root, name)
        try:
            with PIL.Image.open(path) as image:
                mode, size = image.mode, image.size
        except (OSError, PIL.UnidentifiedImageError) as err:
            raise ValueError(f'cannot read image {path}: {err}') from None
        if mode != {1: 'L', 3: 'RGB'}[channels] or size != (width, height):
            raise ValueError(f'{path} is a {size[0]}x{size[1]} {mode} image but the dataset holds {width}x{height} '
                             f'{channels}-channel images; compare images of the dataset\'s resolution and channels')


def compute_features(images, net, params, num, batch=64, workers=0, normalize=True, desc='Features'):
    """Features [num, D] of items 0..num-1 of `images` (yielding (index, image)), on the model's device.

    Rank r of W computes items r, r+W, ...; a sum over ranks (every other row is zero) assembles them on all.
    """
    device = next(net.parameters()).device
    rank, world_size = dist.get_rank(), dist.get_world_size()
    mine = np.arange(rank, num, world_size)
    batches = [mine[i:i + batch].tolist() for i in range(0, len(mine), batch)]
    if workers > 0 and hasattr(images, 'close'):
        images.close()  # Forked workers must open their own zip handles: a shared file offset corrupts reads.
    loader = torch.utils.data.DataLoader(images, batch_sampler=batches, num_workers=workers)
    features = torch.zeros([num, net.config.hidden_size], dtype=torch.float32, device=device)
    for indices, x in tqdm.tqdm(loader, total=len(batches), desc=desc, unit='batch', disable=rank != 0):
        features[indices.to(device)] = extract_features(net, x, params, normalize=normalize)
    return dist.all_reduce_sum(features)

# ----------------------------------------------------------------------------
# Dataset features and their cache.


def _dataset_fingerprint(path):
    """Content of a zip (names and CRC32s from its directory) or of a folder (names, sizes, mtimes)."""
    digest = hashlib.sha256()
    if os.path.isdir(path):
        for root, _dirs, names in sorted(os.walk(path)):
            for name in sorted(names):
                st = os.stat(os.path.join(root, name))
                digest.update(f'{os.path.relpath(os.path.join(root, name), path)}:{st.st_size}:{st.st_mtime_ns};'.encode())
    else:
        with zipfile.ZipFile(path) as zf:
            for info in sorted(zf.infolist(), key=lambda i: i.filename):
                digest.update(f'{info.filename}:{info.CRC}:{info.file_size};'.encode())
    return digest.hexdigest()[:16]


def cache_key(opts, dataset, net, params):
    """Everything the cached dataset features depend on."""
    return dict(format=CACHE_FORMAT, model=opts.model, model_type=net.config.model_type, **model_fingerprint(net),
                dataset=os.path.abspath(opts.data), dataset_fingerprint=_dataset_fingerprint(opts.data),
                dataset_size=len(dataset), image_shape=list(dataset.image_shape),
                preprocessing={k: params[k] for k in ('image_size', 'resample', 'mean', 'std')},
                feature='pooler_output', normalize=bool(opts.normalize))


def read_cache(features_path, key):
    """(features, message) when `features_path` holds features computed as `key` says, else (None, why not)."""
    meta_path = features_path + '.json'
    if not os.path.isfile(features_path):
        return None, f'No cached dataset features at {features_path}; computing them'
    try:
        with open(meta_path, encoding='utf-8') as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None, f'{features_path} has no readable {meta_path} (what it was computed from); recomputing'
    changed = [k for k in key if meta.get(k) != key[k]]
    if changed:
        return None, f'Cached dataset features {features_path} are stale ({", ".join(changed)} changed); recomputing'
    try:
        features = np.load(features_path)
    except (OSError, ValueError) as err:
        return None, f'Cannot read {features_path} ({err}); recomputing'
    if features.ndim != 2 or features.shape[0] != key['dataset_size']:
        return None, f'{features_path} holds {features.shape} features for {key["dataset_size"]} images; recomputing'
    return features, f'Reusing cached dataset features {features_path} ({features.shape[0]} x {features.shape[1]})'


def write_cache(features_path, features, key):
    """Features .npy and the JSON record, atomically; the record goes first out and last in, so a crash in
    between leaves features without a record (recomputed), never a record describing other features."""
    meta_path = features_path + '.json'
    os.makedirs(os.path.dirname(os.path.abspath(features_path)), exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(meta_path)
    with atomic_write(features_path, 'wb') as f:
        np.save(f, features)
    with atomic_write(meta_path, 'w', encoding='utf-8') as f:
        json.dump(dict(key, feature_dim=int(features.shape[1])), f, indent=2)


def dataset_features(opts, dataset, net, params):
    """Training-set features [N, D] on every rank: from the cache when it matches, else computed and cached."""
    key = cache_key(opts, dataset, net, params) if dist.get_rank() == 0 else None
    features, message = (None, f'--cache=False: computing the dataset features into {opts.features_path}')
    if opts.cache and dist.get_rank() == 0:
        features, message = read_cache(opts.features_path, key)
    dist.print0(message)
    shape = dist.broadcast_object(None if features is None else features.shape)
    device = next(net.parameters()).device
    if shape is not None:
        cached = torch.from_numpy(features).to(device, torch.float32) if dist.get_rank() == 0 else torch.zeros(shape, device=device)
        return dist.broadcast(cached)
    features = compute_features(_DatasetImages(dataset), net, params, len(dataset), batch=opts.batch,
                                workers=opts.workers, normalize=opts.normalize, desc='Dataset features')
    if dist.get_rank() == 0:
        write_cache(opts.features_path, features.cpu().numpy(), key)
        dist.print0(f'Saved dataset features to {opts.features_path} (+ .json)')
    return features

# ----------------------------------------------------------------------------
# Neighbours and outputs.


def nearest_neighbors(queries, keys, k):
    """Top-k similarities (dot products) of each query [B, D] among keys [N, D], and the max of the softmax
    over the N similarities (the original's `max(softmax(products))`, along the dataset dimension)."""
    sims = queries @ keys.T  # [B, N]
    values, indices = sims.topk(k, dim=1)
    return values, indices, torch.softmax(sims, dim=1).amax(dim=1)


def _caption(grid, labels, tile_w, pad):
    """Grid [H, W, C] uint8 with one text label under each tile, as a PIL image."""
    rgb = grid if grid.shape[2] == 3 else grid.repeat(3, axis=2)
    canvas = PIL.Image.new('RGB', (rgb.shape[1], rgb.shape[0] + 16), 'white')
    canvas.paste(PIL.Image.fromarray(rgb), (0, 0))
    draw = PIL.ImageDraw.Draw(canvas)
    for i, label in enumerate(labels):
        draw.text((i * (tile_w + pad) + 2, rgb.shape[0] + 2), label, fill='black')
    return np.array(canvas)


def save_side_by_side(path, generated, neighbors, indices, sims, min_size=128, pad=4):
    """The generated image and its neighbours (uint8 [H, W, C] each) side by side, enlarged to >= `min_size`
    pixels by pixel repetition, with the dataset index and similarity under each neighbour."""
    scale = max(1, math.ceil(min_size / generated.shape[0]))
    tiles = torch.from_numpy(np.stack([generated] + list(neighbors))).permute(0, 3, 1, 2)
    grid = make_grid(tiles, grid_w=len(tiles), drange=(0, 255), pad=pad, scale=scale)
    labels = ['generated'] + [f'#{i} sim={s:.4f}' for i, s in zip(indices, sims)]
    save_png(_caption(grid, labels, generated.shape[1] * scale, pad), path)


def summarize(max_sims, threshold):
    """Distribution of the per-image max similarity."""
    m = np.asarray(max_sims, dtype=np.float64)
    above = int((m > threshold).sum())
    return dict(count=int(m.size), mean=float(m.mean()), median=float(np.median(m)), p95=float(np.percentile(m, 95)),
                p99=float(np.percentile(m, 99)), max=float(m.max()), threshold=float(threshold), above_threshold=above,
                fraction_above_threshold=above / m.size)


def save_histogram(path, max_sims, threshold):
    """Histogram of the max similarities with the threshold marked (matplotlib, Agg, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    values = np.asarray(max_sims, dtype=np.float64)
    lo, hi = min(values.min(), threshold), max(values.max(), threshold)
    ax.hist(values, bins=np.linspace(lo, max(hi, lo + 1e-3), 51), color='tab:blue')  # Bins span the threshold too.
    ax.axvline(threshold, color='tab:red', linestyle='--', label=f'threshold {threshold:g}')
    ax.set_xlabel('max similarity to the training set')
    ax.set_ylabel('generated images')
    ax.legend()
    fig.tight_layout()
    with atomic_write(path, 'wb') as f:
        fig.savefig(f, format='png')


def _write(path, write, mode='w'):
    with atomic_write(path, mode, encoding=None if 'b' in mode else 'utf-8') as f:
        write(f)


def find_neighbors(opts):
    """The whole analysis (see the module docstring); every rank calls it, rank 0 writes the summary files.
    Returns the summary dict (on every rank)."""
    device = dist.device()
    dataset = ImageFolderDataset(opts.data, mode='clean', normalize=True)
    if opts.k > len(dataset):
        raise ValueError(f'--k={opts.k} neighbours asked for but {opts.data} holds {len(dataset)} images')
    files = list_images(opts.input_dir, exclude=opts.output_dir)
    files = [files[i] for i in subset_indices(len(files), opts.max_size, opts.seed)]
    check_images(opts.input_dir, files, dataset.image_shape)
    dist.print0(f'Loading DINOv2 {opts.model} ...')
    with dist.rank0_first():  # Rank 0 fills the Hugging Face cache.
        net = load_model(opts.model, cache_dir=opts.cache_dir, device=device)
    params = preprocessing(net, opts.model, dataset.resolution, opts.image_size, opts.cache_dir)
    dist.print0(f'Preprocessing: {dataset.resolution}px -> {params.image_size}px {params.resample}, '
                f'mean/std from {params.mean_std_from}')

    data_features = dataset_features(opts, dataset, net, params)
    generated = _GeneratedImages(opts.input_dir, files)
    gen_features = compute_features(generated, net, params, len(files), batch=opts.batch, workers=opts.workers,
                                    normalize=opts.normalize, desc='Generated features')

    # Each rank handles positions r, r+W, ...: similarities, then the side-by-side images.
    pair_dir = os.path.join(opts.output_dir, 'neighbors')
    os.makedirs(pair_dir, exist_ok=True)
    mine = np.arange(dist.get_rank(), len(files), dist.get_world_size())
    records = []
    for start in tqdm.trange(0, len(mine), opts.batch, desc='Neighbours', unit='batch', disable=dist.get_rank() != 0):
        pos = mine[start:start + opts.batch]
        values, indices, soft = nearest_neighbors(gen_features[torch.from_numpy(pos).to(device)], data_features, opts.k)
        for p, v, i, s in zip(pos.tolist(), values.tolist(), indices.tolist(), soft.tolist()):
            records.append(dict(position=p, file=files[p], max_similarity=v[0], topk_indices=i, topk_similarities=v,
                                softmax_max=s))
            neighbors = [to_uint8(dataset[j][0])[0] for j in i]
            save_side_by_side(os.path.join(pair_dir, os.path.splitext(files[p])[0].replace('/', '_') + '.png'),
                              generated.load_uint8(p), neighbors, i, v)
    records = sorted((r for part in dist.all_gather_object(records) for r in part), key=lambda r: r['position'])
    rows = [{k: v for k, v in r.items() if k != 'position'} for r in records]
    max_sims, softmax_maxes = [r['max_similarity'] for r in rows], [r['softmax_max'] for r in rows]

    summary = summarize(max_sims, opts.threshold)
    summary.update(k=opts.k, normalize=bool(opts.normalize), model=opts.model, data=opts.data,
                   input_dir=opts.input_dir, dataset_size=len(dataset), image_size=params.image_size)
    if dist.get_rank() == 0:
        out = lambda name: os.path.join(opts.output_dir, name)  # noqa: E731
        _write(out('similarities.jsonl'), lambda f: f.writelines(json.dumps(r) + '\n' for r in rows))
        _write(out('max_products.pkl'), lambda f: pickle.dump(max_sims, f), 'wb')
        _write(out('softmax_products.pkl'), lambda f: pickle.dump(softmax_maxes, f), 'wb')
        _write(out('summary.json'), lambda f: json.dump(summary, f, indent=2))
        save_histogram(out('max_similarity_hist.png'), max_sims, opts.threshold)
    dist.print0(f'Max similarity of {summary["count"]} generated images to {len(dataset)} training images: '
                f'mean {summary["mean"]:.4f}, median {summary["median"]:.4f}, 95th {summary["p95"]:.4f}, '
                f'99th {summary["p99"]:.4f}, max {summary["max"]:.4f}')
    dist.print0(f'Above {opts.threshold:g}: {summary["above_threshold"]} ({100 * summary["fraction_above_threshold"]:.2f}%). '
                f'Results in {opts.output_dir}')
    dist.barrier()
    return summary

# ----------------------------------------------------------------------------


@click.command()
@click.option('--input_dir',     help='Generated images (searched recursively)',            metavar='DIR',   type=str, required=True)
@click.option('--output_dir',    help='Where the results go',                              metavar='DIR',   type=str, required=True)
@click.option('--features_path', help='Cache of the dataset features (+ .json record)',    metavar='NPY',   type=str, required=True)
@click.option('--data',          help='Training dataset (folder or zip, dataset_tool.py)', metavar='ZIP|DIR', type=str, required=True)
@click.option('--max_size',      help='Random subset of at most this many generated images', metavar='INT', type=click.IntRange(min=1))
@click.option('--seed',          help='Seed of the --max_size subset',                     metavar='INT',   type=int, default=0, show_default=True)
@click.option('--k',             help='Nearest neighbours per generated image',            metavar='INT',   type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--threshold',     help='Similarity above which an image counts as a copy',  metavar='FLOAT', type=float, default=0.95, show_default=True)
@click.option('--normalize',     help='L2-normalise features (cosine similarity)',         metavar='BOOL',  type=bool, default=True, show_default=True)
@click.option('--model',         help='DINOv2: Hugging Face id or local directory',        metavar='ID|DIR', type=str, default=DEFAULT_MODEL, show_default=True)
@click.option('--cache_dir',     help='Hugging Face cache for --model  [default: HF_HOME]', metavar='DIR',  type=str)
@click.option('--image_size',    help='Model input size, a multiple of the patch size (0: dataset resolution rounded up)', metavar='INT', type=click.IntRange(min=0), default=224, show_default=True)
@click.option('--batch', '--batch-gpu', 'batch', help='Images per batch and process (--batch-gpu: the original\'s name)', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--cache',         help='Reuse the features in --features_path when they match (False: recompute and overwrite)', metavar='BOOL', type=bool, default=True, show_default=True)
@click.option('--workers',       help='Data loading worker processes per process',         metavar='INT',   type=click.IntRange(min=0), default=2, show_default=True)
@command_body()
def main(opts):
    """Nearest training images of generated images in DINOv2 feature space (memorization check)."""
    check_subset_seed(opts)
    check_output_dir(opts.output_dir, '--output_dir')
    if dist.get_rank() != 0:
        import transformers
        transformers.utils.logging.disable_progress_bar()
    find_neighbors(opts)


if __name__ == '__main__':
    main()
