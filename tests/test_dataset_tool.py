"""Tests for dataset_tool.py: sources, transforms, destinations, labels and every CLI error path."""

import gzip
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import dataset_tool
from dataset_tool import DatasetToolError, convert_dataset, make_transform, open_dest, open_source

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------
# Helpers.

def _rng(seed=0):
    return np.random.default_rng(seed)


def _save(path, arr, **kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(arr).save(path, **kwargs)


def _read_dataset(dest):
    """Read an EDM-format dataset (folder or zip) -> (sorted file names, {fname: array}, labels entry)."""
    if str(dest).endswith(".zip"):
        with zipfile.ZipFile(dest) as zf:
            assert all(info.compress_type == zipfile.ZIP_STORED for info in zf.infolist())
            files = {n: zf.read(n) for n in zf.namelist() if not n.endswith("/")}
    else:
        files = {}
        for root, _, names in os.walk(dest):
            for n in names:
                with open(os.path.join(root, n), "rb") as f:
                    files[os.path.relpath(os.path.join(root, n), dest).replace(os.sep, "/")] = f.read()
    labels = json.loads(files.pop("dataset.json"))["labels"]
    images = {n: np.asarray(PIL.Image.open(io.BytesIO(b))) for n, b in files.items()}
    return sorted(images), images, labels, files


def _expected_names(n):
    return [f"{i:08d}"[:5] + f"/img{i:08d}.png" for i in range(n)]


def _cli(args):
    return CliRunner().invoke(dataset_tool.main, args, catch_exceptions=False)


@pytest.fixture
def class_folder(tmp_path):
    """Two class folders with PNG and JPEG, RGB and palette images, all 16x16 RGB after conversion."""
    src = tmp_path / "src"
    rng = _rng(1)
    imgs = {}
    for rel in ["cats/a.png", "cats/b.png", "dogs/c.png", "dogs/sub/d.png"]:
        imgs[rel] = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        _save(str(src / rel), imgs[rel])
    _save(str(src / "cats/e.jpg"), rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), quality=90)
    os.makedirs(src / "dogs", exist_ok=True)
    (src / "dogs" / "notes.txt").write_text("not an image")
    return src, imgs


# ----------------------------------------------------------------------------
# Image folders and zips.

def test_folder_to_zip_pixels_names_labels(class_folder, tmp_path):
    src, imgs = class_folder
    summary = convert_dataset(src, tmp_path / "out.zip", progress=False)
    names, images, labels, _ = _read_dataset(tmp_path / "out.zip")
    order = ["cats/a.png", "cats/b.png", "cats/e.jpg", "dogs/c.png", "dogs/sub/d.png"]  # sorted relative paths
    assert names == _expected_names(5)
    assert labels == [[n, lab] for n, lab in zip(names, [0, 0, 0, 1, 1])]
    assert summary == dict(dest=str(tmp_path / "out.zip"), num_images=5, resolution=16, channels=3, num_classes=2)
    for name, rel in zip(names, order):
        if rel.endswith(".png"):
            np.testing.assert_array_equal(images[name], imgs[rel])  # PNG round trip is lossless
        else:
            np.testing.assert_array_equal(images[name], np.asarray(PIL.Image.open(src / rel).convert("RGB")))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temp file left


def test_folder_and_zip_dest_hold_identical_bytes(class_folder, tmp_path):
    src, _ = class_folder
    convert_dataset(src, tmp_path / "out.zip", progress=False)
    os.makedirs(tmp_path / "empty")
    convert_dataset(src, tmp_path / "empty", progress=False)  # an existing empty folder is accepted
    *_, zip_files = _read_dataset(tmp_path / "out.zip")
    *_, dir_files = _read_dataset(tmp_path / "empty")
    assert zip_files == dir_files
    with open(tmp_path / "empty" / "00000" / "img00000000.png", "rb") as f:
        png = f.read()
    assert b"IDAT\x78\x01" in png  # zlib header of compression level 0 (stored, uncompressed)


def test_zip_source_matches_folder_source(class_folder, tmp_path):
    src, _ = class_folder
    src_zip = tmp_path / "src.zip"
    with zipfile.ZipFile(src_zip, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for root, _, names in os.walk(src):
            for n in names:
                full = os.path.join(root, n)
                zf.write(full, os.path.relpath(full, src).replace(os.sep, "/"))
        zf.writestr("__MACOSX/cats/._a.png", b"resource fork, not an image")
    convert_dataset(src, tmp_path / "a.zip", progress=False)
    convert_dataset(src_zip, tmp_path / "b.zip", progress=False)
    assert _read_dataset(tmp_path / "a.zip")[3] == _read_dataset(tmp_path / "b.zip")[3]


def test_dataset_json_labels_flat_folder_and_modes(tmp_path):
    src = tmp_path / "src"
    rng = _rng(2)
    gray = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    _save(str(src / "x" / "g.png"), gray)
    _save(str(src / "y.png"), rng.integers(0, 256, (8, 8), dtype=np.uint8))
    (src / "dataset.json").write_text(json.dumps({"labels": [["x/g.png", 7], ["y.png", 3]]}))
    convert_dataset(src, tmp_path / "out", progress=False)
    names, images, labels, _ = _read_dataset(tmp_path / "out")
    assert labels == [[names[0], 7], [names[1], 3]]
    assert images[names[0]].shape == (8, 8)  # grayscale stays one channel
    np.testing.assert_array_equal(images[names[0]], gray)

    # Without dataset.json and with images at the root there are no labels.
    os.remove(src / "dataset.json")
    convert_dataset(src, tmp_path / "out2.zip", progress=False)
    assert _read_dataset(tmp_path / "out2.zip")[2] is None

    # A single wrapper folder is not a class: no labels either.
    flat = tmp_path / "flat"
    _save(str(flat / "only" / "a.png"), gray)
    _save(str(flat / "only" / "b.png"), gray)
    convert_dataset(flat, tmp_path / "out3.zip", progress=False)
    assert _read_dataset(tmp_path / "out3.zip")[2] is None


def test_palette_and_rgba_become_rgb(tmp_path):
    src = tmp_path / "src"
    rgba = _rng(3).integers(0, 256, (8, 8, 4), dtype=np.uint8)
    _save(str(src / "a.png"), rgba)
    pal = PIL.Image.fromarray(_rng(4).integers(0, 256, (8, 8, 3), dtype=np.uint8)).quantize(colors=16)
    pal.save(src / "b.png")
    convert_dataset(src, tmp_path / "out.zip", progress=False)
    names, images, _, _ = _read_dataset(tmp_path / "out.zip")
    np.testing.assert_array_equal(images[names[0]], rgba[:, :, :3])
    np.testing.assert_array_equal(images[names[1]], np.asarray(pal.convert("RGB")))


def test_open_source_max_images_and_lazy_items(class_folder):
    src, imgs = class_folder
    n, items = open_source(str(src), max_images=2)
    items = list(items)
    assert n == 2 and [it["name"] for it in items] == ["cats/a.png", "cats/b.png"]
    assert [it["label"] for it in items] == [0, 0]
    np.testing.assert_array_equal(items[1]["img"], imgs["cats/b.png"])


# ----------------------------------------------------------------------------
# Transforms.

def test_center_crop_geometry(tmp_path):
    img = _rng(5).integers(0, 256, (32, 48, 3), dtype=np.uint8)  # H=32, W=48
    np.testing.assert_array_equal(make_transform("center-crop", 32, 32)(img), img[:, 8:40])
    tall = img.transpose(1, 0, 2)  # H=48, W=32
    np.testing.assert_array_equal(make_transform("center-crop", 32, 32)(tall), tall[8:40])
    # Downscaled: the crop resized with LANCZOS; a constant image stays constant.
    ref = np.asarray(PIL.Image.fromarray(img[:, 8:40]).resize((16, 16), PIL.Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(make_transform("center-crop", 16, 16)(img), ref)
    const = np.full((30, 50), 77, np.uint8)
    np.testing.assert_array_equal(make_transform("center-crop", 16, 16)(const), np.full((16, 16), 77))

    # Through the command: the side columns never reach the output.
    _save(str(tmp_path / "src" / "a.png"), img)
    result = _cli(["--source", str(tmp_path / "src"), "--dest", str(tmp_path / "o.zip"), "--transform=center-crop", "--resolution=32x32"])
    assert result.exit_code == 0, result.output
    names, images, _, _ = _read_dataset(tmp_path / "o.zip")
    np.testing.assert_array_equal(images[names[0]], img[:, 8:40])


def test_center_crop_wide_geometry():
    # Taller than 2:1 -> keep the middle 16 rows, no resampling, pad 8 black rows above and below.
    img = _rng(6).integers(1, 256, (48, 32, 3), dtype=np.uint8)
    out = make_transform("center-crop-wide", 32, 16)(img)
    assert out.shape == (32, 32, 3)
    np.testing.assert_array_equal(out[8:24], img[16:32])
    assert not out[:8].any() and not out[24:].any()
    # Wider than 2:1 -> keep the middle 64 columns of 96, then resize 64x32 -> 32x16.
    wide = _rng(7).integers(0, 256, (32, 96), dtype=np.uint8)
    out = make_transform("center-crop-wide", 32, 16)(wide)
    ref = np.asarray(PIL.Image.fromarray(wide[:, 16:80]).resize((32, 16), PIL.Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(out[8:24], ref)
    assert out.shape == (32, 32) and not out[:8].any() and not out[24:].any()


def test_resolution_without_transform_resizes(tmp_path):
    src = tmp_path / "src"
    img = _rng(8).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    _save(str(src / "a.png"), img)
    _save(str(src / "b.png"), np.full((24, 20, 3), 200, np.uint8))  # other size and aspect: stretched
    convert_dataset(src, tmp_path / "o.zip", resolution=(8, 8), progress=False)
    names, images, _, _ = _read_dataset(tmp_path / "o.zip")
    ref = np.asarray(PIL.Image.fromarray(img).resize((8, 8), PIL.Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(images[names[0]], ref)
    np.testing.assert_array_equal(images[names[1]], np.full((8, 8, 3), 200))


# ----------------------------------------------------------------------------
# Packaged datasets.

def _write_cifar(path, rows_per_batch, protocol):
    rng = _rng(9)
    images, labels = [], []
    with tarfile.open(path, "w:gz") as tar:
        def add(name, obj):
            data = pickle.dumps(obj, protocol=2 if protocol == "py2" else protocol)
            if protocol == "py2":  # the real file was pickled by NumPy 1 under Python 2
                data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
                assert b"numpy._core" not in data
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for b in range(1, 6):
            hwc = rng.integers(0, 256, (rows_per_batch, 32, 32, 3), dtype=np.uint8)
            lab = rng.integers(0, 10, rows_per_batch).tolist()
            images.append(hwc)
            labels += lab
            # Real layout: rows of 3072 bytes, the R plane, then G, then B, each row-major.
            add(f"data_batch_{b}", {"batch_label": f"training batch {b} of 5", "labels": lab,
                                    "data": hwc.transpose(0, 3, 1, 2).reshape(rows_per_batch, 3072),
                                    "filenames": [f"img_{b}_{i}.png" for i in range(rows_per_batch)]})
        add("test_batch", {"labels": [0], "data": np.zeros((1, 3072), np.uint8)})
        add("batches.meta", {"label_names": ["airplane"] * 10})
    return np.concatenate(images), labels


@pytest.mark.parametrize("protocol", ["py2", 2, 4, 5])
def test_cifar10_tarball(tmp_path, protocol):
    src = tmp_path / "cifar-10-python.tar.gz"
    images, labels = _write_cifar(src, rows_per_batch=3, protocol=protocol)
    convert_dataset(src, tmp_path / "o.zip", progress=False)
    names, out, got_labels, _ = _read_dataset(tmp_path / "o.zip")
    assert names == _expected_names(15)
    assert got_labels == [[n, lab] for n, lab in zip(names, labels)]
    for i, n in enumerate(names):
        np.testing.assert_array_equal(out[n], images[i])


def test_cifar10_refuses_foreign_pickle_globals(tmp_path):
    src = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(src, "w:gz") as tar:
        data = pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [0], "evil": os.getcwd})
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DatasetToolError, match="not allowed"):
        open_source(str(src))


def _write_idx(path, arr, magic):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes())


def test_mnist_idx_padding_and_labels(tmp_path):
    images = _rng(10).integers(1, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, 0x803)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels, 0x801)
    convert_dataset(tmp_path / "train-images-idx3-ubyte.gz", tmp_path / "o.zip", max_images=4, progress=False)
    names, out, got_labels, _ = _read_dataset(tmp_path / "o.zip")
    assert got_labels == [[n, int(lab)] for n, lab in zip(names, labels[:4])]
    for i, n in enumerate(names):
        assert out[n].shape == (32, 32)
        np.testing.assert_array_equal(out[n][2:30, 2:30], images[i])
        assert out[n].sum() == images[i].astype(np.int64).sum()  # the 2-pixel border is zero


def test_mnist_errors(tmp_path):
    images = np.zeros((2, 28, 28), np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, 0x803)
    result = _cli(["--source", str(tmp_path / "train-images-idx3-ubyte.gz"), "--dest", str(tmp_path / "o.zip")])
    assert result.exit_code == 1 and "train-labels-idx1-ubyte.gz" in result.output
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(2, np.uint8), 0x803)  # wrong magic
    result = _cli(["--source", str(tmp_path / "train-images-idx3-ubyte.gz"), "--dest", str(tmp_path / "o.zip")])
    assert result.exit_code == 1 and "magic" in result.output and "train-labels-idx1-ubyte.gz" in result.output


def test_builtin_digits(tmp_path):
    from sklearn.datasets import load_digits
    digits = load_digits()
    summary = convert_dataset("builtin:digits", tmp_path / "d.zip", progress=False)
    assert summary == dict(dest=str(tmp_path / "d.zip"), num_images=1797, resolution=32, channels=1, num_classes=10)
    names, out, labels, _ = _read_dataset(tmp_path / "d.zip")
    assert names == _expected_names(1797)
    assert [lab for _, lab in labels] == digits.target.tolist()
    assert all(out[n].shape == (32, 32) and out[n].dtype == np.uint8 for n in names[:50])
    # Upsampling keeps the digit: block-averaging back to 8x8 is close to the source.
    src = digits.images[0] * 255 / 16
    back = out[names[0]].astype(np.float64).reshape(8, 4, 8, 4).mean(axis=(1, 3))
    assert np.abs(back - src).mean() < 20

    # At the native 8x8 the pixels are exactly round(v * 255 / 16).
    convert_dataset("builtin:digits", tmp_path / "d8", resolution=(8, 8), max_images=20, progress=False)
    names, out, labels, _ = _read_dataset(tmp_path / "d8")
    assert len(names) == 20 and [lab for _, lab in labels] == digits.target[:20].tolist()
    for i, n in enumerate(names):
        np.testing.assert_array_equal(out[n], np.round(digits.images[i] * 255 / 16))


def test_builtin_digits_rgb(tmp_path):
    convert_dataset("builtin:digits-rgb", tmp_path / "d.zip", max_images=5, resolution=(16, 16), progress=False)
    names, out, labels, _ = _read_dataset(tmp_path / "d.zip")
    assert len(names) == 5 and out[names[0]].shape == (16, 16, 3)
    for n in names:
        assert (out[n] == out[n][:, :, :1]).all()
    assert [lab for _, lab in labels] == [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------
# Error paths through the command line.

def _cli_error(args, *needles):
    result = CliRunner().invoke(dataset_tool.main, [str(a) for a in args])
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception  # reported, not a traceback
    for needle in needles:
        assert str(needle) in result.output, (needle, result.output)
    return result


def test_error_corrupt_image(tmp_path):
    _save(str(tmp_path / "src" / "a.png"), np.zeros((8, 8), np.uint8))
    (tmp_path / "src" / "bad.png").write_bytes(b"this is not a png")
    _cli_error(["--source", tmp_path / "src", "--dest", tmp_path / "o.zip"], "bad.png", "cannot read image")
    assert os.listdir(tmp_path) == ["src"]  # neither the zip nor its temp file remains


def test_error_non_square_and_non_power_of_two(tmp_path):
    _save(str(tmp_path / "a" / "x.png"), np.zeros((32, 48, 3), np.uint8))
    _cli_error(["--source", tmp_path / "a", "--dest", tmp_path / "o.zip"], "x.png", "48x32", "--transform=center-crop --resolution=64x64")
    _save(str(tmp_path / "b" / "y.png"), np.zeros((24, 24, 3), np.uint8))
    _cli_error(["--source", tmp_path / "b", "--dest", tmp_path / "o.zip"], "y.png", "power-of-two", "--transform=center-crop --resolution=64x64")
    _cli_error(["--source", tmp_path / "b", "--dest", tmp_path / "o.zip", "--resolution=48x48"], "y.png", "power-of-two")
    # center-crop to a non-square size is caught too.
    _cli_error(["--source", tmp_path / "a", "--dest", tmp_path / "o.zip", "--transform=center-crop", "--resolution=32x16"], "square")
    assert not os.path.exists(tmp_path / "o.zip")


def test_error_mixed_channels_and_sizes(tmp_path):
    _save(str(tmp_path / "a" / "1.png"), np.zeros((8, 8, 3), np.uint8))
    _save(str(tmp_path / "a" / "2.png"), np.zeros((8, 8), np.uint8))
    _cli_error(["--source", tmp_path / "a", "--dest", tmp_path / "o"], "'2.png'", "'1.png'", "1 channel", "RGB or all to grayscale")
    assert not os.path.exists(tmp_path / "o")
    _save(str(tmp_path / "b" / "1.png"), np.zeros((8, 8, 3), np.uint8))
    _save(str(tmp_path / "b" / "2.png"), np.zeros((8, 8, 3), np.uint8))
    _save(str(tmp_path / "b" / "3.png"), np.zeros((16, 16, 3), np.uint8))
    _cli_error(["--source", tmp_path / "b", "--dest", tmp_path / "o"], "'3.png'", "16x16", "--resolution=WxH")


def test_error_destinations(class_folder, tmp_path):
    src, _ = class_folder
    os.makedirs(tmp_path / "full")
    (tmp_path / "full" / "keep.txt").write_text("x")
    _cli_error(["--source", src, "--dest", tmp_path / "full"], "full", "not empty")
    (tmp_path / "old.zip").write_bytes(b"precious")
    _cli_error(["--source", src, "--dest", tmp_path / "old.zip"], "old.zip", "already exists")
    assert (tmp_path / "old.zip").read_bytes() == b"precious"
    with pytest.raises(DatasetToolError, match="already exists"):
        open_dest(str(tmp_path / "full" / "keep.txt"))


def test_error_sources(tmp_path):
    _cli_error(["--source", tmp_path / "nope", "--dest", tmp_path / "o.zip"], "nope", "does not exist")
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    _cli_error(["--source", tmp_path / "empty", "--dest", tmp_path / "o.zip"], "no images found", "empty")
    with zipfile.ZipFile(tmp_path / "e.zip", "w") as zf:
        zf.writestr("readme.txt", "no images")
    _cli_error(["--source", tmp_path / "e.zip", "--dest", tmp_path / "o.zip"], "no images found", "e.zip")
    (tmp_path / "broken.zip").write_bytes(b"PK but truncated")
    _cli_error(["--source", tmp_path / "broken.zip", "--dest", tmp_path / "o.zip"], "broken.zip", "cannot open zip")
    (tmp_path / "x.bin").write_bytes(b"?")
    _cli_error(["--source", tmp_path / "x.bin", "--dest", tmp_path / "o.zip"], "unsupported source", "x.bin")
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not gzip")
    _cli_error(["--source", tmp_path / "cifar-10-python.tar.gz", "--dest", tmp_path / "o.zip"], "cifar-10-python.tar.gz", "cannot read")
    assert not os.path.exists(tmp_path / "o.zip")


def test_error_dataset_json_missing_label(tmp_path):
    _save(str(tmp_path / "s" / "a.png"), np.zeros((8, 8), np.uint8))
    _save(str(tmp_path / "s" / "b.png"), np.zeros((8, 8), np.uint8))
    (tmp_path / "s" / "dataset.json").write_text(json.dumps({"labels": [["a.png", 1]]}))
    _cli_error(["--source", tmp_path / "s", "--dest", tmp_path / "o.zip"], "'b.png'", "dataset.json")


def test_error_options(tmp_path):
    _save(str(tmp_path / "s" / "a.png"), np.zeros((8, 8), np.uint8))
    for transform in ["center-crop", "center-crop-wide"]:
        _cli_error(["--source", tmp_path / "s", "--dest", tmp_path / "o.zip", f"--transform={transform}"], f"--transform={transform} needs --resolution=WxH")
    r = _cli_error(["--source", tmp_path / "s", "--dest", tmp_path / "o.zip", "--resolution=32"], "WxH", "64x64")
    assert r.exit_code == 2  # a usage error
    _cli_error(["--source", tmp_path / "s", "--dest", tmp_path / "o.zip", "--max-images=0"], "--max-images")
    _cli_error(["--source", "builtin:mnist", "--dest", tmp_path / "o.zip"], "builtin:mnist", "builtin:digits", "builtin:digits-rgb")
    _cli_error(["--source", "builtin:digits", "--dest", tmp_path / "o.zip", "--resolution=12x12"], "power of two >= 8", "12x12")
    _cli_error(["--source", "builtin:digits", "--dest", tmp_path / "o.zip", "--resolution=4x4"], "power of two >= 8")
    assert sorted(os.listdir(tmp_path)) == ["s"]


@pytest.mark.slow  # a fresh interpreter
def test_command_line_subprocess(tmp_path):
    dest = tmp_path / "digits.zip"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "dataset_tool.py"), "--source=builtin:digits",
                           f"--dest={dest}", "--max-images=20"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Wrote 20 images (32x32, 1 channel, 10 classes)" in proc.stdout
    names, out, labels, _ = _read_dataset(dest)
    assert names == _expected_names(20) and len(labels) == 20
    assert out[names[0]].shape == (32, 32)
