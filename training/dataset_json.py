"""What a dataset's `dataset.json` says besides its files: class labels and noise annotations (EDM's format, with
the noisy-data annotations of SPEC §3). Each parser turns the stored values into arrays, or raises a
DatasetError naming the entry and the fix."""

import numpy as np

KINDS = ('clean', 'noisy', 'corrupted')  # annotation kinds; their codes are their positions
KIND_CODES = {kind: code for code, kind in enumerate(KINDS)}


class DatasetError(ValueError):
    """A dataset that cannot be read as asked; the message names the problem and the fix."""


def parse_labels(values, names, where):
    """Labels as stored in dataset.json -> int64 [N] class indices or float32 [N, L] vectors.

    Refused with a DatasetError naming the image: strings, fractional class indices (3.7 is not class 3),
    vectors of different lengths, and class indices so sparse that most classes have no image (one label of
    100000 would make a 100001-class model)."""
    for value, name in zip(values, names):
        items = value if isinstance(value, (list, tuple)) else [value]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in items):
            raise DatasetError(f"{where}: the label of {name} is {value!r}, not a number or a list of numbers; labels "
                               "are class indices 0..K-1 (dataset_tool.py writes them from folder names) or float vectors")
    vectors = [isinstance(v, (list, tuple)) for v in values]
    if any(vectors):
        lengths = {len(v) if isinstance(v, (list, tuple)) else 1 for v in values}
        if not all(vectors) or len(lengths) != 1:
            raise DatasetError(f"{where}: label vectors have different lengths ({sorted(lengths)}); every image needs a "
                               "vector of the same length")
        return np.asarray(values, dtype=np.float32)
    fractional = [(name, v) for v, name in zip(values, names) if float(v) != int(v)]
    if fractional:
        raise DatasetError(f"{where}: the label of {fractional[0][0]} is {fractional[0][1]!r}, not a class index; "
                           "class labels are integers 0..K-1")
    labels = np.asarray([int(v) for v in values], dtype=np.int64)
    if labels.size and labels.min() < 0:
        raise DatasetError(f"{where}: class labels must be >= 0, got {labels.min()}")
    used, num_classes = np.unique(labels).size, int(labels.max()) + 1 if labels.size else 0
    if num_classes > 2 * used and num_classes - used > 10:
        raise DatasetError(f"{where}: class labels go up to {num_classes - 1} but only {used} classes have images; "
                           "renumber the classes 0..K-1")
    return labels


def _sigma_value(value, allow_inf):
    if value is None and allow_inf:
        return np.inf
    if isinstance(value, str) and allow_inf and value.strip().lower() in ('inf', 'infinity'):
        return np.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return np.nan
    return float(value)


def parse_annotations(entries, names, where):
    """`"annotations": [[file, σ_min, σ_max, kind], ...]` -> (float64 [N, 2] levels, int64 [N] kind codes) for the
    images `names`; images without an entry are clean, (0, ∞). σ_max may be null or "inf" (no upper trust
    level). Refused with a DatasetError naming the entry: an unknown file, a file annotated twice, a σ that is
    negative or not a number, an unknown kind."""
    if not isinstance(entries, list):
        raise DatasetError(f"{where}: 'annotations' must be a list of [file name, sigma_min, sigma_max, kind] entries")
    position = {name: i for i, name in enumerate(names)}
    levels = np.tile(np.array([[0.0, np.inf]]), (len(names), 1))
    kinds = np.zeros(len(names), dtype=np.int64)
    seen = set()
    for entry in entries:
        if not isinstance(entry, (list, tuple)) or len(entry) != 4 or not isinstance(entry[0], str):
            raise DatasetError(f"{where}: annotation {entry!r} is not [file name, sigma_min, sigma_max, kind]; the kind "
                               "('noisy' or 'corrupted') says how the image is trusted, it is never guessed")
        name, sigma_min, sigma_max, kind = entry
        if name not in position:
            raise DatasetError(f"{where}: annotation for {name}, which is not an image of the dataset")
        if name in seen:
            raise DatasetError(f"{where}: {name} is annotated twice; keep one entry per image")
        seen.add(name)
        smin, smax = _sigma_value(sigma_min, False), _sigma_value(sigma_max, True)
        for label, value, raw in (('sigma_min', smin, sigma_min), ('sigma_max', smax, sigma_max)):
            if np.isnan(value) or value < 0 or (label == 'sigma_min' and np.isinf(value)):
                raise DatasetError(f"{where}: {label} of {name} is {raw!r}; noise levels are numbers >= 0 "
                                   "(sigma_max may be null for no upper trust level)")
        if kind not in ('noisy', 'corrupted'):
            raise DatasetError(f"{where}: the kind of {name} is {kind!r}; use 'noisy' (the image carries Gaussian noise "
                               "of std sigma_min) or 'corrupted' (another corruption, trusted above sigma_min)")
        if kind == 'noisy' and smax != 0:
            raise DatasetError(f"{where}: {name} is 'noisy' with sigma_max {sigma_max!r}; a noisy image is never a clean "
                               "target, so its sigma_max is 0 (use 'corrupted' for images trusted as they are at low σ)")
        levels[position[name]] = (smin, smax)
        kinds[position[name]] = KIND_CODES[kind]
    return levels, kinds
