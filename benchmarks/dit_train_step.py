"""One SD3-like MMDiT flow-matching training step: ours (eager and compiled) vs diffusers
SD3Transformer2DModel + torch.optim.AdamW (eager, and ``torch.compile``d unless ``--no-hf-compile``).

The diffusers model is built from our config (``config_to_hf``) and our params are converted from its weights,
so every side starts from the same weights. Each step draws one batch (latents, text tokens, pooled text) and
the flow-matching noise and sigmas from explicit keys: ours inside the step (``diffusion.flow_matching_loss``
on ``state.key``), the reference gets the same noise and sigmas precomputed (untimed) and does the noising and
the loss the way diffusers' SD3 training script does. Sides are interleaved (a different one first every
step); the median and the minimum of ``--steps`` timed steps are compared. On a machine shared with other
jobs, ``--threads 1`` gives repeatable figures: with 2 threads an op waits for whichever of its threads was
descheduled, which makes the median depend on the neighbours' load.

    .venv/bin/python benchmarks/dit_train_step.py [--steps 10] [--layers 4] [--heads 4] [--batch 4]
        [--no-hf-compile] [--only SIDE] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import time

import diffusers
import torch
from _step_report import (  # benchmarks/ is the script's directory
    add_common_args,
    ours,
    parse_args,
    print_results,
    rss_mib,
    run_interleaved,
)

from functional_mm import diffusion, optim, random
from functional_mm.models import mmdit
from functional_mm.models.hf import mmdit as hf_mmdit
from functional_mm.train import make_train_step

SIDES = ("diffusers eager", "diffusers compiled", "ours eager", "ours compiled")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap, SIDES)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--latent", type=int, default=32, help="latent height = width (16 channels)")
    ap.add_argument("--context", type=int, default=77, help="text tokens")
    ap.add_argument("--context-dim", type=int, default=512)
    ap.add_argument("--pooled-dim", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--qk-norm", action="store_true", help="SD3.5's RMS-normalised q/k")
    ap.add_argument("--no-hf-compile", action="store_true", help="skip the torch.compile'd diffusers column")
    args = parse_args(ap)

    cfg = mmdit.MMDiTConfig(
        sample_size=args.latent, patch_size=2, in_channels=16, num_layers=args.layers, num_heads=args.heads,
        head_dim=args.head_dim, joint_attention_dim=args.context_dim, pooled_projection_dim=args.pooled_dim,
        pos_embed_max_size=args.latent // 2, qk_norm="rms_norm" if args.qk_norm else None,
    )  # fmt: skip
    fm = diffusion.FlowMatchingConfig(shift=3.0)  # SD3: logit-normal u, discrete schedule shifted by 3
    lr, wd = 1e-4, 1e-2

    # The reference at diffusers' own init; ours converted from its weights.
    torch.manual_seed(0)
    hf = diffusers.SD3Transformer2DModel(
        **{k: v for k, v in hf_mmdit.config_to_hf(cfg).items() if k[0] != "_"}
    )
    params = hf_mmdit.from_hf_state_dict(hf.state_dict(), cfg)

    def loss_fn(p, batch, key):
        velocity = lambda x, t: mmdit.apply(p, cfg, x, t, batch["context"], batch["pooled"])
        return diffusion.flow_matching_loss(velocity, batch["latents"], key, fm)[0]

    tx = optim.adamw(lr, weight_decay=wd)
    sides = {
        "diffusers eager": lambda: _theirs(hf.train(), lr, wd),
        # its own copy of the weights when the eager side trains `hf` too
        "diffusers compiled": lambda: _theirs(
            torch.compile((copy.deepcopy(hf) if "diffusers eager" in runs else hf).train()), lr, wd
        ),
        "ours eager": lambda: ours(make_train_step(loss_fn, tx, compile=False), params, tx),
        "ours compiled": lambda: ours(make_train_step(loss_fn, tx, compile=True), params, tx),
    }
    if args.no_hf_compile:
        del sides["diffusers compiled"]
    rss_setup = rss_mib()  # both models built; optimizer states are allocated below / at the first step
    runs = {}
    for name, make in sides.items():
        if not args.only or name in args.only:
            runs[name] = make()

    key = random.key(2)  # the state key every side's step i sees (ours advances its own copy in the state)

    def inputs(i):
        nonlocal key
        batch = _batch(random.fold_in(random.key(1), i), cfg, args)
        # What make_train_step hands loss_fn for microbatch 0, and what flow_matching_loss draws from it.
        k_noise, k_t = random.split(random.fold_in(random.split(key)[1], torch.tensor(0)))
        noise = random.normal(k_noise, batch["latents"].shape)
        sigmas, timesteps = diffusion.sample_sigmas(k_t, fm, args.batch)
        key = random.split(key)[0]
        return batch, noise, sigmas, timesteps

    t_start = time.perf_counter()
    times, first_s, losses = run_interleaved(runs, args, inputs)

    n_img, n_params = (args.latent // 2) ** 2, sum(p.numel() for p in hf.parameters())
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {torch.get_num_threads()} threads")
    print(f"config {cfg}, {n_params / 1e6:.1f}M params")
    print(
        f"batch {args.batch} x ({n_img} image + {args.context} text tokens), fp32, AdamW lr {lr} wd {wd}; "
        f"median of {args.steps} steps after {args.warmup} warm-up; "
        f"total {time.perf_counter() - t_start:.0f} s (incl. compiles)"
    )
    print_results(times, first_s, losses, "diffusers eager", rss_setup)


def _batch(key, cfg, args):
    k_x, k_c, k_p = random.split(key, 3)
    b = args.batch
    return {
        "latents": random.normal(k_x, (b, cfg.in_channels, args.latent, args.latent)),
        "context": random.normal(k_c, (b, args.context, cfg.joint_attention_dim)),
        "pooled": random.normal(k_p, (b, cfg.pooled_projection_dim)),
    }


def _theirs(model, lr, wd):
    """The step of diffusers' SD3 training script (``train_dreambooth_sd3.py``), loss weighting "none"."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)

    def run(batch, noise, sigmas, timesteps):
        x0 = batch["latents"]
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1.0 - s) * x0 + s * noise
        opt.zero_grad(set_to_none=True)
        pred = model(
            hidden_states=noisy, encoder_hidden_states=batch["context"], pooled_projections=batch["pooled"],
            timestep=timesteps, return_dict=False,
        )[0]  # fmt: skip
        target = noise - x0
        loss = torch.mean(((pred.float() - target.float()) ** 2).reshape(x0.shape[0], -1), 1).mean()
        loss.backward()
        opt.step()
        return loss.detach()

    return run


if __name__ == "__main__":
    main()
