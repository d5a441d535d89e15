"""One Qwen2-VL training step (image + text): ours (eager and compiled) vs transformers
Qwen2VLForConditionalGeneration + torch.optim.AdamW.

The transformers model is built from our config (``config_to_hf``) and our params are converted from its
weights, so both sides start from the same weights. Every step draws one batch: ``--batch`` rows of ``--seq``
tokens, each holding one ``--image`` x ``--image`` picture (its merged patch tokens between vision-start/end)
at a random offset in random text; labels are the text tokens (image placeholders ignored). Sides are
interleaved (a different one first every step); the median and the minimum of ``--steps`` timed steps are
compared. On a machine shared with other jobs, ``--threads 1`` gives repeatable figures: with 2 threads an op
waits for whichever of its threads was descheduled, which makes the median depend on the neighbours' load.

    .venv/bin/python benchmarks/vlm_train_step.py [--steps 10] [--layers 4] [--dim 256] [--seq 256]
        [--batch 4] [--only SIDE] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers
from _step_report import (  # benchmarks/ is the script's directory
    add_common_args,
    ours,
    parse_args,
    print_results,
    rss_mib,
    run_interleaved,
)

from functional_mm import optim, random
from functional_mm.models import qwen2_vl
from functional_mm.models.hf import qwen2_vl as hf_qwen2_vl
from functional_mm.train import make_train_step

BOS = 1
SIDES = ("hf+torch.optim", "ours eager", "ours compiled")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap, SIDES)
    ap.add_argument("--layers", type=int, default=4, help="decoder layers")
    ap.add_argument("--dim", type=int, default=256, help="decoder width (head_dim 64)")
    ap.add_argument("--mlp", type=int, default=688)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--vision-dim", type=int, default=128, help="vision width (head_dim 32, patch 14)")
    ap.add_argument("--image", type=int, default=224, help="image side in pixels (patch 14, 2x2 merge)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    args = parse_args(ap)

    heads = args.dim // 64
    cfg = qwen2_vl.Qwen2VLConfig.variant(
        "tiny",
        vision=dict(dim=args.vision_dim, num_layers=args.vision_layers, num_heads=args.vision_dim // 32,
                    mlp_dim=4 * args.vision_dim, out_dim=args.dim, patch_size=14),
        text=dict(vocab_size=args.vocab, dim=args.dim, num_layers=args.layers, num_heads=heads,
                  num_kv_heads=max(1, heads // 2), mlp_dim=args.mlp, max_seq_len=max(512, args.seq)),
        mrope_section=(8, 12, 12),
        # the special tokens at the top of the vocabulary: text ids are 3 .. vocab - 5
        image_token_id=args.vocab - 4, video_token_id=args.vocab - 3,
        vision_start_token_id=args.vocab - 2, vision_end_token_id=args.vocab - 1,
    )  # fmt: skip
    lr, wd = 1e-4, 0.1

    # The reference at transformers' own init; ours converted from its weights.
    torch.manual_seed(0)
    hf_cfg = transformers.Qwen2VLConfig(**hf_qwen2_vl.config_to_hf(cfg))
    hf = transformers.Qwen2VLForConditionalGeneration._from_config(hf_cfg, attn_implementation="sdpa")
    params = hf_qwen2_vl.from_hf_state_dict(hf.state_dict(), cfg)
    hf_opt = torch.optim.AdamW(hf.train().parameters(), lr=lr, weight_decay=wd)  # state: at the first step
    rss_setup = rss_mib()  # both models built; optimizer states are allocated below / at the first step

    def hf_step(batch):
        hf_opt.zero_grad(set_to_none=True)
        tokens = batch["tokens"]
        labels = torch.where(tokens == cfg.image_token_id, -100, tokens)
        out = hf(
            input_ids=tokens, pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
            mm_token_type_ids=(tokens == cfg.image_token_id).long(), labels=labels,
        )  # fmt: skip
        out.loss.backward()
        hf_opt.step()
        return out.loss.detach()

    tx = optim.adamw(lr, weight_decay=wd)
    loss_fn = lambda p, batch, key: qwen2_vl.loss(p, cfg, batch)
    sides = {
        "hf+torch.optim": lambda: hf_step,
        "ours eager": lambda: ours(make_train_step(loss_fn, tx, compile=False), params, tx),
        "ours compiled": lambda: ours(make_train_step(loss_fn, tx, compile=True), params, tx),
    }
    runs = {name: make() for name, make in sides.items() if not args.only or name in args.only}
    t_start = time.perf_counter()
    times, first_s, losses = run_interleaved(
        runs, args, lambda i: (_batch(random.fold_in(random.key(1), i), cfg, args),)
    )

    n_img = (args.image // 28) ** 2
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    print(f"{versions}, {torch.get_num_threads()} threads")
    print(f"config {cfg}, {sum(p.numel() for p in hf.parameters()) / 1e6:.1f}M params")
    print(
        f"batch {args.batch} x seq {args.seq} (one {args.image}x{args.image} image = {n_img} tokens a row), "
        f"fp32, AdamW lr {lr} wd {wd}; median of {args.steps} steps after {args.warmup} warm-up; total "
        f"{time.perf_counter() - t_start:.0f} s (incl. compiles)"
    )
    print_results(times, first_s, losses, "hf+torch.optim", rss_setup)


def _batch(key, cfg, args):
    """Rows ``[BOS, text, <vision_start>, <image> * n, <vision_end>, text]``, one image per row at a random
    offset, and the images' flattened patches ``[rows * patches, C * 2 * 14 * 14]``."""
    g = args.image // cfg.vision.patch_size
    n_img = g * g // cfg.vision.spatial_merge_size**2
    free = args.seq - n_img - 3
    if free < 0:
        raise ValueError(f"--seq {args.seq} is too short for a {n_img}-token image")
    k_tok, k_off, k_px = random.split(key, 3)
    tokens = random.randint(k_tok, (args.batch, args.seq), 3, cfg.image_token_id)  # text ids
    offsets = random.randint(k_off, (args.batch,), 0, free + 1).tolist()
    tokens[:, 0] = BOS
    for row, off in enumerate(offsets):
        s = 1 + off
        tokens[row, s] = cfg.vision_start_token_id
        tokens[row, s + 1 : s + 1 + n_img] = cfg.image_token_id
        tokens[row, s + 1 + n_img] = cfg.vision_end_token_id
    return {
        "tokens": tokens,
        "pixel_values": random.normal(k_px, (args.batch * g * g, cfg.vision.patch_dim)),
        "image_grid_thw": torch.tensor([[1, g, g]] * args.batch),
    }


if __name__ == "__main__":
    main()
