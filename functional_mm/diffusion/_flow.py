"""Rectified-flow / flow-matching training objective (SD3 paper, Esser et al. 2024; Flux).

Straight paths between data and noise: ``x_sigma = (1 - sigma) * x0 + sigma * noise`` with ``sigma`` in
[0, 1]; the model predicts the constant velocity ``noise - x0`` (what diffusers' SD3/Flux pipelines integrate).
The pieces, each usable alone:

- timestep *densities* over ``u`` in (0, 1): ``logit_normal`` (SD3's default), ``mode`` (heavy middle,
  ``mode_scale``), ``uniform`` — diffusers' ``compute_density_for_timestep_sampling``, but drawn from explicit
  keys;
- ``u -> sigma``: a static ``shift`` (SD3: 3.0) or the resolution-dependent shift (``mu`` interpolated
  linearly in the image token count, Flux / SD3 paper §5.3.2), either continuous or *discrete* (looked up in
  the 1000-step training schedule, as diffusers' training scripts do);
- loss weightings ``none`` / ``sigma_sqrt`` / ``cosmap`` (``compute_loss_weighting_for_sd3``);
- classifier-free-guidance dropout of the conditioning (:func:`drop_conditioning`).

Example::

    >>> import torch
    >>> from functional_mm import random
    >>> from functional_mm.diffusion import FlowMatchingConfig, flow_matching_loss
    >>> cfg = FlowMatchingConfig(shift=3.0)
    >>> x0 = torch.randn(4, 16, 8, 8)
    >>> loss, aux = flow_matching_loss(lambda x, t: torch.zeros_like(x), x0, random.key(0), cfg)
    >>> aux["sigmas"].shape, bool(loss > 0)
    (torch.Size([4]), True)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Replicate

from functional_mm import parallelism, pytree, random

__all__ = [
    "TIMESTEP_SAMPLING",
    "LOSS_WEIGHTINGS",
    "TIME_SHIFT_TYPES",
    "FlowMatchingConfig",
    "sample_u",
    "mode_transform",
    "shift_sigmas",
    "time_shift",
    "resolution_mu",
    "train_schedule",
    "sample_sigmas",
    "sigmas_from_u",
    "add_noise",
    "velocity_target",
    "loss_weighting",
    "drop_conditioning",
    "flow_matching_loss",
]

TIMESTEP_SAMPLING = ("logit_normal", "mode", "uniform")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
TIME_SHIFT_TYPES = ("exponential", "linear")


# ----------------------------------------------------------------------------------------------------------------
# timestep densities and shifts


def mode_transform(u: torch.Tensor, scale: float) -> torch.Tensor:
    """Map uniform ``u`` to the "mode" density of the SD3 paper (eq. 20): ``1 - u - s (cos^2(pi u / 2) - 1 + u)``.
    ``scale`` in about [-1, 2/(pi - 2)]; 0 is uniform, larger puts more mass mid-path."""
    return 1 - u - scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)


def sample_u(
    key: torch.Tensor,
    batch: int,
    scheme: str = "logit_normal",
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    device=None,
) -> torch.Tensor:
    """``[batch]`` values in (0, 1) from the timestep density ``scheme`` (float32).

    Example::

        >>> u = sample_u(random.key(0), 4096, "logit_normal", logit_mean=0.0, logit_std=1.0)
        >>> round(float(torch.logit(u).std()), 1)
        1.0
    """
    if scheme == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * random.normal(key, (batch,), device=device))
    if scheme == "mode":
        return mode_transform(random.uniform(key, (batch,), device=device), mode_scale)
    if scheme == "uniform":
        return random.uniform(key, (batch,), device=device)
    raise ValueError(f"sample_u: unknown timestep sampling scheme {scheme!r}; known: {TIMESTEP_SAMPLING}")


def shift_sigmas(sigmas, shift: float):
    """Static shift ``shift * s / (1 + (shift - 1) * s)``: ``shift > 1`` spends more steps at high noise (SD3
    trains and samples with 3.0). Works on tensors and numpy arrays."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(mu: float, t, *, kind: str = "exponential", power: float = 1.0):
    """Resolution-dependent shift of ``t`` in (0, 1]: ``e^mu / (e^mu + (1/t - 1)^power)`` (``exponential``, Flux)
    or ``mu / (mu + (1/t - 1)^power)`` (``linear``) — diffusers' ``time_shift``. ``exponential`` with
    ``mu = log(shift)`` equals :func:`shift_sigmas`."""
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** power)
    if kind == "linear":
        return mu / (mu + (1 / t - 1) ** power)
    raise ValueError(f"time_shift: kind must be one of {TIME_SHIFT_TYPES}, got {kind!r}")


def resolution_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """``mu`` for :func:`time_shift`, linear in the number of image tokens (diffusers' ``calculate_shift``):
    ``base_shift`` at ``base_seq_len`` tokens, ``max_shift`` at ``max_seq_len``.

    Example::

        >>> round(resolution_mu(4096), 2), round(resolution_mu(256), 2)   # 1024^2 and 256^2 Flux images
        (1.15, 0.5)
    """
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


# ----------------------------------------------------------------------------------------------------------------
# config


@dataclasses.dataclass(frozen=True)
class FlowMatchingConfig:
    """How training draws ``sigma`` and weights the loss.

    ``timestep_sampling`` / ``logit_mean`` / ``logit_std`` / ``mode_scale``: the density of ``u``.
    ``discrete``: look ``u`` up in the ``num_train_timesteps`` schedule (``timesteps[int(u * N)]``, diffusers'
    training scripts) instead of using it directly. ``shift``: static shift; with ``dynamic_shift`` the shift
    is instead ``time_shift(resolution_mu(image_seq_len, ...))`` of ``u`` (then ``image_seq_len`` must be given
    to :func:`sample_sigmas`). ``loss_weighting``: per-sample weight of the squared error.
    ``cond_dropout``: the probability :func:`drop_conditioning` replaces a sample's conditioning.

    Example::

        >>> FlowMatchingConfig(timestep_sampling="cosine")
        Traceback (most recent call last):
        ...
        ValueError: FlowMatchingConfig.timestep_sampling='cosine' is not one of ('logit_normal', 'mode', 'uniform')
    """

    num_train_timesteps: int = 1000
    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0
    dynamic_shift: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096
    time_shift_type: str = "exponential"
    discrete: bool = True
    loss_weighting: str = "none"
    cond_dropout: float = 0.0

    def __post_init__(self):
        n = self.num_train_timesteps
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"FlowMatchingConfig.num_train_timesteps must be an int >= 1, got {n!r}")
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(
                f"FlowMatchingConfig.timestep_sampling={self.timestep_sampling!r} is not one of {TIMESTEP_SAMPLING}"
            )
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(
                f"FlowMatchingConfig.loss_weighting={self.loss_weighting!r} is not one of {LOSS_WEIGHTINGS}"
            )
        if self.time_shift_type not in TIME_SHIFT_TYPES:
            raise ValueError(
                f"FlowMatchingConfig.time_shift_type={self.time_shift_type!r} is not one of {TIME_SHIFT_TYPES}"
            )
        for name in ("shift", "logit_std"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise ValueError(f"FlowMatchingConfig.{name} must be a positive number, got {v!r}")
        if not isinstance(self.cond_dropout, (int, float)) or not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"FlowMatchingConfig.cond_dropout must be in [0, 1), got {self.cond_dropout!r}")
        for name in ("dynamic_shift", "discrete"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"FlowMatchingConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.dynamic_shift and self.shift != 1.0:
            raise ValueError("FlowMatchingConfig: set either shift != 1 (static) or dynamic_shift, not both")
        if not 0 < self.base_seq_len < self.max_seq_len:
            raise ValueError(
                f"FlowMatchingConfig.base_seq_len={self.base_seq_len} must be in (0, max_seq_len={self.max_seq_len})"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FlowMatchingConfig:
        """Build from a plain dict, rejecting unknown fields."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"FlowMatchingConfig.from_dict: unknown field(s) {unknown}; known fields: {sorted(known)}"
            )
        return cls(**dict(d))


def train_schedule(cfg: FlowMatchingConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(timesteps, sigmas)``, each ``[N]`` float32, descending: the schedule diffusers'
    ``FlowMatchEulerDiscreteScheduler(num_train_timesteps=N, shift=shift)`` is built with (no shift when
    ``dynamic_shift``, as there)."""
    n = cfg.num_train_timesteps
    timesteps = torch.linspace(1, n, n, dtype=torch.float64, device=device).float().flip(0)
    sigmas = timesteps / n
    if not cfg.dynamic_shift:
        sigmas = shift_sigmas(sigmas, cfg.shift)
    return sigmas * n, sigmas


def sample_sigmas(
    key: torch.Tensor,
    cfg: FlowMatchingConfig,
    batch: int,
    *,
    image_seq_len: int | None = None,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sigmas, timesteps)``, each ``[batch]`` float32, with ``timesteps = sigmas * N`` on the model's 0..N
    scale (discrete: exactly the scheduler's entries).

    Example::

        >>> s, t = sample_sigmas(random.key(0), FlowMatchingConfig(shift=3.0), 8)
        >>> bool(((s > 0) & (s <= 1)).all()), bool(torch.allclose(t, s * 1000))
        (True, True)
    """
    u = sample_u(
        key,
        batch,
        cfg.timestep_sampling,
        logit_mean=cfg.logit_mean,
        logit_std=cfg.logit_std,
        mode_scale=cfg.mode_scale,
        device=device,
    )
    return sigmas_from_u(u, cfg, image_seq_len=image_seq_len)


def sigmas_from_u(
    u: torch.Tensor, cfg: FlowMatchingConfig, *, image_seq_len: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The deterministic half of :func:`sample_sigmas`: ``u: [B]`` in [0, 1) -> ``(sigmas, timesteps)``."""
    n = cfg.num_train_timesteps
    if cfg.dynamic_shift and image_seq_len is None:
        raise ValueError("sample_sigmas: dynamic_shift needs image_seq_len (image tokens per sample)")
    if cfg.discrete:
        timesteps, sigmas = train_schedule(cfg, u.device)
        idx = (u * n).long().clamp(0, n - 1)
        sigma = sigmas[idx]
    else:
        sigma = u if cfg.dynamic_shift else shift_sigmas(u, cfg.shift)
    if cfg.dynamic_shift:
        mu = resolution_mu(image_seq_len, cfg.base_seq_len, cfg.max_seq_len, cfg.base_shift, cfg.max_shift)
        sigma = time_shift(mu, sigma, kind=cfg.time_shift_type)
    if cfg.discrete and not cfg.dynamic_shift:
        return sigma, timesteps[idx]
    return sigma, sigma * n


# ----------------------------------------------------------------------------------------------------------------
# noise, targets, weights, dropout


def _expand(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return s.reshape(s.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``x_sigma = (1 - sigma) x0 + sigma noise`` with per-sample ``sigmas: [B]`` (diffusers' ``scale_noise``)."""
    s = _expand(sigmas, x0)
    return s * noise + (1.0 - s) * x0


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The rectified-flow regression target ``d x_sigma / d sigma = noise - x0``."""
    return noise - x0


def loss_weighting(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights ``[B]`` (float32): ``none`` (1), ``sigma_sqrt`` (``sigma^-2``) or ``cosmap``
    (``2 / (pi (1 - 2 sigma + 2 sigma^2))``)."""
    if scheme == "none":
        return torch.ones_like(sigmas, dtype=torch.float32)
    if scheme == "sigma_sqrt":
        return (sigmas**-2.0).float()
    if scheme == "cosmap":
        return (2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))).float()
    raise ValueError(f"loss_weighting: unknown scheme {scheme!r}; known: {LOSS_WEIGHTINGS}")


def drop_conditioning(
    key: torch.Tensor, cond: Any, rate: float, null: Any = None, *, independent: bool = False
) -> Any:
    """Classifier-free-guidance dropout: each sample's conditioning is replaced, with probability ``rate``, by
    ``null`` (a tree like ``cond`` whose leaves broadcast to one sample, e.g. the empty prompt's embeddings;
    zeros when None). ``independent=True`` drops every leaf with its own draw (SD3 drops each text encoder
    separately); otherwise one draw per sample covers all leaves.

    Example::

        >>> cond = {"context": torch.ones(1000, 3, 4), "pooled": torch.ones(1000, 4)}
        >>> out = drop_conditioning(random.key(0), cond, 0.25)
        >>> kept = out["pooled"][:, 0] == 1
        >>> torch.equal(kept, out["context"][:, 0, 0] == 1), round(float(1 - kept.float().mean()), 1)
        (True, 0.2)
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_conditioning: rate must be in [0, 1), got {rate}")
    flat, treedef = pytree.flatten(cond)
    if not flat:
        return cond
    nulls = [None] * len(flat) if null is None else pytree.flatten(null)[0]
    if len(nulls) != len(flat):
        raise ValueError(f"drop_conditioning: null has {len(nulls)} leaves, cond has {len(flat)}")
    b = flat[0].shape[0]
    out = []
    for i, (c, n) in enumerate(zip(flat, nulls)):
        if c.shape[0] != b:
            raise ValueError(f"drop_conditioning: leaves disagree on the batch size ({c.shape[0]} vs {b})")
        k = random.fold_in(key, i) if independent else key
        drop = random.bernoulli(k, rate, (b,), device=c.device)  # drawn for the global batch
        drop = parallelism.rows_like(drop, c).reshape(b, *([1] * (c.dim() - 1)))  # this rank's rows on a mesh
        replacement = torch.zeros((), dtype=c.dtype, device=c.device) if n is None else n.to(c.dtype)
        if isinstance(c, DTensor) and not isinstance(replacement, DTensor) and replacement.dim() > 0:
            replacement = DTensor.from_local(replacement, c.device_mesh, [Replicate()] * c.device_mesh.ndim)
        out.append(torch.where(drop, replacement, c))
    return pytree.unflatten(treedef, out)


# ----------------------------------------------------------------------------------------------------------------
# the loss


def flow_matching_loss(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    key: torch.Tensor,
    cfg: FlowMatchingConfig,
    *,
    image_seq_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted mean squared error between ``velocity_fn(x_sigma, timesteps)`` and ``noise - x0``.

    ``x0: [B, ...]`` are clean (normalised) latents; ``velocity_fn(x, t)`` gets ``t: [B]`` on the 0..N scale
    and closes over the parameters and conditioning (apply :func:`drop_conditioning` to that conditioning
    beforehand). Noise and ``sigma`` come from ``key``. The error is computed in float32, averaged per
    sample, weighted, then averaged over the batch (diffusers' SD3 / Flux training scripts). Returns
    ``(loss, {"sigmas", "timesteps"})``.
    """
    k_noise, k_t = random.split(key)
    b = x0.shape[0]
    # drawn for the global batch; on a mesh each rank keeps its rows (the numbers of one process)
    noise = parallelism.rows_like(random.normal(k_noise, x0.shape, dtype=x0.dtype, device=x0.device), x0)
    sigmas, timesteps = sample_sigmas(k_t, cfg, b, image_seq_len=image_seq_len, device=x0.device)
    sigmas, timesteps = parallelism.rows_like(sigmas, x0), parallelism.rows_like(timesteps, x0)
    pred = velocity_fn(add_noise(x0, noise, sigmas), timesteps.to(x0.dtype))
    if pred.shape != x0.shape:
        raise ValueError(
            f"flow_matching_loss: velocity_fn returned {list(pred.shape)}, expected {list(x0.shape)}"
        )
    err = (pred.float() - velocity_target(x0, noise).float()) ** 2
    per_sample = err.reshape(b, -1).mean(1) * loss_weighting(cfg.loss_weighting, sigmas)
    return per_sample.mean(), {"sigmas": sigmas, "timesteps": timesteps}
