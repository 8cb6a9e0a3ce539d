"""Non-leaking data augmentation with augmentation labels, for clean and for corrupted data.

The operations, their parameters and their order are those of EDM's `AugmentPipe` (Karras et al. 2022,
App. C.4 (non-leaky augmentations), after StyleGAN2-ADA, Karras et al. 2020, App. B); the augmentation
label vector tells the network which transformation was applied, so that sampling with zero labels gives
un-augmented images.

Corrupted data (Daras et al. 2023). The original applied the augmentation to the image only, so warps and
flips moved pixels that were hidden by A onto observed positions. Here masks (A, Ã, ...; [N, 1 or C, H, W],
1 = observed) are transformed together with the image, with the same random parameters:
- pixel blitting (xflip, yflip, rotate_int, translate_int) permutes/gathers masks with the image's indices;
- a resampling warp or a colour transform marks an output element observed only if *every* input element
  with a nonzero weight in the composed linear map was observed. The missing indicator 1 - mask is pushed
  through the same chain with the absolute values of the filter taps and of the colour matrix (bilinear
  weights are nonnegative already), so any contributing missing element gives a positive value; samples of
  `grid_sample` that fall off the canvas, and the zero extension of the upsampling filter, count as missing.
  All terms are nonnegative, so "observed" is the exact test `value == 0` (no tolerance), and monotonicity
  gives Ã_aug <= A_aug whenever Ã <= A.
- no leak by construction: the image is set to zero where A (masks[0]) is 0 before any transformation
  (a select, so even inf/NaN hidden values cannot spread) and again where the transformed A is 0, so the
  output does not depend on hidden pixels at all, and images_aug == images_aug * A_aug.
The mask rule is conservative: the sym6 resampling chain reaches about 5 pixels (more where the warp
magnifies), so a warped sample loses every pixel within that distance of a hidden one. Warps suit box-like
masks; with per-pixel (dust) masks a warped sample ends up (almost) fully hidden, so use only the
pixel-blitting ops (xflip, yflip, rotate_int, translate_int) there.

Differences from EDM, all deliberate:
- samples that draw no geometric (resp. colour) transformation are passed through exactly instead of going
  through the sym6 up/down-sampling round trip (EDM filters every sample of the batch once any geometric op
  is enabled); this keeps their masks intact and makes p = 0 an exact identity;
- rotations and scalings turn about the exact image centre: the 2x grid is aligned with the sym6 filter's
  group delay (EDM assumes a symmetric filter and turns about a point 0.049 px off the centre);
- translate_int moves the content by +tx, +ty in both axes (EDM's index formula moves x by +tx, y by -ty);
- randomness comes from an explicit `generator` (None: torch's default generator, as in torch.rand), or from
  one generator per image, so that an image's augmentation does not depend on the batch it is in.

Augmentation label layout (EDM's): one block per *enabled* op (multiplier > 0), in this order, so the
layout and `label_dim` depend only on the configuration:

| op             | width | entries                                 |
|----------------|-------|-----------------------------------------|
| xflip          | 1     | w in {0, 1}                             |
| yflip          | 1     | w in {0, 1}                             |
| rotate_int     | 2     | [k in {1,2}, k in {2,3}] for k * 90 deg |
| translate_int  | 2     | tx / (W max), ty / (H max)              |
| scale          | 1     | log2(s) / scale_std                     |
| rotate_frac    | 2     | cos(theta) - 1, sin(theta)              |
| aniso          | 2     | w cos(r), w sin(r)                      |
| translate_frac | 2     | tx / (W std), ty / (H std)              |
| brightness     | 1     | b / brightness_std                      |
| contrast       | 1     | log2(c) / contrast_std                  |
| lumaflip       | 1     | w in {0, 1}                             |
| hue            | 2     | cos(theta) - 1, sin(theta)              |
| saturation     | 1     | log2(s) / saturation_std                |

EDM's training set (xflip, yflip, scale, rotate_frac, aniso, translate_frac) gives label_dim = 9; all
entries are zero for a sample left untouched.
"""

import inspect
import math

import torch
import torch.nn.functional as F

# Daubechies' least-asymmetric wavelet with 6 vanishing moments (sym6): decomposition low-pass filter.
# Orthonormal (sum = sqrt(2), unit norm, orthogonal to its even shifts), so downsample(upsample(x)) = x.
SYM6_LOWPASS = (
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
)
_HZ_PAD = len(SYM6_LOWPASS) // 4  # Extra border (pixels, per side) the warp computes before the final crop.

# Pixel p of the padded canvas (centred coordinates) sits at 2 p + _UP_OFFSET on the 2x grid made by
# `_upsample2x`, and output pixel o is read at 2 o + _UP_OFFSET by `_downsample2x_crop`: -0.5 plus the
# filter's DC group delay beyond index 5 (sum_k k h_k / sum_k h_k - 5 = 0.098). EDM takes the delay as 0,
# which turns rotations and scalings about a point 0.049 px off the centre; translations are unaffected.
_GROUP_DELAY = sum(k * h for k, h in enumerate(SYM6_LOWPASS)) / sum(SYM6_LOWPASS) - (len(SYM6_LOWPASS) // 2 - 1)
_UP_OFFSET = -0.5 + _GROUP_DELAY

# Samples of grid_sample closer than this (in pixels) to the canvas edge count as off-canvas; it absorbs
# rounding differences between our coordinate formula and grid_sample's own.
_EDGE_TOL = 1e-3

# Ops in EDM's order (the order of the label blocks), by kind.
BLIT_OPS = ('xflip', 'yflip', 'rotate_int', 'translate_int')
GEOMETRIC_OPS = ('scale', 'rotate_frac', 'aniso', 'translate_frac')
COLOUR_OPS = ('brightness', 'contrast', 'lumaflip', 'hue', 'saturation')
# Names of the label entries of the two-entry ops (the others have one, named after the op).
_LABEL_SUFFIXES = {
    'rotate_int': ('_x', '_y'), 'translate_int': ('_x', '_y'), 'rotate_frac': ('_cos', '_sin'),
    'aniso': ('_cos', '_sin'), 'translate_frac': ('_x', '_y'), 'hue': ('_cos', '_sin'),
}

#----------------------------------------------------------------------------
# Batched homogeneous matrices. Entries are Python numbers or [n] tensors; the result is [n or 1, R, R].

def _matrix(rows, device, dtype):
    entries = [torch.as_tensor(e, dtype=dtype, device=device).reshape(-1) for row in rows for e in row]
    n = max(e.numel() for e in entries)
    stacked = torch.stack([e.expand(n) for e in entries], dim=-1)
    return stacked.reshape(n, len(rows), len(rows[0]))


def translate2d(tx, ty, device=None, dtype=torch.float32):
    return _matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], device, dtype)


def scale2d(sx, sy, device=None, dtype=torch.float32):
    return _matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], device, dtype)


def rotate2d(theta, device=None, dtype=torch.float32):
    theta = torch.as_tensor(theta, dtype=dtype, device=device)
    c, s = theta.cos(), theta.sin()
    return _matrix([[c, -s, 0], [s, c, 0], [0, 0, 1]], device, dtype)


def translate3d(tx, ty, tz, device=None, dtype=torch.float32):
    return _matrix([[1, 0, 0, tx], [0, 1, 0, ty], [0, 0, 1, tz], [0, 0, 0, 1]], device, dtype)


def scale3d(sx, sy, sz, device=None, dtype=torch.float32):
    return _matrix([[sx, 0, 0, 0], [0, sy, 0, 0], [0, 0, sz, 0], [0, 0, 0, 1]], device, dtype)


def _luma_axis(device, dtype):
    return torch.tensor([1, 1, 1, 0], dtype=dtype, device=device) / math.sqrt(3)


def _rotate3d(axis, theta, device, dtype):
    """Rotation by `theta` about the unit 3-vector `axis` (Rodrigues' formula), as a 4x4 matrix."""
    vx, vy, vz = axis[0], axis[1], axis[2]
    c, s = theta.cos(), theta.sin()
    cc = 1 - c
    return _matrix([
        [vx * vx * cc + c, vx * vy * cc - vz * s, vx * vz * cc + vy * s, 0],
        [vy * vx * cc + vz * s, vy * vy * cc + c, vy * vz * cc - vx * s, 0],
        [vz * vx * cc - vy * s, vz * vy * cc + vx * s, vz * vz * cc + c, 0],
        [0, 0, 0, 1]], device, dtype)

#----------------------------------------------------------------------------
# Resampling with the sym6 filter; shared by images (taps h, zero extension) and missing indicators
# (taps |h|, extension by ones = "no data"). Explicit shifted sums rather than conv2d: every output is a
# plain sum of products on every device, so nonnegative inputs give exact zeros where nothing contributes.

def _correlate(x, taps, dim, stride, count):
    """out[i] = sum_k taps[k] * x[i * stride + k] along `dim`, for i < count (no padding)."""
    out = None
    for k, tap in enumerate(taps):
        index = [slice(None)] * x.ndim
        index[dim] = slice(k, k + (count - 1) * stride + 1, stride)
        term = x[tuple(index)] * tap
        out = term if out is None else out + term
    return out


def _upsample2x(x, dim, taps, pad_value):
    """2x upsampling along `dim`: zero insertion, then correlation with the reversed taps (EDM's layout)."""
    length = x.shape[dim]
    border = list(x.shape)
    border[dim] = len(taps) // 4
    ext = x.new_full(border, pad_value)
    x = torch.cat([ext, x, ext], dim=dim)
    z = torch.stack([x, torch.zeros_like(x)], dim=dim + 1).flatten(dim, dim + 1)
    return _correlate(z, taps[::-1], dim, stride=1, count=2 * length)


def _downsample2x_crop(y, dim, taps, count):
    """Strided correlation with the taps followed by EDM's crop of `_HZ_PAD` outputs on each side."""
    first = 2 * _HZ_PAD - (len(taps) - 1) // 2  # First input index of the first kept output.
    return _correlate(y.narrow(dim, first, y.shape[dim] - first), taps, dim, stride=2, count=count)


def _work_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _missing(masks, dtype):
    """Concatenate the missing indicators 1 - mask of several masks along channels."""
    return torch.cat([1 - m.to(dtype) for m in masks], dim=1)


def _split_observed(missing, masks):
    """Observed = nothing missing contributed; split back per mask, in each mask's dtype."""
    observed = missing <= 0
    sizes = [m.shape[1] for m in masks]
    return tuple(o.to(m.dtype) for o, m in zip(observed.split(sizes, dim=1), masks))


def geometric_warp(images, G_inv, masks=()):
    """Warp images [n, C, H, W] by per-sample 3x3 matrices G_inv [n, 3, 3] as EDM's AugmentPipe does.

    G_inv maps output pixel coordinates to input pixel coordinates (x right, y down, origin at the image
    centre). Execution (EDM): reflect padding wide enough for the warped footprint, 2x upsampling with the
    sym6 low-pass filter, bilinear `grid_sample` with zero padding, 2x sym6 downsampling, crop.
    `masks` (each [n, 1 or C, H, W], 1 = observed) come back as the set of output elements whose every
    contributing input element was observed (see the module docstring). Images are not re-masked here.
    """
    n, C, H, W = images.shape
    device, dtype = images.device, _work_dtype(images.dtype)
    x = images.to(dtype)
    G_inv = G_inv.to(device=device, dtype=dtype)
    taps = SYM6_LOWPASS
    abs_taps = tuple(abs(t) for t in taps)

    # Padding per side so the footprint of the output (plus the filter support) lies on the canvas.
    cx, cy = (W - 1) / 2, (H - 1) / 2
    corners = torch.tensor([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], dtype=dtype, device=device)
    cp = G_inv @ corners.t()  # [n, xyz, corner]
    px, py = cp[:, 0], cp[:, 1]
    need = torch.stack([(-px).max() - cx, (-py).max() - cy, px.max() - cx, py.max() - cy]) + 2 * _HZ_PAD
    limits = (W - 1, H - 1, W - 1, H - 1)  # Reflect padding cannot exceed the image size.
    mx0, my0, mx1, my1 = [min(max(math.ceil(v), 0), lim) for v, lim in zip(need.tolist(), limits)]
    G = translate2d((mx0 - mx1) / 2, (my0 - my1) / 2, device, dtype) @ G_inv

    # Coordinates on the 2x upsampled canvas and output, normalised to [-1, 1] for grid_sample.
    G = scale2d(2, 2, device, dtype) @ G @ scale2d(0.5, 0.5, device, dtype)
    offset = _UP_OFFSET
    G = translate2d(offset, offset, device, dtype) @ G @ translate2d(-offset, -offset, device, dtype)
    Hup, Wup = 2 * (H + my0 + my1), 2 * (W + mx0 + mx1)
    Hout, Wout = 2 * (H + 2 * _HZ_PAD), 2 * (W + 2 * _HZ_PAD)
    G = scale2d(2 / Wup, 2 / Hup, device, dtype) @ G @ scale2d(Wout / 2, Hout / 2, device, dtype)
    grid = F.affine_grid(G[:, :2, :], [n, C, Hout, Wout], align_corners=False)  # [n, Hout, Wout, xy]

    def chain(t, taps, pad_value, off_canvas=None):
        t = F.pad(t, [mx0, mx1, my0, my1], mode='reflect')
        t = _upsample2x(_upsample2x(t, 3, taps, pad_value), 2, taps, pad_value)
        t = F.grid_sample(t, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
        if off_canvas is not None:  # Off-canvas bilinear taps read grid_sample's zero padding: no data.
            t = t + off_canvas[:, None].to(t.dtype)
        return _downsample2x_crop(_downsample2x_crop(t, 3, taps, W), 2, taps, H)

    out = chain(x, taps, 0).to(images.dtype)
    if not masks:
        return out, ()
    with torch.no_grad():
        ix = ((grid[..., 0] + 1) * Wup - 1) / 2  # grid_sample's pixel coordinates (align_corners=False).
        iy = ((grid[..., 1] + 1) * Hup - 1) / 2
        off_canvas = (ix < _EDGE_TOL) | (ix > Wup - 1 - _EDGE_TOL) | (iy < _EDGE_TOL) | (iy > Hup - 1 - _EDGE_TOL)
        missing = chain(_missing(masks, dtype), abs_taps, 1, off_canvas)
    return out, _split_observed(missing, masks)


def colour_transform(images, M, masks=()):
    """Apply per-sample 4x4 affine colour matrices M [n, 4, 4] to RGB or grayscale images (as EDM).

    RGB: out = M[:3, :3] @ rgb + M[:3, 3]. Grayscale: the rows are averaged (EDM). For RGB images with
    per-channel masks, an output channel is observed only if every input channel with a nonzero
    coefficient is; single-channel masks (or grayscale images) are unchanged.
    """
    n, C, H, W = images.shape
    M = M.to(device=images.device, dtype=_work_dtype(images.dtype))
    flat = images.to(M.dtype).reshape(n, C, H * W)
    if C == 3:
        out = M[:, :3, :3] @ flat + M[:, :3, 3:]
    elif C == 1:
        M1 = M[:, :3, :].mean(dim=1, keepdim=True)
        out = flat * M1[:, :, :3].sum(dim=2, keepdim=True) + M1[:, :, 3:]
    else:
        raise ValueError(f'colour augmentation needs RGB (3 channels) or grayscale (1 channel) images, got '
                         f'{C} channels; disable brightness/contrast/lumaflip/hue/saturation for this data')
    out = out.reshape(n, C, H, W).to(images.dtype)
    new_masks = []
    for m in masks:
        if C == 3 and m.shape[1] == 3:
            with torch.no_grad():
                weight = M[:, :3, :3].abs()  # [n, out channel, in channel]
                missing = (1 - m.to(M.dtype)).reshape(n, 1, 3, H * W)
                spread = (weight[..., None] * missing).sum(dim=2)  # Explicit sum: exact zeros stay zero.
                m = (spread <= 0).reshape(n, 3, H, W).to(m.dtype)
        new_masks.append(m)
    return out, tuple(new_masks)

#----------------------------------------------------------------------------
# Pixel blitting: exact index permutations, applied identically to images and masks.

def _hide(images, mask):
    """Zero the hidden elements; a select rather than a product, so even inf/NaN hidden values vanish."""
    return torch.where(mask != 0, images, torch.zeros_like(images))


def _where_sample(cond, a, b):
    return torch.where(cond.reshape(-1, 1, 1, 1), a, b)


def _reflect_index(i, size):
    """Index of a reflected (mirror, edge not repeated) coordinate, for any integer i."""
    period = 2 * size - 2
    return size - 1 - (size - 1 - i % period).abs()


def translate_int_blit(x, tx, ty):
    """Integer translation with reflection at the borders: out[y, x] = in[y - ty, x - tx] (reflected)."""
    N, C, H, W = x.shape
    device = x.device
    xi = _reflect_index(torch.arange(W, device=device).reshape(1, 1, 1, W) - tx.reshape(N, 1, 1, 1), W)
    yi = _reflect_index(torch.arange(H, device=device).reshape(1, 1, H, 1) - ty.reshape(N, 1, 1, 1), H)
    b = torch.arange(N, device=device).reshape(N, 1, 1, 1)
    c = torch.arange(C, device=device).reshape(1, C, 1, 1)
    return x[b, c, yi, xi]

#----------------------------------------------------------------------------

class _Draws:
    """Random draws of shape [..., N] from one generator (or torch's default one), or from a list of N
    generators (sample i's column from generator i alone, so a sample's augmentation does not depend on its
    batch); returned on the images' device."""

    def __init__(self, generator, device, n):
        if isinstance(generator, (list, tuple)):
            if len(generator) != n or not all(isinstance(g, torch.Generator) for g in generator):
                raise ValueError(f'generator is a list of {len(generator)} items for {n} images; pass one '
                                 'torch.Generator per image, a single generator, or None')
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f'generator={generator!r} is invalid; pass a torch.Generator, a list of them, or None')
        self.generator = generator
        self.device = device

    def _draw(self, fn, shape):
        if isinstance(self.generator, (list, tuple)):
            column = tuple(shape[:-1]) + (1,)
            return torch.cat([fn(column, g, g.device).to(self.device) for g in self.generator], dim=-1)
        draw_device = self.generator.device if self.generator is not None else self.device
        return fn(tuple(shape), self.generator, draw_device).to(self.device)

    def rand(self, *shape):
        return self._draw(lambda s, g, d: torch.rand(s, generator=g, device=d), shape)

    def randn(self, *shape):
        return self._draw(lambda s, g, d: torch.randn(s, generator=g, device=d), shape)

    def randint(self, high, *shape):
        return self._draw(lambda s, g, d: torch.randint(high, s, generator=g, device=d), shape)


class AugmentPipe:
    """EDM's augmentation pipeline (Karras et al. 2022, App. C.4) with masks carried along; see module doc.

    Every op is applied to each sample independently with probability `multiplier * p`.
    `__call__(images, masks=(), generator=None) -> (images_aug, labels, masks_aug)`.
    """

    def __init__(self, p=1,
        xflip=0, yflip=0, rotate_int=0, translate_int=0, translate_int_max=0.125,
        scale=0, rotate_frac=0, aniso=0, translate_frac=0, scale_std=0.2, rotate_frac_max=1, aniso_std=0.2,
        aniso_rotate_prob=0.5, translate_frac_std=0.125,
        brightness=0, contrast=0, lumaflip=0, hue=0, saturation=0, brightness_std=0.2, contrast_std=0.5,
        hue_max=1, saturation_std=1,
    ):
        config = dict(locals())
        del config['self']
        for name, value in config.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ValueError(f'AugmentPipe {name}={value!r} is invalid; pass a finite number >= 0')
            setattr(self, name, float(value))
        if self.aniso_rotate_prob > 1:
            raise ValueError(f'AugmentPipe aniso_rotate_prob={aniso_rotate_prob!r} is not a probability; '
                             f'pass a value in [0, 1]')

    # Configuration ------------------------------------------------------------

    def to_dict(self):
        """Constructor arguments (JSON-serialisable); `AugmentPipe.from_dict(pipe.to_dict())` rebuilds it."""
        return {name: getattr(self, name) for name in _ARG_NAMES}

    @classmethod
    def from_dict(cls, config):
        unknown = sorted(set(config) - set(_ARG_NAMES))
        if unknown:
            raise ValueError(f'AugmentPipe.from_dict got unknown keys {unknown}; valid keys: {list(_ARG_NAMES)}')
        return cls(**config)

    def __repr__(self):
        args = [f'p={self.p:g}'] + [f'{name}={getattr(self, name):g}' for name in _ARG_NAMES
                                    if name != 'p' and getattr(self, name) != _DEFAULTS[name]]
        return f'AugmentPipe({", ".join(args)})'

    @property
    def label_names(self):
        """Names of the augmentation-label entries, in order (see the layout table in the module doc)."""
        names = []
        for op in BLIT_OPS + GEOMETRIC_OPS + COLOUR_OPS:
            if getattr(self, op) > 0:
                names += [op + suffix for suffix in _LABEL_SUFFIXES.get(op, ('',))]
        return names

    @property
    def label_dim(self):
        """Length of the augmentation label vector: the network's `augment_dim`."""
        return len(self.label_names)

    # Application --------------------------------------------------------------

    def __call__(self, images, masks=(), generator=None):
        """Augment images [N, C, H, W] and, with the same random parameters, masks [N, 1 or C, H, W].

        `masks[0]` is the observation mask A: the output image is zero wherever the augmented A is.
        The random draws do not depend on the masks or on the image values, so replaying the generator
        state reproduces the same transformation (e.g. for clean images in a diagnostic).
        Returns (images_aug, labels [N, label_dim] float32, tuple of augmented masks).
        """
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
            raise ValueError(f'images must be a floating-point tensor [N, C, H, W], got '
                             f'{getattr(images, "shape", type(images))}')
        N, C, H, W = images.shape
        masks = tuple(masks)
        for i, m in enumerate(masks):
            if not isinstance(m, torch.Tensor) or m.ndim != 4 or m.shape[0] != N or m.shape[1] not in (1, C) \
                    or tuple(m.shape[2:]) != (H, W):
                raise ValueError(f'masks[{i}] has shape {getattr(m, "shape", type(m))}; expected '
                                 f'[{N}, 1 or {C}, {H}, {W}] to match the images')
        if self.rotate_int > 0 and H != W:
            raise ValueError(f'rotate_int needs square images, got {H}x{W}; set rotate_int=0')
        if self.translate_int > 0 and min(H, W) < 2:
            raise ValueError(f'translate_int needs images of at least 2x2 pixels, got {H}x{W}')
        if any(getattr(self, op) > 0 for op in COLOUR_OPS) and C not in (1, 3):
            raise ValueError(f'colour augmentation needs 1 or 3 channels, got {C}; disable the colour ops')

        device = images.device
        draw = _Draws(generator, device, N)
        labels = []
        tensors = [_hide(images, masks[0]) if masks else images, *masks]  # No leak: hide first.
        tensors = self._blit(tensors, draw, labels)
        tensors = self._geometric(tensors, draw, labels)
        tensors = self._colour(tensors, draw, labels)
        images, masks = tensors[0], tuple(tensors[1:])
        if masks:
            images = _hide(images, masks[0])
        labels = [t.to(torch.float32).reshape(N, -1) for t in labels]
        labels = torch.cat(labels, dim=1) if labels else torch.zeros([N, 0], device=device)
        return images, labels, masks

    def _gate(self, draw, w, multiplier, *shape):
        """(w where the transform applies, else 0; the flags [shape]): each applies with probability multiplier·p."""
        applied = draw.rand(*shape) < multiplier * self.p
        return torch.where(applied, w, torch.zeros_like(w)), applied

    def _blit(self, tensors, draw, labels):
        N = tensors[0].shape[0]
        _, _, H, W = tensors[0].shape
        if self.xflip > 0:
            w = draw.randint(2, N)
            w, _ = self._gate(draw, w, self.xflip, N)
            tensors = [_where_sample(w == 1, t.flip(3), t) for t in tensors]
            labels.append(w)
        if self.yflip > 0:
            w = draw.randint(2, N)
            w, _ = self._gate(draw, w, self.yflip, N)
            tensors = [_where_sample(w == 1, t.flip(2), t) for t in tensors]
            labels.append(w)
        if self.rotate_int > 0:
            w = draw.randint(4, N)  # Quarter turns: flips then a transpose.
            w, _ = self._gate(draw, w, self.rotate_int, N)
            tensors = [_where_sample((w == 1) | (w == 2), t.flip(3), t) for t in tensors]
            tensors = [_where_sample((w == 2) | (w == 3), t.flip(2), t) for t in tensors]
            tensors = [_where_sample((w == 1) | (w == 3), t.transpose(2, 3), t) for t in tensors]
            labels += [(w == 1) | (w == 2), (w == 2) | (w == 3)]
        if self.translate_int > 0:
            w = draw.rand(2, N) * 2 - 1
            w, _ = self._gate(draw, w, self.translate_int, 1, N)
            tx = (w[0] * (W * self.translate_int_max)).round().to(torch.int64)
            ty = (w[1] * (H * self.translate_int_max)).round().to(torch.int64)
            tensors = [translate_int_blit(t, tx, ty) for t in tensors]
            labels += [tx / (W * self.translate_int_max), ty / (H * self.translate_int_max)]
        return tensors

    def _geometric(self, tensors, draw, labels):
        images = tensors[0]
        N, _, H, W = images.shape
        device = images.device
        G_inv = torch.eye(3, device=device).expand(N, 3, 3)
        warped = torch.zeros(N, dtype=torch.bool, device=device)
        enabled = False
        if self.scale > 0:
            w = draw.randn(N)
            w, applied = self._gate(draw, w, self.scale, N)
            s = torch.exp2(w * self.scale_std)
            G_inv = G_inv @ scale2d(1 / s, 1 / s, device)
            labels.append(w)
            warped, enabled = warped | applied, True
        if self.rotate_frac > 0:
            w = (draw.rand(N) * 2 - 1) * (math.pi * self.rotate_frac_max)
            w, applied = self._gate(draw, w, self.rotate_frac, N)
            G_inv = G_inv @ rotate2d(w, device)  # Inverse of a rotation by -w.
            labels += [w.cos() - 1, w.sin()]
            warped, enabled = warped | applied, True
        if self.aniso > 0:
            w = draw.randn(N)
            r = (draw.rand(N) * 2 - 1) * math.pi
            w, applied = self._gate(draw, w, self.aniso, N)
            r = torch.where(draw.rand(N) < self.aniso_rotate_prob, r, torch.zeros_like(r))
            s = torch.exp2(w * self.aniso_std)
            G_inv = G_inv @ rotate2d(-r, device) @ scale2d(1 / s, s, device) @ rotate2d(r, device)
            labels += [w * r.cos(), w * r.sin()]
            warped, enabled = warped | applied, True
        if self.translate_frac > 0:
            w = draw.randn(2, N)
            w, applied = self._gate(draw, w, self.translate_frac, N)
            G_inv = G_inv @ translate2d(-w[0] * (W * self.translate_frac_std),
                                        -w[1] * (H * self.translate_frac_std), device)
            labels += [w[0], w[1]]
            warped, enabled = warped | applied, True
        if not enabled or not bool(warped.any()):
            return tensors
        idx = warped.nonzero()[:, 0]
        images, masks = geometric_warp(tensors[0][idx], G_inv[idx], [t[idx] for t in tensors[1:]])
        return [t.index_copy(0, idx, u) for t, u in zip(tensors, (images, *masks))]

    def _colour(self, tensors, draw, labels):
        images = tensors[0]
        N = images.shape[0]
        device = images.device
        I4 = torch.eye(4, device=device)
        M = I4.expand(N, 4, 4)
        v = _luma_axis(device, torch.float32)
        vvT = torch.outer(v, v)
        coloured = torch.zeros(N, dtype=torch.bool, device=device)
        enabled = False
        if self.brightness > 0:
            w = draw.randn(N)
            w, applied = self._gate(draw, w, self.brightness, N)
            b = w * self.brightness_std
            M = translate3d(b, b, b, device) @ M
            labels.append(w)
            coloured, enabled = coloured | applied, True
        if self.contrast > 0:
            w = draw.randn(N)
            w, applied = self._gate(draw, w, self.contrast, N)
            c = torch.exp2(w * self.contrast_std)
            M = scale3d(c, c, c, device) @ M
            labels.append(w)
            coloured, enabled = coloured | applied, True
        if self.lumaflip > 0:
            w = draw.randint(2, N)
            w, applied = self._gate(draw, w, self.lumaflip, N)
            M = (I4 - 2 * vvT * w.reshape(N, 1, 1)) @ M  # Householder reflection of the luma axis.
            labels.append(w)
            coloured, enabled = coloured | applied, True
        if self.hue > 0:
            w = (draw.rand(N) * 2 - 1) * (math.pi * self.hue_max)
            w, applied = self._gate(draw, w, self.hue, N)
            M = _rotate3d(v, w, device, torch.float32) @ M
            labels += [w.cos() - 1, w.sin()]
            coloured, enabled = coloured | applied, True
        if self.saturation > 0:
            w = draw.randn(N)
            w, applied = self._gate(draw, w, self.saturation, N)
            s = torch.exp2(w * self.saturation_std).reshape(N, 1, 1)
            M = (vvT + (I4 - vvT) * s) @ M
            labels.append(w)
            coloured, enabled = coloured | applied, True
        if not enabled or not bool(coloured.any()):
            return tensors
        idx = coloured.nonzero()[:, 0]
        images, masks = colour_transform(tensors[0][idx], M[idx], [t[idx] for t in tensors[1:]])
        return [t.index_copy(0, idx, u) for t, u in zip(tensors, (images, *masks))]


_DEFAULTS = {name: param.default for name, param in inspect.signature(AugmentPipe).parameters.items()}
_ARG_NAMES = tuple(_DEFAULTS)
