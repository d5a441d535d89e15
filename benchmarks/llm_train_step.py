"""One Llama training step: ours (eager and compiled) vs transformers LlamaForCausalLM + torch.optim.AdamW.

Same config, same initial weights (moved with our HF converter), same batches; the three steps are
interleaved so machine noise hits all of them alike; the median of ``--steps`` timed steps is compared.

    .venv/bin/python benchmarks/llm_train_step.py [--steps 10] [--layers 4] [--dim 512] [--seq 256] [--batch 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import transformers

from functional_mm import optim, random
from functional_mm.models import llama
from functional_mm.models.hf import llama as hf_llama
from functional_mm.train import TrainState, make_train_step


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--mlp", type=int, default=1408)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()

    cfg = llama.LlamaConfig.variant(
        "tiny", vocab_size=args.vocab, dim=args.dim, num_layers=args.layers, num_heads=args.heads,
        num_kv_heads=args.kv_heads, mlp_dim=args.mlp, max_seq_len=args.seq,
    )  # fmt: skip
    params = llama.init(random.key(0), cfg)
    lr, wd = 1e-4, 0.1

    # The reference gets exactly our initial weights through the exporter.
    with tempfile.TemporaryDirectory() as d:
        hf_llama.save_pretrained(params, cfg, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            d, dtype=torch.float32, attn_implementation="sdpa"
        )
    hf.train()
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=lr, weight_decay=wd)

    def hf_step(tokens):
        hf_opt.zero_grad(set_to_none=True)
        out = hf(input_ids=tokens, labels=tokens)
        out.loss.backward()
        hf_opt.step()
        return out.loss.detach()

    tx = optim.adamw(lr, weight_decay=wd)
    loss_fn = lambda p, batch, key: llama.loss(p, cfg, batch)
    runs = {
        "hf+torch.optim": hf_step,
        "ours eager": _ours(make_train_step(loss_fn, tx, compile=False), params, tx),
        "ours compiled": _ours(make_train_step(loss_fn, tx, compile=True), params, tx),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    losses: dict[str, float] = {}
    for i in range(args.warmup + args.steps):
        tokens = random.randint(random.fold_in(random.key(1), i), (args.batch, args.seq), 0, cfg.vocab_size)
        for name, fn in runs.items():
            t0 = time.perf_counter()
            losses[name] = float(fn(tokens))
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, config {cfg}")
    print(
        f"batch {args.batch} x seq {args.seq}, fp32, median of {args.steps} steps after {args.warmup} warm-up"
    )
    base = statistics.median(times["hf+torch.optim"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"{name:15s} {med * 1e3:9.1f} ms/step  ratio vs HF {med / base:5.2f}  last loss {losses[name]:.4f}"
        )


def _ours(step, params, tx):
    state = TrainState.create(params, tx, random.key(2))

    def run(tokens):
        nonlocal state
        state, metrics = step(state, {"tokens": tokens})
        return metrics["loss"]

    return run


if __name__ == "__main__":
    main()
