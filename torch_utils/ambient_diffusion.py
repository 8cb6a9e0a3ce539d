"""Corruption masks and forward operators of Ambient Diffusion (Daras et al. 2023, Sec. 3-4).

The one home of the dataset corruption A, its further corruption Ã = A ⊙ B, and the measurement operators
used for inverse problems; the dataset, the samplers, DPS, IF training and the IF pipeline all call it.

Conventions
- Masks are float32 0/1 tensors of shape [N, C, H, W], 1 = observed. A leading batch axis is required.
- p = `corruption_probability`, δ = `delta_probability`, both in [0, 1).
- `generator` is a `torch.Generator`, a list of N generators (sample i is drawn from generator i alone, so
  it does not depend on the batch it is in), or None (torch's default generator). Random numbers are drawn
  on the generator's device (or on `device` when there is none); results are put on `device` (default:
  the generator's device, else CPU).

Mask geometry, compared with the original (giannisdaras/ambient-diffusion `training/dataset.py` and
`torch_utils/ambient_diffusion.py`); box sides are ceil/int of a fraction of H (rows) and W (columns):

| pattern    | A (1 = observed)                             | B in Ã = A ⊙ B, original    | B, ours                      |
|------------|----------------------------------------------|-----------------------------|------------------------------|
| dust       | Bernoulli(1-p) per element; `mask_full_rgb`: | Bernoulli(1-δ), same        | same                         |
|            | one draw per pixel shared by all C channels  | sharing                     |                              |
|            | (original: channel 0 copied to 3 channels)   |                             |                              |
| box        | erase a ceil(pH) x ceil(pW) box, top-left    | a second box of the *same*  | an independent box of side   |
|            | uniform over the image, clipped at the       | size (δ ignored)            | ceil(δH) x ceil(δW);         |
|            | border (as the original)                     |                             | δ = 0 gives B = 1            |
| fixed_box  | erase an int(pH) x int(pW) box lying fully   | same size s, δ only an      | an independent fully-inside  |
|            | inside, start uniform over {0..H-s}          | on/off switch               | box of side int(δH) x int(δW)|
|            | (original: {0..H-s-1}, last row never hit)   |                             | δ = 0 gives B = 1            |
| keep_patch | observe only an s x s square, s =            | random sub-square of side   | same with side               |
|            | int((1-p)H), fully inside, start uniform     | int((1-δ)s), start over     | max(1, int((1-δ)s)), start   |
|            | over {0..H-s} (original crashed at p = 0)    | {0..s-s'-1} (crash at δ = 0)| over {0..s-s'}; δ = 0: Ã = A |

Box patterns share one mask over all channels; `mask_full_rgb` only affects `dust`. For non-square images
the original swapped the height and width bounds; here rows use H and columns use W. Sides are rounded with a
1e-9 tolerance, so that float error does not move an exact integer to the next one (the original's
int((1 - 0.8) * 10) is 1 and ceil(0.3 * 10) is 4; here they are 2 and 3).
"""

import abc
import math
import numbers

import torch
import torch.nn.functional as F

from torch_utils.misc import per_sample as _per_sample, rand as _rand, randint as _randint, randn as _randn, resolve_device as _resolve_device
from torch_utils.motion_blur import check_intensity, check_kernel_size, random_motion_kernels

MASK_PATTERNS = ('dust', 'box', 'fixed_box', 'keep_patch')
MASK_GEOMETRIES = ('ours', 'original')
OPERATOR_NAMES = ('dust', 'random_inpainting', 'box_masking', 'averaging', 'blurring', 'compressed_sensing')
BLUR_TYPES = ('gaussian', 'motion')

#----------------------------------------------------------------------------
# Validation and randomness helpers.

def _check_probability(name, value, allow_one=False):
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not is_number or not (0 <= value and (value <= 1 if allow_one else value < 1)):
        interval = '[0, 1]' if allow_one else '[0, 1)'
        hint = '' if allow_one else ' (1 would hide every pixel)'
        raise ValueError(f'{name}={value!r} is outside {interval}; pass a probability in {interval}{hint}')
    return float(value)


def _check_shape(shape):
    """Return `shape` as a tuple (N, C, H, W) of positive ints."""
    shape = tuple(shape)
    if len(shape) != 4 or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in shape):
        raise ValueError(f'shape={shape!r} is invalid; pass [N, C, H, W] with positive integers '
                         f'(add a leading batch axis for a single image)')
    return tuple(int(s) for s in shape)


def _check_mask(mask):
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4:
        raise ValueError(f'mask must be a tensor [N, C, H, W], got '
                         f'{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}')
    return mask.float()


def _floor_side(fraction, size):
    """int(fraction · size), tolerant to float error (int((1 - 0.8) * 10) would be 1)."""
    return math.floor(fraction * size + 1e-9)


def _ceil_side(fraction, size):
    """ceil(fraction · size), tolerant to float error (ceil(0.3 * 10) would be 4)."""
    return math.ceil(fraction * size - 1e-9)


def _box(height, width, top, left, box_h, box_w):
    """Indicator [N, 1, H, W] (bool) of per-sample boxes rows [top, top+box_h) x cols [left, left+box_w).

    Parts of a box outside the image are clipped. `top`, `left` are [N] tensors; sides are ints or [N].
    """
    device = top.device
    rows = torch.arange(height, device=device)[None, :]                                   # [1, H]
    cols = torch.arange(width, device=device)[None, :]                                    # [1, W]
    box_h = torch.as_tensor(box_h, device=device).reshape(-1, 1)
    box_w = torch.as_tensor(box_w, device=device).reshape(-1, 1)
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + box_h)                     # [N, H]
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + box_w)                   # [N, W]
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]

#----------------------------------------------------------------------------
# Mask patterns (functional API).

def dust_mask(shape, corruption_probability, mask_full_rgb=False, generator=None, device=None):
    """Random inpainting mask: each element observed with probability 1 - p (i.i.d. Bernoulli).

    With `mask_full_rgb` a pixel is observed or missing in all its channels together (one draw per pixel).
    """
    n, c, h, w = _check_shape(shape)
    p = _check_probability('corruption_probability', corruption_probability)
    draw_shape = (n, 1, h, w) if mask_full_rgb else (n, c, h, w)
    mask = (_rand(draw_shape, generator, device) >= p).float()                           # P(U >= p) = 1 - p
    return mask.expand(n, c, h, w).contiguous()


def box_mask(shape, size_fraction, generator=None, device=None):
    """Mask that is 0 inside a random box of side ceil(f·H) x ceil(f·W), f = `size_fraction`.

    The top-left corner is uniform over all pixels and the box is clipped at the border (original geometry).
    """
    n, c, h, w = _check_shape(shape)
    f = _check_probability('size_fraction', size_fraction)
    top = _randint(h, n, generator, device)
    left = _randint(w, n, generator, device)
    box = _box(h, w, top, left, _ceil_side(f, h), _ceil_side(f, w))
    return (~box).float().expand(n, c, h, w).contiguous()


def fixed_box_mask(shape, size_fraction, generator=None, device=None, original=False):
    """Mask that is 0 inside a box of side int(f·H) x int(f·W) lying fully inside the image.

    The start is uniform over {0..H-s} inclusive, so the box can touch the last row and column; `original`: over
    {0..H-s-1}, as the original drew it (the last row and column are never hidden when s < H).
    """
    n, c, h, w = _check_shape(shape)
    f = _check_probability('size_fraction', size_fraction)
    box_h, box_w = _floor_side(f, h), _floor_side(f, w)
    end = 0 if original else 1
    top = _randint(max(h - box_h + end, 1), n, generator, device)
    left = _randint(max(w - box_w + end, 1), n, generator, device)
    return (~_box(h, w, top, left, box_h, box_w)).float().expand(n, c, h, w).contiguous()


def keep_patch_mask(shape, size_fraction, generator=None, device=None):
    """Mask that is 1 only inside a box of side int(f·H) x int(f·W) lying fully inside the image.

    Here `size_fraction` f is the *kept* side fraction; the `keep_patch` pattern uses f = 1 - p.
    The start is uniform over {0..H-s} inclusive.
    """
    n, c, h, w = _check_shape(shape)
    if isinstance(size_fraction, bool) or not isinstance(size_fraction, numbers.Real) or not 0 < size_fraction <= 1:
        raise ValueError(f'size_fraction={size_fraction!r} is outside (0, 1]; pass the side of the kept square '
                         f'as a fraction of the image side')
    box_h, box_w = _floor_side(size_fraction, h), _floor_side(size_fraction, w)
    if box_h < 1 or box_w < 1:
        raise ValueError(f'size_fraction={size_fraction!r} keeps a {box_h}x{box_w} patch of a {h}x{w} image; '
                         f'pass size_fraction >= {1 / min(h, w):.4g} so at least one pixel is observed')
    top = _randint(h - box_h + 1, n, generator, device)
    left = _randint(w - box_w + 1, n, generator, device)
    return _box(h, w, top, left, box_h, box_w).float().expand(n, c, h, w).contiguous()


def hat_dust_mask(mask, delta_probability, mask_full_rgb=False, generator=None):
    """Ã = A ⊙ B with B ~ Bernoulli(1 - δ) (same channel sharing as A); on the mask's device."""
    mask = _check_mask(mask)
    return mask * dust_mask(mask.shape, delta_probability, mask_full_rgb, generator, device=mask.device)


def hat_box_mask(mask, delta_probability, generator=None):
    """Ã = A ⊙ B with B an independent `box_mask` of side fraction δ (δ = 0 gives Ã = A)."""
    mask = _check_mask(mask)
    return mask * box_mask(mask.shape, delta_probability, generator, device=mask.device)


def hat_fixed_box_mask(mask, delta_probability, generator=None):
    """Ã = A ⊙ B with B an independent `fixed_box_mask` of side fraction δ (δ = 0 gives Ã = A)."""
    mask = _check_mask(mask)
    return mask * fixed_box_mask(mask.shape, delta_probability, generator, device=mask.device)


def hat_keep_patch_mask(mask, delta_probability, generator=None, original=False):
    """Ã keeps a random sub-box of A's kept box, of side max(1, int((1 - δ)·s)) per dimension.

    The kept box of each sample is read from `mask` (the bounding box of its observed pixels), and the
    sub-box start is uniform over {0..s-s'} inclusive relative to it (δ = 0 gives Ã = A); `original`: over
    {0..s-s'-1}, as the original drew it (where it crashed, s' = s, the start is 0).
    """
    mask = _check_mask(mask)
    delta = _check_probability('delta_probability', delta_probability)
    n, c, h, w = mask.shape
    observed = mask.amax(dim=1) > 0                                                      # [N, H, W]
    rows, cols = observed.any(dim=2), observed.any(dim=1)                                # [N, H], [N, W]
    side_h, side_w = rows.sum(dim=1), cols.sum(dim=1)                                    # [N]
    if bool((side_h == 0).any()):
        raise ValueError('mask has a sample with no observed pixel; a keep_patch mask must observe a patch')
    top, left = rows.int().argmax(dim=1), cols.int().argmax(dim=1)                       # first observed row/col
    # Float64 with the tolerance of `_floor_side`, so that the side equals _floor_side(1 - δ, s).
    hat_h = ((1 - delta) * side_h.double() + 1e-9).floor().long().clamp_min(1)
    hat_w = ((1 - delta) * side_w.double() + 1e-9).floor().long().clamp_min(1)
    u = _rand((n, 2), generator, mask.device).double()                                   # [N, 2]
    span_h, span_w = side_h - hat_h, side_w - hat_w
    if original:
        span_h, span_w = (span_h - 1).clamp_min(0), (span_w - 1).clamp_min(0)
    off_h = torch.minimum((u[:, 0] * (span_h + 1)).floor().long(), span_h)
    off_w = torch.minimum((u[:, 1] * (span_w + 1)).floor().long(), span_w)
    sub = _box(h, w, top + off_h, left + off_w, hat_h, hat_w).float()
    return mask * sub

#----------------------------------------------------------------------------
# Dataset corruption A and its further corruption Ã.

class MaskCorruption:
    """A dataset corruption A (mask) and its further corruption Ã = A ⊙ B (Daras et al. 2023, Sec. 3)."""

    def __init__(self, pattern='dust', corruption_probability=0.0, delta_probability=0.0, mask_full_rgb=False,
                 geometry='ours'):
        if pattern not in MASK_PATTERNS:
            raise ValueError(f'pattern={pattern!r} is unknown; pass one of {", ".join(MASK_PATTERNS)}')
        if geometry not in MASK_GEOMETRIES:
            raise ValueError(f'geometry={geometry!r} is unknown; pass one of {", ".join(MASK_GEOMETRIES)}')
        # 'original': the box patterns as the original drew them (the table above): box B of A's size, fixed_box
        # starts short of the last row and δ only switches B on, keep_patch sub-boxes short of the far edge.
        self.geometry = geometry
        self.pattern = pattern
        self.corruption_probability = _check_probability('corruption_probability', corruption_probability)
        self.delta_probability = _check_probability('delta_probability', delta_probability)
        self.mask_full_rgb = bool(mask_full_rgb)

    def sample_mask(self, shape, generator=None, device=None):
        """Draw A [N, C, H, W] (float32, 1 = observed)."""
        p = self.corruption_probability
        if self.pattern == 'dust':
            return dust_mask(shape, p, self.mask_full_rgb, generator, device)
        if self.pattern == 'box':
            return box_mask(shape, p, generator, device)
        if self.pattern == 'fixed_box':
            return fixed_box_mask(shape, p, generator, device, original=self.geometry == 'original')
        _, _, h, w = _check_shape(shape)
        side_h, side_w = _floor_side(1 - p, h), _floor_side(1 - p, w)
        if side_h < 1 or side_w < 1:
            raise ValueError(f'corruption_probability={p!r} leaves a {side_h}x{side_w} patch of a {h}x{w} image '
                             f'for keep_patch; pass corruption_probability <= {1 - 1 / min(h, w):.4g} so at '
                             f'least one pixel is observed')
        return keep_patch_mask(shape, 1 - p, generator, device)

    def sample_hat_mask(self, mask, generator=None):
        """Draw B and return Ã = A ⊙ B for the given A (on A's device)."""
        delta, original = self.delta_probability, self.geometry == 'original'
        if self.pattern == 'dust':
            return hat_dust_mask(mask, delta, self.mask_full_rgb, generator)
        if self.pattern == 'box':
            return hat_box_mask(mask, self.corruption_probability if original else delta, generator)
        if self.pattern == 'fixed_box':
            if original:  # a second box of A's size, when δ > 0
                mask = _check_mask(mask)
                return mask * fixed_box_mask(mask.shape, self.corruption_probability, generator, mask.device,
                                             original=True) if delta > 0 else mask.clone()
            return hat_fixed_box_mask(mask, delta, generator)
        return hat_keep_patch_mask(mask, delta, generator, original=original)

    def sample_sampling_mask(self, shape, generator=None, device=None):
        """Draw a mask distributed like Ã (A, then Ã from it), e.g. the fixed mask of the ambient sampler."""
        return self.sample_hat_mask(self.sample_mask(shape, generator, device), generator)

    @property
    def survival_probability(self):
        """P(a pixel is observed in Ã) = (1-p)(1-δ) for dust; None for box patterns (not a per-pixel rate)."""
        if self.pattern != 'dust':
            return None
        return (1 - self.corruption_probability) * (1 - self.delta_probability)

    def to_dict(self):
        d = dict(pattern=self.pattern, corruption_probability=self.corruption_probability,
                 delta_probability=self.delta_probability, mask_full_rgb=self.mask_full_rgb)
        if self.geometry != 'ours':  # recorded only when it differs, so older records still compare equal
            d['geometry'] = self.geometry
        return d

    @classmethod
    def from_dict(cls, d):
        keys = ('pattern', 'corruption_probability', 'delta_probability', 'mask_full_rgb', 'geometry')
        unknown = sorted(set(d) - set(keys))
        if unknown:
            raise ValueError(f'unknown MaskCorruption keys {unknown}; valid keys are {", ".join(keys)}')
        return cls(**d)

    def __eq__(self, other):
        return isinstance(other, MaskCorruption) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return f'MaskCorruption({", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())})'


def get_mask_corruption(pattern='dust', corruption_probability=0.0, delta_probability=0.0, mask_full_rgb=False):
    """The dataset corruption named by the training options (counterpart of `get_operator`)."""
    return MaskCorruption(pattern, corruption_probability, delta_probability, mask_full_rgb)

#----------------------------------------------------------------------------
# Forward operators for inverse problems (measurements y = 𝒜(x)) and their further corruption Ã.

class ForwardOperator(abc.ABC):
    """A measurement operator 𝒜 with per-sample random parameters, and its further corruption Ã.

    Parameters are tensors with a leading batch axis N; `apply` is differentiable in x and works for any
    device and floating dtype of x (parameters are cast to x's device and dtype).
    """
    measurement_is_image = True     # whether y has x's shape

    @abc.abstractmethod
    def sample_params(self, shape, generator=None, device=None):
        """Draw per-sample operator parameters for images of `shape` [N, C, H, W]."""

    @abc.abstractmethod
    def apply(self, x, params):
        """y = 𝒜(x) for images x [N, C, H, W]."""

    @abc.abstractmethod
    def sample_hat_params(self, params, generator=None):
        """Parameters of Ã from those of A (Ãx is a function of Ax)."""

    @abc.abstractmethod
    def naive_inverse(self, y, params):
        """A simple x-shaped estimate from y (zero-filled, upsampled or pseudo-inverse baseline)."""

    def corrupt(self, x, params=None, generator=None):
        """Return (𝒜(x), params), drawing params on x's device when not given."""
        if params is None:
            params = self.sample_params(x.shape, generator, device=x.device)
        return self.apply(x, params), params

    def hat_corrupt(self, x, params=None, hat_params=None, generator=None):
        """Return (Ã(x), hat_params), drawing A's and then Ã's params when not given."""
        if hat_params is None:
            if params is None:
                params = self.sample_params(x.shape, generator, device=x.device)
            hat_params = self.sample_hat_params(params, generator)
        return self.apply(x, hat_params), hat_params

    def __repr__(self):
        args = ', '.join(f'{k}={v!r}' for k, v in vars(self).items() if not isinstance(v, torch.Tensor))
        return f'{type(self).__name__}({args})'


class _MaskOperator(ForwardOperator):
    """Inpainting y = x ⊙ A with A from a `MaskCorruption`; params = the mask A."""

    def __init__(self, corruption):
        self.corruption = corruption

    def sample_params(self, shape, generator=None, device=None):
        return self.corruption.sample_mask(shape, generator, device)

    def apply(self, x, params):
        return x * params.to(x.device, x.dtype)

    def sample_hat_params(self, params, generator=None):
        return self.corruption.sample_hat_mask(params, generator)

    def naive_inverse(self, y, params):
        return y * params.to(y.device, y.dtype)                                           # zero-filled


class RandomInpainting(_MaskOperator):
    """Random inpainting: each pixel (all channels with `mask_full_rgb`) missing with probability p."""

    def __init__(self, corruption_probability, delta_probability=0.0, mask_full_rgb=True):
        super().__init__(MaskCorruption('dust', corruption_probability, delta_probability, mask_full_rgb))


class BoxInpainting(_MaskOperator):
    """Box inpainting: a random ceil(pH) x ceil(pW) box is missing (clipped at the border)."""

    def __init__(self, corruption_probability, delta_probability=0.0):
        super().__init__(MaskCorruption('box', corruption_probability, delta_probability))


def _check_factor(factor, shape=None):
    if isinstance(factor, bool) or not isinstance(factor, numbers.Integral) or factor < 1:
        raise ValueError(f'downsampling_factor={factor!r} is invalid; pass an integer >= 1')
    if shape is not None and (shape[-2] % factor or shape[-1] % factor):
        raise ValueError(f'downsampling_factor={factor} does not divide the image size {shape[-2]}x{shape[-1]}; '
                         f'pass a factor that divides both H and W')
    return int(factor)


class Averaging(ForwardOperator):
    """Downsampling by `downsampling_factor` (block mean, then nearest upsampling back to H x W).

    Each image is averaged with probability p (params = flags m [N, 1, 1, 1]); y = m·up(pool(x)) + (1-m)·x.
    The original defaulted p to 0.4 for inverse problems, leaving most measurements clean; here p = 1.
    Ã averages every image.
    """

    def __init__(self, downsampling_factor=8, corruption_probability=1.0):
        self.downsampling_factor = _check_factor(downsampling_factor)
        self.corruption_probability = _check_probability('corruption_probability', corruption_probability,
                                                         allow_one=True)

    def sample_params(self, shape, generator=None, device=None):
        shape = _check_shape(shape)
        _check_factor(self.downsampling_factor, shape)
        return (_rand((shape[0], 1, 1, 1), generator, device) < self.corruption_probability).float()

    def apply(self, x, params):
        f = _check_factor(self.downsampling_factor, x.shape)
        upsampled = F.avg_pool2d(x, f).repeat_interleave(f, dim=2).repeat_interleave(f, dim=3)
        m = params.to(x.device, x.dtype)
        return m * upsampled + (1 - m) * x

    def sample_hat_params(self, params, generator=None):
        return torch.ones_like(params)

    def naive_inverse(self, y, params):
        return y


class CompressedSensing(ForwardOperator):
    """Gaussian compressed sensing y = Φ vec(x) with a per-sample Φ of m rows, entries N(0, 1/m).

    params = Φ stored as [N, m, C, H, W] (row i is an image-shaped measurement pattern; flattened it is the
    [N, m, C·H·W] matrix). Ã drops one random row of Φ and appends a fresh N(0, 1/m) row.
    """
    measurement_is_image = False

    def __init__(self, num_measurements=32):
        m = num_measurements
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 2:
            raise ValueError(f'num_measurements={m!r} is invalid; pass an integer >= 2 '
                             f'(Ã drops one of the m measurements)')
        self.num_measurements = int(m)

    def sample_params(self, shape, generator=None, device=None):
        n, c, h, w = _check_shape(shape)
        m = self.num_measurements
        if m > c * h * w:
            raise ValueError(f'num_measurements={m} exceeds the image dimension C·H·W = {c * h * w}; '
                             f'pass num_measurements <= {c * h * w}')
        return _randn((n, m, c, h, w), generator, device) / math.sqrt(m)

    def apply(self, x, params):
        if params.shape[0] != x.shape[0] or params.shape[2:] != x.shape[1:]:
            raise ValueError(f'Φ of shape {tuple(params.shape)} does not fit images of shape {tuple(x.shape)}')
        return torch.einsum('nmchw,nchw->nm', params.to(x.device, x.dtype), x)           # [N, m]

    def sample_hat_params(self, params, generator=None):
        n, m = params.shape[:2]
        dropped = _randint(m, n, generator, params.device)                               # [N]
        fresh = _randn((n, 1, *params.shape[2:]), generator, params.device) / math.sqrt(m)
        keep = torch.arange(m - 1, device=params.device)[None, :]
        keep = keep + (keep >= dropped[:, None]).long()                                  # [N, m-1], order kept
        kept = params[torch.arange(n, device=params.device)[:, None], keep]              # [N, m-1, C, H, W]
        return torch.cat([kept, fresh.to(params.dtype)], dim=1)

    def naive_inverse(self, y, params):
        """Minimum-norm least-squares solution x̂ = pinv(Φ) y (so Φ x̂ = y when Φ has full row rank)."""
        phi = params.to(y.device, y.dtype).flatten(2)                                    # [N, m, D]
        x_hat = torch.linalg.pinv(phi) @ y[:, :, None]                                   # [N, D, 1]
        return x_hat.reshape(params.shape[0], *params.shape[2:])


class _Blur(ForwardOperator):
    """Blur by a per-sample kernel, depthwise over channels, with reflect padding.

    params = kernels [N, R, k, k] applied one after the other (R = 1 for A). Ã blurs once more with the
    last kernel (R + 1), so Ãx is a function of Ax. The convolution is a correlation, as torch's conv2d
    and the original's `Blurkernel`.
    """

    def apply(self, x, params):
        n, c, h, w = x.shape
        kernels = params.to(x.device, x.dtype)
        k = kernels.shape[-1]
        if k // 2 >= h or k // 2 >= w:
            raise ValueError(f'kernel_size={k} is too large for {h}x{w} images (reflect padding needs '
                             f'kernel_size // 2 < H and W); pass kernel_size <= {2 * min(h, w) - 1}')
        for r in range(kernels.shape[1]):
            padded = F.pad(x.reshape(1, n * c, h, w), (k // 2,) * 4, mode='reflect')
            weight = kernels[:, r].repeat_interleave(c, dim=0)[:, None]                  # [N*C, 1, k, k]
            x = F.conv2d(padded, weight, groups=n * c).reshape(n, c, h, w)
        return x

    def sample_hat_params(self, params, generator=None):
        return torch.cat([params, params[:, -1:]], dim=1)

    def naive_inverse(self, y, params):
        return y


def downsample(x, factor):
    """Block means over factor x factor pixels (the averaging operator's measurement): [N, C, H/f, W/f]."""
    _check_factor(factor, x.shape)
    return F.avg_pool2d(x, factor)


def upsample_bicubic(y, factor):
    """Bicubic upsampling by `factor` (SR3's conditioning and the usual super-resolution baseline)."""
    return F.interpolate(y, scale_factor=factor, mode='bicubic', align_corners=False)


def gaussian_kernel(kernel_size, kernel_std, dtype=torch.float32):
    """Normalised 2-D Gaussian exp(-d²/2σ²) over a k x k window ([k, k], computed in float64, returned as `dtype`).

    Equals scipy.ndimage.gaussian_filter of a centred delta when its radius int(4σ + 0.5) equals k // 2.
    """
    k = check_kernel_size(kernel_size)
    if isinstance(kernel_std, bool) or not isinstance(kernel_std, numbers.Real) or not 0 < kernel_std < math.inf:
        raise ValueError(f'kernel_std={kernel_std!r} is invalid; pass a blur standard deviation > 0 (in pixels)')
    d = torch.arange(k, dtype=torch.float64) - k // 2
    g = torch.exp(-d ** 2 / (2 * float(kernel_std) ** 2))
    g = g / g.sum()
    return torch.outer(g, g).to(dtype)


class GaussianBlur(_Blur):
    """Gaussian blur with a fixed k x k kernel of std `kernel_std` (the same kernel for every sample)."""

    def __init__(self, kernel_size=9, kernel_std=3.0):
        self.kernel = gaussian_kernel(kernel_size, kernel_std)                           # [k, k]
        self.kernel_size = int(kernel_size)
        self.kernel_std = float(kernel_std)

    def sample_params(self, shape, generator=None, device=None):
        """The fixed kernel for each sample, [N, 1, k, k]; the Gaussian blur has no random parameter."""
        n = _check_shape(shape)[0]
        return self.kernel.to(_resolve_device(generator, device)).expand(n, 1, -1, -1).contiguous()


class MotionBlur(_Blur):
    """Motion blur with a random camera-shake kernel per sample (`torch_utils.motion_blur`).

    The original passed the Gaussian `kernel_std` as the motion intensity (crashing above 1); here the
    intensity in [0, 1] is its own option.
    """

    def __init__(self, kernel_size=9, intensity=0.5):
        self.kernel_size = check_kernel_size(kernel_size)
        self.intensity = check_intensity(intensity)

    def sample_params(self, shape, generator=None, device=None):
        n = _check_shape(shape)[0]
        def draw(count, g, d):
            return random_motion_kernels(count, self.kernel_size, self.intensity, g, d)
        return _per_sample(draw, n, generator, device)[:, None]                         # [N, 1, k, k]


def get_operator(name, corruption_probability=None, delta_probability=0.0, mask_full_rgb=True,
                 downsampling_factor=8, blur_type='gaussian', kernel_size=9, kernel_std=3.0,
                 num_measurements=32, intensity=0.5):
    """The forward operator named by the inverse-problem options.

    `corruption_probability` None means the operator's default: 0 for the masks, 1 for averaging (every
    image downsampled). Options that do not belong to the named operator are not used by it.
    """
    if name in ('dust', 'random_inpainting'):
        return RandomInpainting(corruption_probability or 0.0, delta_probability, mask_full_rgb)
    if name == 'box_masking':
        return BoxInpainting(corruption_probability or 0.0, delta_probability)
    if name == 'averaging':
        return Averaging(downsampling_factor, 1.0 if corruption_probability is None else corruption_probability)
    if name == 'compressed_sensing':
        return CompressedSensing(num_measurements)
    if name == 'blurring':
        if blur_type == 'gaussian':
            return GaussianBlur(kernel_size, kernel_std)
        if blur_type == 'motion':
            return MotionBlur(kernel_size, intensity)
        raise ValueError(f'blur_type={blur_type!r} is unknown; pass one of {", ".join(BLUR_TYPES)}')
    raise ValueError(f'operator name={name!r} is unknown; pass one of {", ".join(OPERATOR_NAMES)}')
