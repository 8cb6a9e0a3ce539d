"""Random camera-shake (motion blur) kernels drawn from a torch.Generator.

Replaces the third-party `motionblur.py` used by the original Ambient Diffusion code (PIL line drawing,
NumPy global RNG, intensity passed through the Gaussian `kernel_std` option). Our model of camera shake:

1. a trajectory of T = 4k + 1 points sampled at equal time steps (uniform exposure), a planar random walk
   with constant speed whose total length is L = (k - 1) * (0.1 + 0.9 * intensity * U(0.5, 1)) pixels and
   whose heading starts in a uniform random direction and diffuses with a total standard deviation of
   intensity * pi radians, so both length and turning grow with `intensity`; intensity 0 gives a straight
   streak of 0.1 * (k - 1) pixels (close to a delta);
2. centred on its centre of mass and, if it leaves the k x k window, shrunk to fit inside it;
3. rasterised by bilinear splatting of the trajectory points onto the pixel grid (points are at most 1/4
   pixel apart, so the streak is continuous), then normalised to sum 1.

All randomness is drawn from the caller's `torch.Generator` on its device.
"""

import math
import numbers

import torch

__all__ = ['random_motion_kernel', 'random_motion_kernels', 'check_kernel_size', 'check_intensity']


def check_kernel_size(kernel_size, name='kernel_size'):
    """Return `kernel_size` as an int after checking it is odd and >= 1 (a centred window)."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, numbers.Integral) or kernel_size < 1 \
            or kernel_size % 2 == 0:
        raise ValueError(f'{name}={kernel_size!r} is invalid; pass an odd integer >= 1 (e.g. 9) so the kernel '
                         f'has a centre pixel')
    return int(kernel_size)


def check_intensity(intensity):
    """Return `intensity` as a float after checking it lies in [0, 1]."""
    if isinstance(intensity, bool) or not isinstance(intensity, numbers.Real) or not 0 <= intensity <= 1:
        raise ValueError(f'intensity={intensity!r} is outside [0, 1]; pass a motion-blur intensity in [0, 1] '
                         f'(0 = short straight streak, 1 = long shaky trajectory)')
    return float(intensity)


def random_motion_kernels(n, kernel_size, intensity, generator=None, device=None):
    """Draw `n` motion-blur kernels [n, k, k] (float32, >= 0, each summing to 1).

    Random numbers are drawn on `generator.device` (or `device` when `generator` is None, default CPU);
    the result is put on `device` (default: where it was drawn). The draws per call are a fixed number
    of tensors of shape [n, ...], so a kernel is a deterministic function of the generator state.
    """
    k = check_kernel_size(kernel_size)
    intensity = check_intensity(intensity)
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f'n={n!r} is invalid; pass the number of kernels as an integer >= 0')
    draw_device = generator.device if generator is not None else torch.device(device or 'cpu')
    device = torch.device(device) if device is not None else draw_device

    num_points = 4 * k + 1
    uniform = torch.rand(n, 2, generator=generator, device=draw_device)                   # [n, 2]
    turns = torch.randn(n, num_points - 1, generator=generator, device=draw_device)       # [n, T-1]

    length = (k - 1) * (0.1 + 0.9 * intensity * (0.5 + 0.5 * uniform[:, 0]))              # [n]
    # Heading diffusion scaled by 1/sqrt(T-1): the total turning has std intensity*pi whatever T is.
    heading = 2 * math.pi * uniform[:, 1:2] + torch.cumsum(turns, dim=1) * (intensity * math.pi / math.sqrt(num_points - 1))
    steps = (length / (num_points - 1))[:, None, None] * torch.stack([heading.cos(), heading.sin()], dim=-1)
    points = torch.cat([torch.zeros_like(steps[:, :1]), torch.cumsum(steps, dim=1)], dim=1)  # [n, T, 2]
    points = points - points.mean(dim=1, keepdim=True)

    # Shrink trajectories that leave the window; the clamp keeps k == 1 (radius 0) free of 0/0.
    radius = (k - 1) / 2
    extent = points.abs().amax(dim=(1, 2))                                                # [n]
    points = points * (radius / extent.clamp_min(max(radius, 1e-12)))[:, None, None]
    coords = (points + radius).clamp(0, k - 1)                                            # [n, T, 2] as (col, row)

    base = coords.floor()
    frac = coords - base
    base = base.long()
    upper = (base + 1).clamp(max=k - 1)       # where base == k - 1 the fraction is 0, so the clamp adds nothing
    col0, row0, col1, row1 = base[..., 0], base[..., 1], upper[..., 0], upper[..., 1]
    fc, fr = frac[..., 0], frac[..., 1]
    index = torch.cat([row0 * k + col0, row0 * k + col1, row1 * k + col0, row1 * k + col1], dim=1)
    weight = torch.cat([(1 - fr) * (1 - fc), (1 - fr) * fc, fr * (1 - fc), fr * fc], dim=1)
    kernels = torch.zeros(n, k * k, device=draw_device).scatter_add_(1, index, weight)
    kernels = kernels / kernels.sum(dim=1, keepdim=True)
    return kernels.reshape(n, k, k).to(device)


def random_motion_kernel(kernel_size, intensity, generator=None, device=None):
    """Draw one motion-blur kernel [k, k] (float32, >= 0, sums to 1); see `random_motion_kernels`."""
    return random_motion_kernels(1, kernel_size, intensity, generator=generator, device=device)[0]
