"""Flow matching for image/video generators: the rectified-flow training objective (timestep densities,
shifts, loss weightings, conditioning dropout) and the flow-match Euler sampler with classifier-free guidance.

Everything random takes an explicit key (``functional_mm.random``); nothing reads a global RNG.

Example (one training loss and a 4-step sample with an MMDiT)::

    >>> import torch
    >>> from functional_mm import diffusion, random
    >>> from functional_mm.models import mmdit
    >>> cfg = mmdit.MMDiTConfig.variant("tiny")
    >>> params = mmdit.init(random.key(0), cfg)
    >>> ctx, pooled = torch.randn(2, 5, cfg.joint_attention_dim), torch.randn(2, cfg.pooled_projection_dim)
    >>> fm = diffusion.FlowMatchingConfig(shift=3.0, cond_dropout=0.1)
    >>> c = diffusion.drop_conditioning(random.key(1), {"ctx": ctx, "pooled": pooled}, fm.cond_dropout)
    >>> x0 = torch.randn(2, 4, 16, 16)
    >>> loss, _ = diffusion.flow_matching_loss(
    ...     lambda x, t: mmdit.apply(params, cfg, x, t, c["ctx"], c["pooled"]), x0, random.key(2), fm)
    >>> sched = diffusion.flow_match_schedule(4, shift=3.0)
    >>> v = lambda x, t, c: mmdit.apply(params, cfg, x, t, c["ctx"], c["pooled"])
    >>> null = {"ctx": torch.zeros_like(ctx), "pooled": torch.zeros_like(pooled)}
    >>> img = diffusion.sample(v, random.normal(random.key(3), x0.shape), sched,
    ...                        cond={"ctx": ctx, "pooled": pooled}, uncond=null, guidance_scale=5.0)
"""

from functional_mm.diffusion._flow import (
    LOSS_WEIGHTINGS,
    TIME_SHIFT_TYPES,
    TIMESTEP_SAMPLING,
    FlowMatchingConfig,
    add_noise,
    drop_conditioning,
    flow_matching_loss,
    loss_weighting,
    mode_transform,
    resolution_mu,
    sample_sigmas,
    sample_u,
    shift_sigmas,
    sigmas_from_u,
    time_shift,
    train_schedule,
    velocity_target,
)
from functional_mm.diffusion._sampling import (
    FlowMatchSchedule,
    euler_step,
    flow_match_schedule,
    guided,
    sample,
)

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
    "FlowMatchSchedule",
    "flow_match_schedule",
    "euler_step",
    "guided",
    "sample",
]
