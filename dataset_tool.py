"""Convert raw images into an EDM-format dataset (a folder or an uncompressed zip).

The output layout is the one read by `training.dataset.ImageFolderDataset` and by EDM
(Karras et al. 2022, `dataset_tool.py`): image number `idx` is stored as the uncompressed PNG
`{idx:08d}[:5]/img{idx:08d}.png`, next to a `dataset.json` holding
`{"labels": [[fname, int], ...]}` or `{"labels": null}`. All images share one square,
power-of-two shape with 1 (grayscale) or 3 (RGB) channels.

Library part: `open_source`, `make_transform`, `open_dest`, `convert_dataset`; the click command
`main` at the bottom only parses options and reports `DatasetToolError`s as one-line errors.
"""

import gzip
import importlib
import io
import json
import os
import pickle
import re
import shutil
import tarfile
import zipfile

import click
import numpy as np
import PIL.Image
from tqdm import tqdm

BUILTIN_DATASETS = ("digits", "digits-rgb")
CROP_FIX = "use --transform=center-crop --resolution=64x64 (any square power-of-two size)"
SOURCE_KINDS = "an image folder, a .zip of images, cifar-10-python.tar.gz, *-images-idx3-ubyte.gz or builtin:digits"


class DatasetToolError(ValueError):
    """A problem with the source, the destination or the options; the message names the fix."""


# ----------------------------------------------------------------------------
# Reading single images.

# Extensions PIL registers only for writing, or for stub formats it cannot decode without plugins.
_NOT_IMAGES = {".pdf", ".eps", ".ps", ".h5", ".hdf", ".bufr", ".grib", ".mpeg", ".mpg", ".wmf", ".emf"}


def _image_extensions() -> set:
    PIL.Image.init()
    return {ext.lower() for ext in PIL.Image.EXTENSION} - _NOT_IMAGES


def _is_image_name(name: str, extensions: set) -> bool:
    return os.path.splitext(name)[1].lower() in extensions


def _to_array(img: PIL.Image.Image, name: str) -> np.ndarray:
    """PIL image -> uint8 array, HW for grayscale or HWC with 3 channels for everything else."""
    if img.mode in ("I;16", "I;16L", "I;16B"):
        # 16-bit grayscale: keep the high byte so the full range maps onto 0..255.
        return (np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8)
    if img.mode in ("I", "F"):
        raise DatasetToolError(f"image '{name}' has 32-bit pixels (mode {img.mode}); convert it to 8-bit RGB or grayscale first")
    if img.mode in ("1", "L", "LA"):
        return np.asarray(img.convert("L"))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    # RGBA/LA lose their alpha channel here: EDM datasets have no alpha.
    return np.asarray(img.convert("RGB"))


def _decode_image(data_or_file, name: str) -> np.ndarray:
    try:
        with PIL.Image.open(data_or_file) as img:
            img.load()
            return _to_array(img, name)
    except DatasetToolError:
        raise
    except Exception as exc:  # PIL raises many exception types for broken files.
        raise DatasetToolError(f"cannot read image '{name}' ({exc}); remove or replace the file") from exc


# ----------------------------------------------------------------------------
# Labels shared by the folder and zip sources.

def _resolve_labels(fnames: list, meta_text, where: str):
    """Labels for `fnames` (relative paths with '/'): from dataset.json text, else top-level folders, else None."""
    if meta_text is not None:
        try:
            entries = json.loads(meta_text).get("labels")
        except (ValueError, AttributeError) as exc:
            raise DatasetToolError(f"cannot parse '{where}' ({exc}); it must hold "
                                   '{"labels": [[fname, int], ...]} or {"labels": null}') from exc
        if entries is None:
            return None
        table = {}
        for entry in entries:
            ok = isinstance(entry, (list, tuple)) and len(entry) == 2
            if not (ok and isinstance(entry[1], int) and not isinstance(entry[1], bool)):
                raise DatasetToolError(f"'{where}' has a bad entry {entry!r}; each entry must be [relative/path.png, integer label]")
            table[str(entry[0]).replace("\\", "/")] = entry[1]
        missing = [f for f in fnames if f not in table]
        if missing:
            raise DatasetToolError(f"'{where}' has no label for image '{missing[0]}'; add it or delete dataset.json")
        return [table[f] for f in fnames]

    # Class-per-folder layout: needs every image inside a top-level folder and at least two classes
    # (a single wrapper folder, as in most zips of a folder, is not a class).
    if any("/" not in f for f in fnames):
        return None
    tops = [f.split("/", 1)[0] for f in fnames]
    classes = sorted(set(tops))
    if len(classes) < 2:
        return None
    index = {c: i for i, c in enumerate(classes)}
    return [index[t] for t in tops]


def _open_image_folder(source: str, max_images):
    extensions = _image_extensions()
    fnames = []
    for root, dirs, files in os.walk(source):
        dirs.sort()
        for f in files:
            if _is_image_name(f, extensions):
                fnames.append(os.path.relpath(os.path.join(root, f), source).replace(os.sep, "/"))
    fnames.sort()
    if not fnames:
        raise DatasetToolError(f"no images found in folder '{source}' (looked for .png, .jpg, .webp, ... files in it and its subfolders)")
    meta_path = os.path.join(source, "dataset.json")
    meta_text = None
    if os.path.isfile(meta_path):
        with open(meta_path, "r", encoding="utf-8") as f:
            meta_text = f.read()
    labels = _resolve_labels(fnames, meta_text, meta_path)
    fnames = fnames[:max_images]

    def iterate():
        for i, fname in enumerate(fnames):
            path = os.path.join(source, *fname.split("/"))
            img = _decode_image(path, path)
            yield dict(img=img, label=None if labels is None else labels[i], name=fname)
    return len(fnames), iterate()


def _open_image_zip(source: str, max_images):
    extensions = _image_extensions()
    try:
        with zipfile.ZipFile(source) as zf:
            names = set(zf.namelist())
            meta_text = zf.read("dataset.json").decode("utf-8") if "dataset.json" in names else None
    except zipfile.BadZipFile as exc:
        raise DatasetToolError(f"cannot open zip '{source}' ({exc}); check that the file is complete") from exc
    # macOS adds resource-fork twins (`__MACOSX/`, `._name.png`) that are not images.
    fnames = sorted(n for n in names if not n.endswith("/") and _is_image_name(n, extensions)
                    and not n.startswith("__MACOSX/") and not os.path.basename(n).startswith("._"))
    if not fnames:
        raise DatasetToolError(f"no images found in zip '{source}'")
    labels = _resolve_labels(fnames, meta_text, f"{source}:dataset.json")
    fnames = fnames[:max_images]

    def iterate():
        with zipfile.ZipFile(source) as zf:
            for i, fname in enumerate(fnames):
                img = _decode_image(io.BytesIO(zf.read(fname)), f"{source}:{fname}")
                yield dict(img=img, label=None if labels is None else labels[i], name=fname)
    return len(fnames), iterate()


# ----------------------------------------------------------------------------
# Packaged datasets.

# The CIFAR-10 batches are pickles; only the globals needed to rebuild numpy arrays may be loaded,
# so a tampered tarball cannot run code.
_ARRAY_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ARRAY_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR-10 batch")
        return getattr(importlib.import_module(module), name)


def _open_cifar10(source: str, max_images):
    """CIFAR-10 python tarball: the five training batches, 50,000 32x32 RGB images with labels."""
    images, labels = [], []
    try:
        with tarfile.open(source, "r:gz") as tar:
            for batch in range(1, 6):
                member = f"cifar-10-batches-py/data_batch_{batch}"
                try:
                    f = tar.extractfile(member)
                except KeyError:
                    f = None
                if f is None:
                    raise DatasetToolError(f"'{source}' has no '{member}'; pass the original cifar-10-python.tar.gz")
                data = _ArrayUnpickler(f, encoding="latin1").load()
                images.append(np.asarray(data["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                labels.append(np.asarray(data["labels"], dtype=np.int64))
    except (tarfile.TarError, EOFError, OSError, pickle.UnpicklingError, KeyError, ValueError) as exc:
        if isinstance(exc, DatasetToolError):
            raise
        raise DatasetToolError(f"cannot read CIFAR-10 tarball '{source}' ({exc}); "
                               "pass the original cifar-10-python.tar.gz") from exc
    images, labels = np.concatenate(images), np.concatenate(labels)
    if len(images) != len(labels):
        raise DatasetToolError(f"'{source}' has {len(images)} images but {len(labels)} labels; "
                               "pass the original cifar-10-python.tar.gz")
    return _array_source(images, labels, max_images, "cifar10")


def _read_idx(path: str, magic: int, ndim: int) -> np.ndarray:
    """Read a gzipped IDX file (LeCun's MNIST format: big-endian magic, dims, then uint8 data)."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DatasetToolError(f"cannot read '{path}' ({exc}); pass the original MNIST .gz file") from exc
    header = np.frombuffer(raw[:4 + 4 * ndim], dtype=">u4") if len(raw) >= 4 + 4 * ndim else None
    if header is None or header[0] != magic:
        raise DatasetToolError(f"'{path}' is not an IDX file with magic {magic:#010x}; pass the original MNIST .gz file")
    shape = tuple(int(d) for d in header[1:])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DatasetToolError(f"'{path}' holds {data.size} bytes of data, expected {int(np.prod(shape))} for shape {shape}")
    return data.reshape(shape)


def _open_mnist(source: str, max_images):
    """MNIST-style idx gz pair; images are zero-padded (centred) to the next power of two (28 -> 32)."""
    labels_path = os.path.join(os.path.dirname(source), os.path.basename(source).replace("images-idx3", "labels-idx1"))
    if not os.path.isfile(labels_path):
        raise DatasetToolError(f"labels file '{labels_path}' not found; put it next to '{source}'")
    images = _read_idx(source, 0x00000803, 3)
    labels = _read_idx(labels_path, 0x00000801, 1)
    if len(images) != len(labels):
        raise DatasetToolError(f"'{source}' has {len(images)} images but '{labels_path}' has {len(labels)} labels")
    h, w = images.shape[1:]
    side = 1 << (max(h, w) - 1).bit_length()
    top, left = (side - h) // 2, (side - w) // 2
    images = np.pad(images, [(0, 0), (top, side - h - top), (left, side - w - left)])
    return _array_source(images, labels.astype(np.int64), max_images, "mnist")


def _open_builtin(name: str, max_images):
    """scikit-learn's bundled digits (1797 8x8 images, values 0..16) as uint8 0..255, native 8x8."""
    if name not in BUILTIN_DATASETS:
        valid = ", ".join("builtin:" + n for n in BUILTIN_DATASETS)
        raise DatasetToolError(f"unknown built-in dataset 'builtin:{name}'; valid: {valid}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DatasetToolError("builtin:digits needs scikit-learn (it is in requirements.txt)") from exc
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # [N, 8, 8]
    if name == "digits-rgb":
        images = np.repeat(images[..., None], 3, axis=3)  # [N, 8, 8, 3]
    return _array_source(images, digits.target.astype(np.int64), max_images, name)


def _array_source(images: np.ndarray, labels: np.ndarray, max_images, tag: str):
    n = len(images) if max_images is None else min(len(images), max_images)

    def iterate():
        for i in range(n):
            yield dict(img=images[i], label=int(labels[i]), name=f"{tag}[{i}]")
    return n, iterate()


def open_source(source: str, max_images=None):
    """Open a source; returns (num_images, iterator of dict(img=uint8 HW or HWC, label=int|None, name=str)).

    source: an image folder (recursive), a zip of images, `cifar-10-python.tar.gz`,
    `*images-idx3-ubyte.gz` (MNIST; labels file beside it), or `builtin:digits` / `builtin:digits-rgb`
    (returned at their native 8x8; `convert_dataset` upsamples them).
    """
    if max_images is not None and max_images < 1:
        raise DatasetToolError(f"max_images={max_images} must be at least 1 (or None for all images)")
    source = str(source)
    if source.startswith("builtin:"):
        return _open_builtin(source[len("builtin:"):], max_images)
    if not os.path.exists(source):
        raise DatasetToolError(f"source '{source}' does not exist; pass {SOURCE_KINDS}")
    if os.path.isdir(source):
        return _open_image_folder(source, max_images)
    base = os.path.basename(source).lower()
    if base.endswith(".zip"):
        return _open_image_zip(source, max_images)
    if base.endswith((".tar.gz", ".tgz")):
        return _open_cifar10(source, max_images)
    if base.endswith("images-idx3-ubyte.gz"):
        return _open_mnist(source, max_images)
    raise DatasetToolError(f"unsupported source file '{source}'; pass {SOURCE_KINDS}")


# ----------------------------------------------------------------------------
# Transforms.

def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    if img.shape[1] == width and img.shape[0] == height:
        return img
    return np.asarray(PIL.Image.fromarray(img).resize((width, height), PIL.Image.Resampling.LANCZOS))


def _center_crop(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Largest centred square, resized to width x height."""
    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return _resize(img[top:top + side, left:left + side], width, height)


def _center_crop_wide(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Largest centred window with aspect width/height, resized, then padded with black to a square."""
    h, w = img.shape[:2]
    if w * height > h * width:  # wider than the target aspect: trim the sides
        cw, ch = max(1, round(h * width / height)), h
    else:  # taller: trim top and bottom
        cw, ch = w, max(1, round(w * height / width))
    top, left = (h - ch) // 2, (w - cw) // 2
    img = _resize(img[top:top + ch, left:left + cw], width, height)
    side = max(width, height)
    canvas = np.zeros((side, side) + img.shape[2:], dtype=np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top:top + height, left:left + width] = img
    return canvas


def make_transform(transform=None, width=None, height=None):
    """Image transform (uint8 HW/HWC array -> array): None, 'center-crop' or 'center-crop-wide'.

    Without a transform, a given width x height resizes (LANCZOS, aspect not kept); with neither,
    images pass unchanged. The crops need width and height.
    """
    if (width is None) != (height is None):
        raise DatasetToolError(f"give both width and height or neither (got width={width}, height={height})")
    if width is not None and (width < 1 or height < 1):
        raise DatasetToolError(f"resolution {width}x{height} must be positive, e.g. --resolution=64x64")
    if transform is None:
        if width is None:
            return lambda img: img
        return lambda img: _resize(img, width, height)
    crops = {"center-crop": _center_crop, "center-crop-wide": _center_crop_wide}
    if transform not in crops:
        raise DatasetToolError(f"unknown transform '{transform}'; valid: {', '.join(crops)}")
    if width is None:
        raise DatasetToolError(f"--transform={transform} needs --resolution=WxH, e.g. --resolution=64x64")
    crop = crops[transform]
    return lambda img: crop(img, width, height)


# ----------------------------------------------------------------------------
# Destinations.

def open_dest(dest: str):
    """Open a destination; returns (root_name, save_bytes(fname, data), close(commit=True)).

    `dest` ending in .zip: written (ZIP_STORED) to the hidden temporary `.NAME.tmp-PID` beside it
    and renamed on close, so `dest` is never a half-written zip; an existing file is refused
    (EDM overwrote it). Otherwise a folder that must not exist or be empty; it is filled in a
    temporary sibling folder and renamed on close. close(commit=False) discards everything written.
    """
    dest = os.path.normpath(str(dest))
    parent = os.path.dirname(os.path.abspath(dest))
    root_name = os.path.splitext(os.path.basename(dest))[0]
    is_zip = os.path.splitext(dest)[1].lower() == ".zip"

    if os.path.exists(dest):
        if is_zip or not os.path.isdir(dest):
            raise DatasetToolError(f"destination '{dest}' already exists; delete it or choose another --dest")
        if os.listdir(dest):
            raise DatasetToolError(f"destination folder '{dest}' is not empty; empty it or choose another --dest")
    os.makedirs(parent, exist_ok=True)
    tmp_path = os.path.join(parent, f".{os.path.basename(dest)}.tmp-{os.getpid()}")

    if is_zip:
        open(tmp_path, "xb").close()  # plain open, not mkstemp: the result keeps the usual umask permissions
        zf = zipfile.ZipFile(tmp_path, mode="w", compression=zipfile.ZIP_STORED)

        def save_bytes(fname, data):
            zf.writestr(fname, data)

        def close(commit=True):
            zf.close()
            if commit:
                os.replace(tmp_path, dest)
            else:
                os.remove(tmp_path)
        return root_name, save_bytes, close

    os.mkdir(tmp_path)

    def save_bytes(fname, data):
        path = os.path.join(tmp_path, *fname.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)

    def close(commit=True):
        if commit:
            os.replace(tmp_path, dest)  # POSIX rename also replaces an empty folder
        else:
            shutil.rmtree(tmp_path)
    return root_name, save_bytes, close


# ----------------------------------------------------------------------------
# Conversion.

def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _describe(shape) -> str:
    channels = shape[2] if len(shape) == 3 else 1
    return f"{shape[1]}x{shape[0]} with {channels} channel{'s' if channels != 1 else ''}"


def _png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(img).save(buf, format="png", compress_level=0, optimize=False)
    return buf.getvalue()


def convert_dataset(source, dest, max_images=None, transform=None, resolution=None, progress=True) -> dict:
    """Convert `source` into an EDM-format dataset at `dest` (see the module docstring).

    resolution: (width, height) or None. The built-in datasets default to 32x32 and, without a
    transform, accept a square power of two >= 8; they are upsampled from 8x8 with LANCZOS like any
    resize.
    Returns dict(dest, num_images, resolution, channels, num_classes (None without labels)).
    """
    source = str(source)
    if source.startswith("builtin:"):
        if resolution is None:
            resolution = (32, 32)
        w, h = resolution
        if transform is None and (w != h or not _is_pow2(w) or w < 8):
            raise DatasetToolError(f"{source} needs --resolution=NxN with N a power of two >= 8 (default 32x32), got {w}x{h}")
    width, height = resolution if resolution is not None else (None, None)
    transform_fn = make_transform(transform, width, height)
    num_images, items = open_source(source, max_images)

    _, save_bytes, close = open_dest(dest)
    first = None  # (name, shape) of the first image, which fixes every image's shape
    labels = []
    try:
        for idx, item in enumerate(tqdm(items, total=num_images, disable=not progress, unit="img")):
            img = np.asarray(transform_fn(item["img"]), dtype=np.uint8)
            if img.ndim == 3 and img.shape[2] == 1:
                img = img[:, :, 0]
            if first is None:
                h, w = img.shape[:2]
                if h != w or not _is_pow2(w):
                    raise DatasetToolError(f"image '{item['name']}' is {_describe(img.shape)}; output images must be "
                                           f"square with a power-of-two side: {CROP_FIX}")
                first = (item["name"], img.shape)
            elif img.shape != first[1]:
                if (img.ndim == 3) != (len(first[1]) == 3):
                    fix = "convert all images to RGB or all to grayscale first"
                else:
                    fix = "pass --resolution=WxH to resize every image" if resolution is None else CROP_FIX
                raise DatasetToolError(f"image '{item['name']}' is {_describe(img.shape)} but the first image "
                                       f"'{first[0]}' is {_describe(first[1])}; {fix}")
            idx_str = f"{idx:08d}"
            fname = f"{idx_str[:5]}/img{idx_str}.png"
            save_bytes(fname, _png_bytes(img))
            labels.append(None if item["label"] is None else [fname, int(item["label"])])
        if first is None:
            raise DatasetToolError(f"source '{source}' yielded no images")
        has_labels = all(entry is not None for entry in labels)
        save_bytes("dataset.json", json.dumps({"labels": labels if has_labels else None}).encode("utf-8"))
    except BaseException:
        close(commit=False)
        raise
    close(commit=True)
    shape = first[1]
    return dict(dest=str(dest), num_images=len(labels), resolution=shape[0], channels=shape[2] if len(shape) == 3 else 1,
                num_classes=len({entry[1] for entry in labels}) if has_labels else None)


# ----------------------------------------------------------------------------
# Command line.

def _parse_resolution(ctx, param, value):
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", value)
    if m is None:
        raise click.BadParameter(f"'{value}' is not of the form WxH, e.g. 64x64")
    return int(m.group(1)), int(m.group(2))


@click.command()
@click.option("--source",     help="Image folder or zip, cifar-10-python.tar.gz, train-images-idx3-ubyte.gz, or builtin:digits[-rgb]", metavar="PATH", type=str, required=True)
@click.option("--dest",       help="Output folder (new or empty) or .zip (must not exist)", metavar="PATH", type=str, required=True)
@click.option("--max-images", help="Keep only the first N images", metavar="INT", type=click.IntRange(min=1), default=None)
@click.option("--transform",  help="Crop before resizing (needs --resolution)", type=click.Choice(["center-crop", "center-crop-wide"]), default=None)
@click.option("--resolution", help="Output size, e.g. 64x64 (resize with LANCZOS)", metavar="WxH", type=str, callback=_parse_resolution, default=None)
def main(source, dest, max_images, transform, resolution):
    """Convert raw images into an EDM/Ambient Diffusion dataset (uncompressed PNGs + dataset.json).

    \b
    Sources:
      folder or .zip of images  labels from dataset.json in its root, or from top-level class folders
      cifar-10-python.tar.gz    the 50,000 CIFAR-10 training images with labels
      *-images-idx3-ubyte.gz    MNIST (labels file beside it), zero-padded 28x28 -> 32x32
      builtin:digits            scikit-learn's 1,797 handwritten digits, upsampled to 32x32 (no download)
      builtin:digits-rgb        the same with 3 identical channels
    LSUN lmdb sources are not supported.

    \b
    Examples:
      python dataset_tool.py --source=builtin:digits --dest=datasets/digits-32x32.zip
      python dataset_tool.py --source=downloads/cifar-10-python.tar.gz --dest=datasets/cifar10-32x32.zip
      python dataset_tool.py --source=downloads/afhq/train --dest=datasets/afhq-64x64.zip \\
          --transform=center-crop --resolution=64x64
    """
    try:
        summary = convert_dataset(source, dest, max_images=max_images, transform=transform, resolution=resolution)
    except DatasetToolError as exc:
        raise click.ClickException(str(exc)) from exc
    classes = f", {summary['num_classes']} classes" if summary["num_classes"] is not None else ", no labels"
    click.echo(f"Wrote {summary['num_images']} images ({summary['resolution']}x{summary['resolution']}, "
               f"{summary['channels']} channel{'s' if summary['channels'] != 1 else ''}{classes}) to {summary['dest']}")


if __name__ == "__main__":
    main()
