"""Corrupted image datasets in EDM's format (a folder or zip of images plus `dataset.json`).

The dataset *is* corrupted (Daras et al. 2023, Sec. 3): each raw image i has one fixed mask A_i, a
deterministic function of (`corruption_seed`, i), and an item carries only the observation A_i ⊙ x0_i.
The further corruption Ã = A ⊙ B is what the ambient loss feeds the network; B is redrawn on every draw
by default, seeded by (`hat_seed`, i, draw id) so a training run is reproducible, or fixed per image with
`fixed_hat_mask=True` (the original's behaviour). Clean pixels leave the dataset only in `mode='clean'`,
which evaluation code asks for explicitly.

Item keys are either an index or an `(index, draw_id)` pair; `InfiniteSampler(yield_positions=True)`
yields such pairs, the draw id being the sampler's global position, so B depends on the training seed and
step and not on the number of DataLoader workers or processes.

Noisy and low-quality data (SPEC §3): every image carries an annotation (σ_min, σ_max, kind), read from
`dataset.json` ("annotations": [[file, σ_min, σ_max, kind], ...]; images without an entry are clean, (0, ∞))
or made synthetically (`noise_sigma`, `clean_fraction`: a seeded share of the images carries fixed Gaussian
noise of std `noise_sigma`, which is part of the image the dataset yields). With `noise_items=True` an item
also carries `noise_info` = [σ_t, σ_min, σ_max, kind code] (σ_t from a `(index, draw_id, σ_t)` key, as the
σ-first sampler yields; NaN without one) and the image's fixed noise n_fixed (zeros unless the kind is
'corrupted'), both mirrored with x-flipped copies.

Super-resolution (`sr_factor`): an item also carries SR3's condition, the image's block means upsampled back
(`sr_condition`), a second measurement of x0 like A ⊙ x0. Item layout: (observation, label, A, Ã
[, noise_info, fixed noise][, condition][, clean]).
"""

import io
import json
import os
import zipfile

import numpy as np
import PIL.Image
import torch

from torch_utils.ambient_diffusion import MaskCorruption, downsample, upsample_bicubic
from torch_utils.misc import seed_hash, seeded_generator
from training.dataset_json import KIND_CODES, KINDS, DatasetError, parse_annotations, parse_labels  # noqa: F401

MODES = ('corrupted', 'clean')

# Tags that keep the seed streams of A, fixed B, per-draw B, the synthetic noise, the choice of noisy images and
# the fixed noise of corrupted images apart.
_TAG_MASK, _TAG_FIXED_HAT, _TAG_HAT, _TAG_NOISE, _TAG_NOISY_SET, _TAG_FIXED_NOISE = 0xA, 0xB, 0xC, 0xE, 0xF, 0x10

# Annotation kinds (SPEC §3, `training.dataset_json.KINDS`): 'noisy' images already carry Gaussian noise of std
# σ_min; 'corrupted' ones carry another corruption and are trusted above σ_min once fixed noise of that std is added.


class Dataset(torch.utils.data.Dataset):
    """Base class: subsetting, x-flips, labels, caching and built-in mask corruption.

    Subclasses implement `_load_raw_image(raw_idx) -> uint8 [C, H, W]` and `_load_raw_labels()`.
    """

    def __init__(self,
        name,                           # Name of the dataset.
        raw_shape,                      # Shape of the raw image data [N, C, H, W].
        max_size            = None,     # Keep a seeded random subset of at most this many images.
        use_labels          = False,    # Return class labels (error if the dataset has none).
        xflip               = False,    # Double the dataset with mirrored copies (masks mirrored too).
        random_seed         = 0,        # Seed of the max_size subset.
        cache               = False,    # Keep loaded images in memory.
        corruption_pattern  = 'dust',   # Mask pattern: dust | box | fixed_box | keep_patch.
        corruption_probability = 0.0,   # p: how much of each image A hides.
        delta_probability   = 0.0,      # δ: how much of A the further corruption B hides.
        mask_full_rgb       = False,    # Share dust masks over channels.
        mask_geometry       = 'ours',   # 'original': box patterns as the original drew them (MaskCorruption).
        corruption_seed     = 0,        # Seed of the dataset's masks A (the corrupted dataset itself).
        hat_seed            = 0,        # Seed of the further corruption B (the training seed).
        fixed_hat_mask      = False,    # One fixed B per image instead of a fresh one per draw.
        with_clean          = False,    # Also return the clean image (diagnostics on synthetically corrupted data).
        mode                = 'corrupted',  # 'corrupted': items hold A ⊙ x0; 'clean': x0 (evaluation only).
        normalize           = True,     # float32 in [-1, 1]; False keeps uint8 (for metrics).
        noise_sigma         = None,     # Synthetic noisy data: std of the fixed Gaussian noise of the noisy images.
        clean_fraction      = 0.0,      # Synthetic noisy data: the seeded share of images left clean.
        noise_items         = False,    # Items also carry noise_info and the fixed noise (the noisy-data losses).
        sr_factor           = None,     # Items also carry the super-resolution condition (a measurement of x0).
    ):
        if mode not in MODES:
            raise DatasetError(f"mode={mode!r} is not one of {MODES}")
        if max_size is not None and max_size < 1:
            raise DatasetError(f"max_size={max_size} must be a positive number of images (or None for all)")
        self._name = name
        self._raw_shape = list(raw_shape)
        self._use_labels = use_labels
        self._cache = cache
        self._cached_images = dict()
        self._raw_labels = None
        self._label_shape = None
        self.mode = mode
        self.normalize = normalize
        self.corruption = MaskCorruption(pattern=corruption_pattern, corruption_probability=corruption_probability,
            delta_probability=delta_probability, mask_full_rgb=mask_full_rgb, geometry=mask_geometry)
        self.corruption_seed = int(corruption_seed)
        self.hat_seed = int(hat_seed)
        self.fixed_hat_mask = bool(fixed_hat_mask)
        self.with_clean = bool(with_clean)
        self._draw_counter = 0
        self.noise_sigma = None if noise_sigma is None else float(noise_sigma)
        self.clean_fraction = float(clean_fraction)
        self.noise_items = bool(noise_items)
        self.sr_factor = sr_factor
        self._annotations = None
        if self.noise_sigma is not None and not (np.isfinite(self.noise_sigma) and self.noise_sigma > 0):
            raise DatasetError(f"noise_sigma={noise_sigma} must be a positive noise std (images in [-1, 1])")
        if not 0 <= self.clean_fraction <= 1:
            raise DatasetError(f"clean_fraction={clean_fraction} must be in [0, 1]")

        # Subset and flips. Raw indices (positions in the full sorted file list) key the masks,
        # so a subset or a flipped copy keeps each image's own corruption.
        self._raw_idx = np.arange(self._raw_shape[0], dtype=np.int64)
        if max_size is not None and self._raw_idx.size > max_size:
            np.random.RandomState(random_seed % (1 << 31)).shuffle(self._raw_idx)
            self._raw_idx = np.sort(self._raw_idx[:max_size])
        self._xflip = np.zeros(self._raw_idx.size, dtype=np.uint8)
        if xflip:
            self._raw_idx = np.tile(self._raw_idx, 2)
            self._xflip = np.concatenate([self._xflip, np.ones_like(self._xflip)])

        if use_labels and not self.has_labels:
            raise DatasetError(f"labels were requested but dataset '{name}' has none: add \"labels\" to its "
                "dataset.json (dataset_tool.py writes them from folder names) or train unconditionally")
        # Fail now, not in a worker, when the mask geometry does not fit the images.
        self.corruption.sample_mask([1] + self._raw_shape[1:], generator=torch.Generator().manual_seed(0))
        self._raw_annotations()  # bad annotations fail now, with the entry named

    # ---- subclass interface -------------------------------------------------------------------

    def _load_raw_image(self, raw_idx):  # -> uint8 [C, H, W]
        raise NotImplementedError

    def _load_raw_labels(self):  # -> None | int64 [N] | float32 [N, L]
        raise NotImplementedError

    def _load_raw_annotations(self):  # -> None | (float64 [N, 2] (σ_min, σ_max), int64 [N] kind codes)
        return None

    def close(self):
        pass

    def __getstate__(self):
        return dict(self.__dict__, _raw_labels=None)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ---- labels -------------------------------------------------------------------------------

    def _get_raw_labels(self):
        if self._raw_labels is None:
            labels = self._load_raw_labels() if self._use_labels else None
            if labels is None:
                labels = np.zeros([self._raw_shape[0], 0], dtype=np.float32)
            labels = np.asarray(labels)
            if labels.shape[0] != self._raw_shape[0]:
                raise DatasetError(f"dataset '{self._name}' has {labels.shape[0]} labels for {self._raw_shape[0]} images")
            if labels.dtype == np.int64 and labels.ndim == 1 and labels.size and labels.min() < 0:
                raise DatasetError(f"dataset '{self._name}' has negative class labels")
            if labels.dtype not in (np.int64, np.float32) or labels.ndim not in (1, 2):
                raise DatasetError(f"labels of '{self._name}' must be integers or float vectors, got {labels.dtype} {labels.shape}")
            self._raw_labels = labels
        return self._raw_labels

    def get_label(self, idx):
        label = self._get_raw_labels()[self._raw_idx[idx]]
        if label.dtype == np.int64:
            onehot = np.zeros(self.label_shape, dtype=np.float32)
            onehot[label] = 1
            label = onehot
        return torch.from_numpy(np.array(label, dtype=np.float32))

    # ---- masks --------------------------------------------------------------------------------

    def _image_shape_batch(self):
        return [1] + self._raw_shape[1:]

    def mask(self, raw_idx):
        """The dataset's corruption A of raw image `raw_idx` (unflipped), float32 [C, H, W]."""
        gen = seeded_generator(_TAG_MASK, self.corruption_seed, raw_idx)
        return self.corruption.sample_mask(self._image_shape_batch(), generator=gen)[0]

    def hat_mask(self, raw_idx, mask, draw_id=None):
        """Ã = A ⊙ B for one draw of raw image `raw_idx` (unflipped frame), float32 [C, H, W]."""
        if self.fixed_hat_mask:
            gen = seeded_generator(_TAG_FIXED_HAT, self.corruption_seed, raw_idx)
        elif draw_id is not None:
            gen = seeded_generator(_TAG_HAT, self.hat_seed, raw_idx, draw_id)
        else:
            # No draw id: a per-process counter, told apart across DataLoader workers.
            worker = torch.utils.data.get_worker_info()
            worker_id = -1 if worker is None else worker.id
            gen = seeded_generator(_TAG_HAT, self.hat_seed, raw_idx, worker_id, self._draw_counter, 1 << 62)
            self._draw_counter += 1
        return self.corruption.sample_hat_mask(mask[None], generator=gen)[0]

    # ---- noise annotations (SPEC §3, noisy and low-quality data) -------------------------------

    def _raw_annotations(self):
        """(σ_min, σ_max) float64 [N_raw, 2] and kind codes int64 [N_raw] of every raw image."""
        if self._annotations is None:
            stored = self._load_raw_annotations()
            if stored is not None and self.noise_sigma is not None:
                raise DatasetError(f"dataset '{self._name}' has annotations in its dataset.json and synthetic noise "
                                   "was asked for too (noise_sigma): use one of them")
            if stored is not None:
                levels, kinds = stored
            else:
                N = self._raw_shape[0]
                levels = np.tile(np.array([[0.0, np.inf]]), (N, 1))
                kinds = np.zeros(N, dtype=np.int64)
                if self.noise_sigma is not None:
                    noisy = self.synthetic_noisy_indices()
                    levels[noisy] = (self.noise_sigma, 0.0)
                    kinds[noisy] = KIND_CODES['noisy']
            self._annotations = (np.asarray(levels, dtype=np.float64), np.asarray(kinds, dtype=np.int64))
        return self._annotations

    def synthetic_noisy_indices(self):
        """The raw indices that `noise_sigma` makes noisy: all but round(clean_fraction · N), a seeded choice."""
        N = self._raw_shape[0]
        order = np.random.RandomState(seed_hash(_TAG_NOISY_SET, self.corruption_seed) % (1 << 31)).permutation(N)
        return np.sort(order[int(round(self.clean_fraction * N)):])

    @property
    def has_annotations(self):
        """Whether some image is trusted only at some noise levels (annotations or synthetic noise)."""
        levels, kinds = self._raw_annotations()
        return bool((kinds != 0).any())

    def noise_levels(self):
        """(σ_min, σ_max) of every dataset index (subset and flips applied), float64 [len, 2]."""
        return self._raw_annotations()[0][self._raw_idx]

    def annotation(self, idx):
        """(σ_min, σ_max, kind) of dataset index `idx`."""
        levels, kinds = self._raw_annotations()
        raw_idx = self._raw_idx[idx]
        return float(levels[raw_idx, 0]), float(levels[raw_idx, 1]), KINDS[kinds[raw_idx]]

    def _noise(self, tag, raw_idx):
        """A fixed standard-normal image of raw image `raw_idx` (unflipped frame), float32 [C, H, W]."""
        return torch.randn(self._raw_shape[1:], generator=seeded_generator(tag, self.corruption_seed, raw_idx))

    def noise_config(self):
        """What defines the noisy dataset, for checkpoints."""
        levels, kinds = self._raw_annotations()
        return dict(noise_sigma=self.noise_sigma, clean_fraction=self.clean_fraction,
                    num_noisy=int((kinds == KIND_CODES['noisy']).sum()),
                    num_corrupted=int((kinds == KIND_CODES['corrupted']).sum()))

    # ---- items --------------------------------------------------------------------------------

    def _load_image(self, raw_idx):
        image = self._cached_images.get(raw_idx, None)
        if image is None:
            image = self._load_raw_image(raw_idx)
            if self._cache:
                self._cached_images[raw_idx] = image
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or list(image.shape) != self._raw_shape[1:]:
            shape = getattr(image, 'shape', None)
            raise DatasetError(f"image {self._image_name(raw_idx)} has shape {shape}, expected {self._raw_shape[1:]} "
                "uint8 like the first image: rebuild the dataset with dataset_tool.py --resolution=WxH")
        return image

    def _image_name(self, raw_idx):
        return f'#{raw_idx}'

    def __len__(self):
        return self._raw_idx.size

    def __getitem__(self, key):
        """Return (observation, label, A, Ã); the observation is A ⊙ x0 ('corrupted') or x0 ('clean'), with its
        synthetic noise in 'corrupted' mode. With `noise_items`, (noise_info, fixed noise) follow Ã. With
        `with_clean`, the clean image x0 comes last, for diagnostics only (synthetically corrupted data)."""
        key = tuple(key) if isinstance(key, (tuple, list)) else (key,)
        idx, draw_id, sigma = (key + (None, None))[:3]
        idx = int(idx)
        raw_idx = int(self._raw_idx[idx])
        image = torch.from_numpy(self._load_image(raw_idx).copy())  # [C, H, W] uint8
        mask = self.mask(raw_idx)
        hat = self.hat_mask(raw_idx, mask, draw_id)
        flip = (lambda t: t.flip(-1)) if self._xflip[idx] else (lambda t: t)
        image, mask, hat = flip(image), flip(mask), flip(hat)
        clean = image.to(torch.float32) / 127.5 - 1
        if self.normalize:
            image = clean
        levels, kinds = self._raw_annotations() if (self.noise_sigma is not None or self.noise_items) else (None, None)
        if self.mode == 'corrupted':
            if self.noise_sigma is not None and kinds[raw_idx] == KIND_CODES['noisy']:
                noisy = clean + self.noise_sigma * flip(self._noise(_TAG_NOISE, raw_idx))
                image = noisy if self.normalize else (noisy * 127.5 + 128).clamp(0, 255).to(torch.uint8)
            image = image * mask.to(image.dtype)
        item = (image, self.get_label(idx), mask, hat)
        if self.noise_items:
            kind = int(kinds[raw_idx])
            info = torch.tensor([np.nan if sigma is None else float(sigma), levels[raw_idx, 0], levels[raw_idx, 1], kind],
                                dtype=torch.float64)  # σ exactly as the sampler judged it
            fixed = flip(self._noise(_TAG_FIXED_NOISE, raw_idx)) if kind == KIND_CODES['corrupted'] else \
                torch.zeros(self._raw_shape[1:])
            item += (info, fixed)
        if self.sr_factor:
            item += (sr_condition(clean, self.sr_factor),)
        if self.with_clean:
            item += (clean,)
        return item

    def get_details(self, idx):
        return dict(raw_idx=int(self._raw_idx[idx]), xflip=bool(self._xflip[idx]),
            raw_label=self._get_raw_labels()[self._raw_idx[idx]].copy())

    def corruption_config(self):
        """Everything that defines the corrupted dataset and its further corruption, for checkpoints."""
        return dict(self.corruption.to_dict(), corruption_seed=self.corruption_seed, hat_seed=self.hat_seed,
            fixed_hat_mask=self.fixed_hat_mask)

    # ---- properties ---------------------------------------------------------------------------

    @property
    def name(self):
        return self._name

    @property
    def image_shape(self):
        return list(self._raw_shape[1:])

    @property
    def num_channels(self):
        return self.image_shape[0]

    @property
    def resolution(self):
        return self.image_shape[1]

    @property
    def label_shape(self):
        if self._label_shape is None:
            raw_labels = self._get_raw_labels()
            if raw_labels.dtype == np.int64:
                self._label_shape = [int(np.max(raw_labels)) + 1]
            else:
                self._label_shape = list(raw_labels.shape[1:])
        return list(self._label_shape)

    @property
    def label_dim(self):
        return int(np.prod(self.label_shape))

    @property
    def has_labels(self):
        return any(x != 0 for x in self.label_shape)



class ImageFolderDataset(Dataset):
    """Images in a folder (searched recursively) or a zip, as written by dataset_tool.py."""

    def __init__(self,
        path,                   # Path to a directory or zip file.
        resolution = None,      # Expected resolution; None = whatever the first image has.
        **super_kwargs,         # Passed on to Dataset.
    ):
        self._path = str(path)
        self._zipfile = None
        self._zipfile_pid = None
        if os.path.isdir(self._path):
            self._type = 'dir'
            self._all_fnames = {os.path.relpath(os.path.join(root, fname), start=self._path).replace(os.sep, '/')
                for root, _dirs, files in os.walk(self._path) for fname in files}
        elif os.path.isfile(self._path) and self._path.lower().endswith('.zip'):
            self._type = 'zip'
            try:
                self._all_fnames = set(self._get_zipfile().namelist())
            except zipfile.BadZipFile as e:
                raise DatasetError(f"{self._path} is not a readable zip ({e}): rebuild it with dataset_tool.py") from None
        elif os.path.exists(self._path):
            raise DatasetError(f"{self._path} is neither a folder nor a .zip: point --data at a dataset made by dataset_tool.py")
        else:
            raise DatasetError(f"dataset not found: {self._path} (make one with `python dataset_tool.py --source=... --dest={self._path}`)")

        PIL.Image.init()
        extensions = set(PIL.Image.EXTENSION.keys())
        self._image_fnames = sorted(f for f in self._all_fnames if os.path.splitext(f)[1].lower() in extensions)
        if len(self._image_fnames) == 0:
            raise DatasetError(f"no images found in {self._path}: convert your images with dataset_tool.py")

        name = os.path.splitext(os.path.basename(self._path.rstrip('/')))[0]
        first = self._read_image(self._image_fnames[0])
        raw_shape = [len(self._image_fnames)] + list(first.shape)
        _, channels, height, width = raw_shape
        if channels not in (1, 3):
            raise DatasetError(f"{self._image_fnames[0]} has {channels} channels; datasets need 1 or 3 (dataset_tool.py converts)")
        if height != width:
            raise DatasetError(f"{self._image_fnames[0]} is {width}x{height}, not square: use dataset_tool.py --transform=center-crop")
        if resolution is not None and height != resolution:
            raise DatasetError(f"{self._path} holds {height}x{width} images but resolution {resolution} was asked for: "
                f"rebuild it with dataset_tool.py --resolution={resolution}x{resolution}")
        super().__init__(name=name, raw_shape=raw_shape, **super_kwargs)

    def _get_zipfile(self):
        assert self._type == 'zip'
        # A forked DataLoader worker inherits the parent's handle and would share its file position: reopen per process.
        if self._zipfile is None or self._zipfile_pid != os.getpid():
            self._zipfile = zipfile.ZipFile(self._path)
            self._zipfile_pid = os.getpid()
        return self._zipfile

    def _open_file(self, fname):
        if self._type == 'dir':
            return open(os.path.join(self._path, fname), 'rb')
        return self._get_zipfile().open(fname, 'r')

    def close(self):
        if getattr(self, '_zipfile', None) is not None:
            self._zipfile.close()
        self._zipfile = None

    def __getstate__(self):
        # Zip handles do not survive pickling into DataLoader workers; each worker reopens lazily.
        return dict(super().__getstate__(), _zipfile=None)

    def _read_image(self, fname):
        try:
            with self._open_file(fname) as f:
                image = np.array(PIL.Image.open(io.BytesIO(f.read())))
        except (OSError, PIL.UnidentifiedImageError) as e:
            raise DatasetError(f"cannot read image {fname} in {self._path}: {e}") from None
        if image.ndim == 2:
            image = image[:, :, np.newaxis]  # HW -> HWC
        if image.dtype != np.uint8:
            raise DatasetError(f"image {fname} in {self._path} is {image.dtype}, expected 8-bit: convert with dataset_tool.py")
        return image.transpose(2, 0, 1)  # HWC -> CHW

    def _load_raw_image(self, raw_idx):
        return self._read_image(self._image_fnames[raw_idx])

    def check_images(self, full=False, progress=False):
        """Check every image of the dataset now rather than when training reaches it: its header (format, size,
        8-bit L or RGB) or, with `full`, the whole decoded image. Raises a DatasetError naming the first bad file
        and how many are bad."""
        import tqdm
        C, H, W = self._raw_shape[1:]
        bad = []
        for fname in tqdm.tqdm(self._image_fnames, desc='Checking images', unit='img', disable=not progress):
            try:
                if full:
                    shape = self._read_image(fname).shape
                else:
                    with self._open_file(fname) as f, PIL.Image.open(f) as img:
                        if img.mode not in ('L', 'RGB'):
                            raise DatasetError(f'image {fname} in {self._path} has mode {img.mode}, expected 8-bit L or RGB')
                        shape = (len(img.getbands()), img.height, img.width)
            except (DatasetError, OSError, PIL.UnidentifiedImageError, zipfile.BadZipFile) as err:
                bad.append(f'{fname}: {err}')
                continue
            if tuple(shape) != (C, H, W):
                bad.append(f'{fname} is {shape[2]}x{shape[1]} with {shape[0]} channel(s), not {W}x{H} with {C} like the first')
        if bad:
            raise DatasetError(f'{self._path}: {len(bad)} of {len(self._image_fnames)} images are unusable, the first: '
                               f'{bad[0]}; rebuild the dataset with dataset_tool.py')

    def _image_name(self, raw_idx):
        return f'{self._image_fnames[raw_idx]} in {self._path}'

    def _read_json_key(self, key):
        fname = 'dataset.json'
        if fname not in self._all_fnames:
            return None
        with self._open_file(fname) as f:
            try:
                return json.load(f).get(key)
            except (json.JSONDecodeError, AttributeError) as e:
                raise DatasetError(f"{fname} in {self._path} is not valid JSON with a '{key}' entry: {e}") from None

    def _load_raw_annotations(self):
        entries = self._read_json_key('annotations')
        if entries is None:
            return None
        return parse_annotations(entries, self._image_fnames, f'dataset.json in {self._path}')

    def _load_raw_labels(self):
        fname = 'dataset.json'
        labels = self._read_json_key('labels')
        if labels is None:
            return None
        try:
            labels = dict(labels)
        except (TypeError, ValueError):
            raise DatasetError(f"{fname} in {self._path}: 'labels' must be a list of [file name, label] pairs") from None
        missing = [f for f in self._image_fnames if f not in labels]
        if missing:
            raise DatasetError(f"{fname} in {self._path} has no label for {missing[0]} ({len(missing)} images unlabelled)")
        return parse_labels([labels[f] for f in self._image_fnames], self._image_fnames, f'{fname} in {self._path}')


def sr_condition(x0, sr_factor):
    """SR3's condition (Saharia et al. 2022): the low-resolution image (block means of sr_factor² pixels) upsampled
    back bicubically; [C, H, W] or [N, C, H, W]. Like the mask A, a measurement of x0 the dataset makes."""
    batch = x0[None] if x0.ndim == 3 else x0
    condition = upsample_bicubic(downsample(batch, sr_factor), sr_factor)
    return condition[0] if x0.ndim == 3 else condition


class HFImageDataset(Dataset):
    """Images (and captions) from a 🤗 `datasets` dataset: a hub id, a local dataset folder or an image folder.

    Each image is converted to RGB, resized so its shorter side is `resolution` (bilinear) and cropped to a
    square: centred with `center_crop`, else at a position drawn once per image from (`random_seed`, index), so
    an image and its mask A keep the same frame on every draw and no hidden pixel is ever shown.
    """

    def __init__(self,
        name,                   # Hub id or local path given to datasets.load_dataset.
        config_name = None,     # The dataset's configuration name.
        split       = 'train',  # Which split to use.
        image_column = 'image', # Column holding the images.
        caption_column = None,  # Column holding captions (None: no captions).
        resolution  = 64,       # Output side in pixels.
        center_crop = False,    # Crop the centre instead of a per-image random square.
        cache_dir   = None,     # datasets' cache directory.
        **super_kwargs,         # Passed on to Dataset.
    ):
        import datasets
        try:
            data = datasets.load_dataset(name, config_name, split=split, cache_dir=cache_dir)
        except Exception as e:  # datasets raises many types (FileNotFoundError, ConnectionError, DatasetNotFoundError)
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DatasetError(f"cannot load dataset {name!r} (split {split!r}): {reason}") from None
        for label, column in (('image', image_column), ('caption', caption_column)):
            if column is not None and column not in data.column_names:
                raise DatasetError(f"dataset {name!r} has no {label} column {column!r}; its columns are "
                                   f"{', '.join(data.column_names)}")
        if len(data) == 0:
            raise DatasetError(f"dataset {name!r} (split {split!r}) is empty")
        self._data = data
        self._image_column = image_column
        self._caption_column = caption_column
        self._target = int(resolution)
        self._center_crop = bool(center_crop)
        self._crop_seed = int(super_kwargs.get('random_seed', 0))
        super().__init__(name=os.path.basename(str(name).rstrip('/')), raw_shape=[len(data), 3, resolution, resolution],
                         **super_kwargs)

    def _load_raw_image(self, raw_idx):
        image = self._data[int(raw_idx)][self._image_column]
        if not isinstance(image, PIL.Image.Image):
            raise DatasetError(f"item {raw_idx} of column {self._image_column!r} is not an image")
        image = image.convert('RGB')
        w, h = image.size
        scale = self._target / min(w, h)
        size = (max(self._target, round(w * scale)), max(self._target, round(h * scale)))
        image = image.resize(size, PIL.Image.BILINEAR)
        span_x, span_y = size[0] - self._target, size[1] - self._target
        if self._center_crop:
            left, top = span_x // 2, span_y // 2
        else:
            offsets = torch.randint(0, 1 << 30, (2,), generator=seeded_generator(0xD, self._crop_seed, raw_idx))
            left, top = int(offsets[0]) % (span_x + 1), int(offsets[1]) % (span_y + 1)
        image = image.crop((left, top, left + self._target, top + self._target))
        return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()

    def _image_name(self, raw_idx):
        return f'item {raw_idx} of {self._name}'

    def _load_raw_labels(self):
        return None

    def caption(self, idx):
        """The caption of item `idx` ('' without a caption column; the first one when an item has several)."""
        if self._caption_column is None:
            return ''
        caption = self._data[int(self._raw_idx[idx])][self._caption_column]
        if isinstance(caption, (list, tuple)):
            caption = caption[0] if caption else ''
        if not isinstance(caption, str):
            raise DatasetError(f"caption of item {idx} in column {self._caption_column!r} is {type(caption).__name__}, "
                               f"not text")
        return caption
