"""Variational Diffusion Models (Kingma et al. 2021): noise schedules γ(t), the variational bound in bits/dim, and
its estimate for any denoiser.

Notation. z_t = α_t x + σ_t ε, α_t² = sigmoid(−γ(t)), σ_t² = sigmoid(γ(t)), SNR(t) = exp(−γ(t)), t ∈ [0, 1], γ
increasing. In the σ-form the other networks and samplers use, x_σ = z_t/α_t at σ = exp(γ/2): a denoiser
D(x_σ; σ) gives ε̂ = (x_σ − D)/σ, so the bound below applies to every network of the codebase
(`denoiser_eps`), and the VDM network (`networks.VDMPrecond`) is a denoiser for every sampler.

Data: pixel k ∈ {0..255} is the point x_k = (2k + 1)/256 − 1 (`level_values`), not k/127.5 − 1.

−VLB(x) = prior + reconstruction + diffusion (`vlb_terms`, nats per image; bits/dim = nats/(D·ln 2)):
- prior: KL(q(z_1|x) ‖ N(0, I)) = ½ Σ_i (σ_1² + α_1² x_i² − 1 − log σ_1²);
- reconstruction: E_{q(z_0|x)}[−log p(x|z_0)], with p(x_i = x_k | z_0) ∝ exp(−(z_0,i − α_0 x_k)²/(2σ_0²)) over the
  256 values of each dimension;
- diffusion, continuous time: ½·E_{t~U(0,1)}[γ'(t)·‖ε − ε̂(z_t; t)‖²], γ'(t) by autograd (the derivative of
  whatever γ is, not γ_max − γ_min); discrete time with T steps (t = i/T, s = (i − 1)/T, i ~ U{1..T}):
  (T/2)·E[expm1(γ_t − γ_s)·‖ε − ε̂(z_t; t)‖²], which is a different expression, not the continuous one at t = i/T.

Schedules (`NoiseSchedule`): γ(t) = γ_0 + (γ_1 − γ_0)·f(t) with f(0) = 0, f(1) = 1, f increasing.
'fixed_linear': f(t) = t, γ_0 = gamma_min, γ_1 = gamma_max. 'learned_linear': the same with γ_0 and γ_1 learned.
'learned': VDM's monotone network, f = (h(t) − h(0))/(h(1) − h(0)), h(t) = a·t + (1/H)·Σ_j c_j·sigmoid(w_j(2t − 1)
+ b_j) with a, c_j, w_j > 0 (softplus of the raw parameters), so γ is increasing for every value of them.

Training the schedule. In continuous time E[diffusion] depends on γ only through γ_0 and γ_1 (substitute
v = γ(t)), so the endpoints are trained on the bound, like the network, and the shape f is trained to minimise
the variance of the estimator (VDM App. I.2): since its mean does not depend on f, ∂Var/∂f = ∂E[L_d²]/∂f =
E[2·L_d·∂L_d/∂f]. One backward pass does both: the gradient reaching f(t_i) and f'(t_i) of sample i is multiplied
by 2·L_d,i (`_VarianceGradient`), where L_d,i is that sample's diffusion term in bits/dim. This holds in
continuous time; with discrete T the bound's mean depends on f too, and f is trained on the bound.

Time sampling (`sample_times`): 'uniform' (independent t), 'antithetic' (pairs t, 1 − t) or 'low_discrepancy'
(VDM's t_i = (u + i/n) mod 1 over a batch of n). All three have uniform marginals, so the estimate is unbiased.
"""

import math

import torch
import torch.nn.functional as F

from torch_utils import misc

SCHEDULES = ('fixed_linear', 'learned_linear', 'learned')
T_SAMPLINGS = ('low_discrepancy', 'antithetic', 'uniform')
TERMS = ('prior', 'reconstruction', 'diffusion')
NUM_VALUES = 256
LN2 = math.log(2)
_RECON_CHUNK = 1 << 18  # dimensions per chunk of the [dims, 256] reconstruction logits


def check_gamma_range(gamma_min, gamma_max):
    if not (math.isfinite(gamma_min) and math.isfinite(gamma_max) and gamma_min < gamma_max):
        raise ValueError(f'gamma_min={gamma_min}, gamma_max={gamma_max}: expected finite gamma_min < gamma_max '
                         '(VDM uses -13.3 and 5)')


def check_T(T):
    if T is not None and (isinstance(T, bool) or not isinstance(T, int) or T < 1):
        raise ValueError(f'T={T!r}: expected an integer number of steps >= 1 (or none for continuous time)')


# ----------------------------------------------------------------------------
# Schedules.


def _inverse_softplus(y):
    return y + torch.log(-torch.expm1(-y))


class GradientScale:
    """The per-sample factor of `_VarianceGradient`, set after the forward pass, once the per-sample losses are
    known (a plain object, so that DDP's input copying leaves it as it is)."""

    def __init__(self):
        self.scale = None


class _VarianceGradient(torch.autograd.Function):
    """Identity whose backward multiplies the incoming gradient by holder.scale (per sample)."""

    @staticmethod
    def forward(ctx, value, holder):
        ctx.holder = holder
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        scale = ctx.holder.scale
        if scale is None:
            raise RuntimeError('the schedule\'s variance gradient needs holder.scale set before backward')
        return grad * scale.detach().to(grad.dtype).reshape(grad.shape), None


class NoiseSchedule(torch.nn.Module):
    """γ(t) on t ∈ [0, 1] (see the module docstring): kind 'fixed_linear', 'learned_linear' or 'learned'."""

    def __init__(self, kind='fixed_linear', gamma_min=-13.3, gamma_max=5.0, hidden=1024):
        super().__init__()
        if kind not in SCHEDULES:
            raise ValueError(f'schedule={kind!r}: expected one of {", ".join(SCHEDULES)}')
        check_gamma_range(gamma_min, gamma_max)
        self.kind, self.gamma_min, self.gamma_max, self.hidden = kind, float(gamma_min), float(gamma_max), int(hidden)
        gamma_0 = torch.tensor(float(gamma_min))
        log_range = torch.tensor(math.log(gamma_max - gamma_min))
        if kind == 'fixed_linear':
            self.register_buffer('gamma_0', gamma_0)
            self.register_buffer('log_range', log_range)
        else:
            self.gamma_0 = torch.nn.Parameter(gamma_0)
            self.log_range = torch.nn.Parameter(log_range)
        if kind == 'learned':
            # Initialised close to linear: a = 1, small outputs c, sigmoids of slopes 1..10 centred over [0, 1].
            gen = torch.Generator().manual_seed(0)
            slope = 1 + 9 * torch.rand(hidden, generator=gen)
            centre = torch.rand(hidden, generator=gen)
            self.raw_a = torch.nn.Parameter(_inverse_softplus(torch.tensor(1.0)))
            self.raw_w = torch.nn.Parameter(_inverse_softplus(slope / 2))
            self.b = torch.nn.Parameter(-slope * (2 * centre - 1) / 2)
            self.raw_c = torch.nn.Parameter(_inverse_softplus(torch.full([hidden], 0.05)))

    def endpoints(self):
        """(γ_0, γ_1) = (γ(0), γ(1)), scalar tensors."""
        return self.gamma_0, self.gamma_0 + self.log_range.exp()

    def _h(self, t):
        t = t.reshape(-1, 1)
        a, w, c = F.softplus(self.raw_a), F.softplus(self.raw_w), F.softplus(self.raw_c)
        return a * t[:, 0] + (torch.sigmoid(w * (2 * t - 1) + self.b) * c).mean(dim=1)

    def shape(self, t):
        """f(t): increasing, f(0) = 0, f(1) = 1."""
        if self.kind != 'learned':
            return t
        ends = torch.tensor([0.0, 1.0], dtype=t.dtype, device=t.device)
        h = self._h(torch.cat([t.flatten(), ends]))
        return ((h[:-2] - h[-2]) / (h[-1] - h[-2])).reshape(t.shape)

    def forward(self, t):
        gamma_0, gamma_1 = self.endpoints()
        return gamma_0 + (gamma_1 - gamma_0) * self.shape(torch.as_tensor(t, dtype=gamma_0.dtype, device=gamma_0.device))

    def gamma_and_derivative(self, t, holder=None):
        """γ(t) and γ'(t) [N] (the schedule's dtype), γ' by autograd through the schedule. With `holder` (a
        `GradientScale`, training), the gradient that reaches the shape f from sample i is scaled by holder.scale[i]
        (variance minimisation)."""
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            t = t.detach().to(self.gamma_0.device, self.gamma_0.dtype).requires_grad_(True)
            f = self.shape(t)
            (df,) = torch.autograd.grad(f.sum(), t, create_graph=create_graph)
        if not create_graph:
            f, df = f.detach(), df.detach()
        elif holder is not None and self.kind == 'learned':
            f, df = _VarianceGradient.apply(f, holder), _VarianceGradient.apply(df, holder)
        gamma_0, gamma_1 = self.endpoints()
        return gamma_0 + (gamma_1 - gamma_0) * f, (gamma_1 - gamma_0) * df


# ----------------------------------------------------------------------------
# Data and times.


def level_values(k):
    """x_k = (2k + 1)/256 − 1, the point of pixel value k."""
    return (2 * k.to(torch.float32) + 1) / NUM_VALUES - 1


def to_levels(images):
    """Pixel values k (long) of images given as x/127.5 − 1 (how the training loop and datasets pass 8-bit data);
    a ValueError if they are not 8-bit values."""
    k = ((images.to(torch.float32) + 1) * 127.5).round()
    if images.numel() and ((k / 127.5 - 1 - images).abs().max() > 1e-4 or k.min() < 0 or k.max() > 255):
        raise ValueError('likelihoods are of 8-bit images: these values are not k/127.5 - 1 for integers k in 0..255 '
                         '(augmented or resampled images?); pass the dataset\'s images unchanged')
    return k.long()


def sample_times(count, mode, generator=None, device=None, u=None):
    """`count` times in [0, 1) with uniform marginals: 'uniform', 'antithetic' (t, 1 − t in pairs; an odd count ends
    with a single draw) or 'low_discrepancy' ((u + i/count) mod 1 for one uniform u). `u` [count] overrides the
    uniform draws (the first is the offset of 'low_discrepancy')."""
    if mode not in T_SAMPLINGS:
        raise ValueError(f't_sampling={mode!r}: expected one of {", ".join(T_SAMPLINGS)}')
    if u is None:
        u = torch.rand([count], generator=generator, device=device, dtype=torch.float64)
    u = u.to(torch.float64)
    if mode == 'uniform':
        return u
    if mode == 'antithetic':
        t = u.clone()
        t[1::2] = 1 - u[0:count - 1:2][:len(t[1::2])]
        return t
    return (u[0] + torch.arange(count, dtype=torch.float64, device=u.device) / count) % 1


def discrete_times(t, T):
    """t' = i/T, s = (i − 1)/T with i = ⌈t·T⌉ (at least 1): a uniform t gives a uniform i ∈ {1..T}."""
    i = (t * T).ceil().clamp(min=1)
    return i / T, (i - 1) / T


@torch.no_grad()
def sampling_sigmas(schedule, num_steps, device=None):
    """VDM's ancestral sampler in σ-form: the levels σ_i = exp(γ(1 − i/T)/2), i = 0..T (float64 [T + 1]), ending at
    σ(0) > 0. Its step z_s = (α_s/α_t)(z_t − σ_t·c·ε̂) + σ_s·sqrt(c)·z with c = −expm1(γ_s − γ_t) is, divided by
    α_s, x_s = D + (σ_s²/σ_t²)(x_t − D) + σ_s·sqrt(1 − σ_s²/σ_t²)·z (σ in σ-form): DDPM's posterior step
    (`samplers.ddim_step`, η = 1) between these levels. The sample is x at σ(0) (noise far below one 8-bit level)."""
    t = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    gamma = schedule(t.to(torch.float32)).detach().to('cpu', torch.float64)
    return (gamma / 2).exp().to(device)


# ----------------------------------------------------------------------------
# The bound.


def _sum(values):
    return values.flatten(1).sum(dim=1)


def prior_kl(x, gamma_1):
    """KL(q(z_1|x) ‖ N(0, I)) per image, nats: ½ Σ(σ_1² + α_1² x² − 1 − log σ_1²), in float64 as
    ½ Σ(α_1²(x² − 1) + softplus(−γ_1)) (σ_1² − 1 = −α_1², −log σ_1² = softplus(−γ_1))."""
    g = gamma_1.to(torch.float64).reshape(-1, *[1] * (x.ndim - 1))
    alpha2 = torch.sigmoid(-g)
    return 0.5 * _sum(alpha2 * (x.to(torch.float64) ** 2 - 1) + F.softplus(-g)).to(torch.float32)


def reconstruction_nll(k, z_0, gamma_0):
    """−log p(x|z_0) per image, nats: per dimension the negative log softmax over the 256 values of
    −(z_0 − α_0 x_v)²/(2σ_0²) at the image's value k."""
    g = gamma_0.reshape(-1, *[1] * (z_0.ndim - 1)).expand_as(z_0)
    alpha, sigma = torch.sigmoid(-g).sqrt(), torch.sigmoid(g).sqrt()
    values = level_values(torch.arange(NUM_VALUES, device=z_0.device))
    flat = [v.reshape(-1) for v in (z_0, alpha, sigma, k)]
    parts = []
    for start in range(0, flat[0].numel(), _RECON_CHUNK):
        z, a, s, kk = (v[start:start + _RECON_CHUNK] for v in flat)
        logits = -0.5 * ((z[:, None] - a[:, None] * values[None]) / s[:, None]) ** 2
        parts.append(-logits.log_softmax(dim=1).gather(1, kk[:, None])[:, 0])
    return _sum(torch.cat(parts).reshape(z_0.shape))


def diffusion_continuous(gamma_prime, eps, eps_hat):
    """½·γ'(t)·‖ε − ε̂‖² per image, nats."""
    return 0.5 * gamma_prime.reshape(-1) * _sum((eps - eps_hat.to(eps.dtype)) ** 2)


def diffusion_discrete(gamma_step, T, eps, eps_hat):
    """(T/2)·expm1(γ_t − γ_s)·‖ε − ε̂‖² per image, nats; gamma_step = γ_t − γ_s [N]."""
    return 0.5 * T * torch.expm1(gamma_step).reshape(-1) * _sum((eps - eps_hat.to(eps.dtype)) ** 2)


def alpha_sigma(gamma, ndim):
    g = gamma.reshape(-1, *[1] * (ndim - 1))
    return torch.sigmoid(-g).sqrt(), torch.sigmoid(g).sqrt()


def vlb_terms(eps_fn, schedule, k, t, noise, noise_0, T=None, holder=None):
    """−VLB terms per image in nats: dict(prior, reconstruction, diffusion) [N] for pixel values k [N, C, H, W]
    (long), times t [N] in [0, 1), noises ε and ε_0 (for z_t and z_0), of the noise predictor
    `eps_fn(z, gamma) -> ε̂` under `schedule` (a `NoiseSchedule`). T: discrete-time diffusion term (None:
    continuous). holder: training's `GradientScale` (continuous time; see the module docstring).
    Discrete time trains the shape on the bound: its mean depends on the shape there."""
    x = level_values(k)
    gamma_0, gamma_1 = schedule.endpoints()
    n = x.shape[0]
    terms = dict(prior=prior_kl(x, gamma_1.expand(n)))
    alpha_0, sigma_0 = alpha_sigma(gamma_0.expand(n), x.ndim)
    terms['reconstruction'] = reconstruction_nll(k, alpha_0 * x + sigma_0 * noise_0, gamma_0.expand(n))
    t = torch.as_tensor(t, device=x.device).reshape(n)
    if T is None:
        gamma_t, gamma_prime = schedule.gamma_and_derivative(t, holder)
        alpha_t, sigma_t = alpha_sigma(gamma_t, x.ndim)
        eps_hat = eps_fn(alpha_t * x + sigma_t * noise, gamma_t)
        terms['diffusion'] = diffusion_continuous(gamma_prime, noise, eps_hat)
        return terms
    # Discrete time: the bound's mean depends on the whole shape, which is then trained on the bound (no holder);
    # γ_t − γ_s = (γ_1 − γ_0)(f_t − f_s), without subtracting two rounded values of γ.
    t, s = discrete_times(t.to(torch.float64), T)
    f = schedule.shape(torch.cat([t, s]).to(gamma_0.device, gamma_0.dtype))
    gamma_t = gamma_0 + (gamma_1 - gamma_0) * f[:n]
    alpha_t, sigma_t = alpha_sigma(gamma_t, x.ndim)
    eps_hat = eps_fn(alpha_t * x + sigma_t * noise, gamma_t)
    terms['diffusion'] = diffusion_discrete((gamma_1 - gamma_0) * (f[:n] - f[n:]), T, noise, eps_hat)
    return terms


def to_bits(nats, dims):
    return nats / (dims * LN2)


DATA_SCALE = 255 / 256  # x_k = (2k + 1)/256 − 1 = DATA_SCALE·y_k with y_k = k/127.5 − 1, the other networks' data


def denoiser_eps(net, class_labels=None):
    """ε̂(z, γ) of any σ-form denoiser: x_σ = z/α, σ = exp(γ/2), ε̂ = (x_σ − D_x(x_σ; σ))/σ; a VDM network gives its
    own ε-output. The other networks model y_k = k/127.5 − 1, so D_x(x; σ) = s·D(x/s; σ/s) with s = 255/256: the
    same data on VDM's points x_k = s·y_k."""
    if hasattr(misc.unwrap(net), 'schedule'):
        return lambda z, gamma: net(z, None, class_labels, gamma=gamma)

    def eps(z, gamma):
        alpha, _ = alpha_sigma(gamma, z.ndim)
        sigma = (gamma / 2).exp().reshape(alpha.shape)
        x = z / alpha
        D = DATA_SCALE * net(x / DATA_SCALE, (sigma / DATA_SCALE).reshape(-1), class_labels).to(z.dtype)
        return (x - D) / sigma
    return eps


@torch.no_grad()
def image_bits(net, schedule, k, num_t, generators, T=None, class_labels=None):
    """Bits/dim of images k [N, C, H, W] (long) under a network: per image the three terms averaged over
    `num_t` low-discrepancy times (with their own ε, ε_0) from the image's generator. Returns dict of [N]
    float64 tensors (prior, reconstruction, diffusion, total)."""
    n, dims = k.shape[0], k[0].numel()
    eps_fn = denoiser_eps(net, class_labels)
    t = torch.stack([sample_times(num_t, 'low_discrepancy', generator=g) for g in generators])  # [N, num_t]
    totals = {name: torch.zeros(n, dtype=torch.float64) for name in TERMS}
    for j in range(num_t):
        noise = misc.randn(k.shape, generators, None).to(k.device)
        noise_0 = misc.randn(k.shape, generators, None).to(k.device)
        terms = vlb_terms(eps_fn, schedule, k, t[:, j].to(k.device), noise, noise_0, T=T)
        for name in TERMS:
            totals[name] += to_bits(terms[name].detach().to('cpu', torch.float64), dims) / num_t
    totals['total'] = sum(totals[name] for name in TERMS)
    return totals


class VDMLoss:
    """−VLB in bits/dim per image for `networks.VDMPrecond` (train.py --precond=vdm).

    t_sampling: see `sample_times`; the times of a batch come from the global sampler positions p of its images:
    'low_discrepancy' stratifies each block of `strata` consecutive positions (the global batch) with one offset
    per block, 'antithetic' pairs positions 2j and 2j + 1, so the times do not depend on how a batch is split over
    processes. T: discrete-time diffusion term (None: continuous). Images must be the dataset's 8-bit values.
    """

    needs_positions = True

    def __init__(self, t_sampling='low_discrepancy', T=None, strata=1):
        if t_sampling not in T_SAMPLINGS:
            raise ValueError(f't_sampling={t_sampling!r}: expected one of {", ".join(T_SAMPLINGS)}')
        check_T(T)
        if isinstance(strata, bool) or not isinstance(strata, int) or strata < 1:
            raise ValueError(f'strata={strata!r}: expected the global batch size, an integer >= 1')
        self.t_sampling, self.T, self.strata = t_sampling, T, strata

    def times(self, positions, seed):
        """t [N] (float64) of the images at global sampler positions `positions`."""
        def uniform(*key):
            return torch.rand([], generator=misc.seeded_generator(seed, 8, *key), dtype=torch.float64)
        t = []
        for p in positions:
            if self.t_sampling == 'uniform':
                t.append(uniform(p))
            elif self.t_sampling == 'antithetic':
                u = uniform(p // 2)
                t.append(u if p % 2 == 0 else 1 - u)
            else:
                t.append((uniform(p // self.strata) + (p % self.strata) / self.strata) % 1)
        return torch.stack(t)

    def __call__(self, net, images, labels=None, augment_pipe=None, generator=None, augment_generator=None,
                 positions=None, seed=0):
        if augment_pipe is not None:
            raise ValueError('the VDM bound is a likelihood of the 8-bit images; augmentation would change them '
                             '(train with --augment=0)')
        k = to_levels(images)
        if positions is None:
            positions = list(range(images.shape[0]))
        t = self.times(positions, seed).to(images.device)
        noise = misc.randn(images.shape, generator, None if generator is not None else images.device).to(images.device)
        noise_0 = misc.randn(images.shape, generator, None if generator is not None else images.device).to(images.device)
        holder = GradientScale()
        terms = net(k, None, labels, vlb=dict(t=t, noise=noise, noise_0=noise_0, T=self.T, holder=holder))
        bits = {name: to_bits(value, images[0].numel()) for name, value in terms.items()}
        holder.scale = 2 * bits['diffusion'].detach()
        loss = bits['prior'] + bits['reconstruction'] + bits['diffusion']
        diagnostics = {f'vdm/{name}_bpd': value.detach() for name, value in bits.items()}
        diagnostics['vdm/bpd'] = loss.detach()
        return loss, diagnostics

    def to_dict(self):
        return dict(t_sampling=self.t_sampling, T=self.T, strata=self.strata)
