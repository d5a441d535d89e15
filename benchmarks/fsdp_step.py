"""FSDP training step on N CPU processes (gloo): ours (DTensor params, fsdp=N) vs transformers LlamaForCausalLM
wrapped in torch FSDP2 ``fully_shard`` (each decoder layer, then the root) + ``torch.optim.AdamW`` (foreach).

Same config, same initial weights (our HF converter), same global batch: each FSDP2 rank takes its rows, ours
gets the global batch and the model keeps each rank's rows (``constrain``), so both sides do the same work.

Time: one launch runs the sides interleaved, step after step (a barrier before each step), so machine noise
hits all of them alike; the median of ``--steps`` timed steps on rank 0 is compared.

Memory: peak RSS is a high-water mark per process, so every side is measured in its own launch (fresh
processes) running the same warm-up and steps; reported per rank as the peak (``ru_maxrss``) and the peak
minus the RSS after imports and process-group setup (what the side itself added: model, optimizer state,
activations, compiled code and the compiler's own memory for the compiled side).

    .venv/bin/python benchmarks/fsdp_step.py [--nprocs 4] [--steps 10] [--layers 4] [--dim 256] [--seq 256]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
import torch.distributed as dist

from functional_mm import optim, random
from functional_mm.models import llama
from functional_mm.parallelism import make_mesh, run_local, shard, use_mesh
from functional_mm.train import TrainState, make_train_step

SIDES = ("fsdp2", "ours eager", "ours compiled")
LR, WD = 1e-4, 0.1


def _cfg(a) -> llama.LlamaConfig:
    return llama.LlamaConfig.variant(
        "tiny", vocab_size=a.vocab, dim=a.dim, num_layers=a.layers, num_heads=a.heads,
        num_kv_heads=a.kv_heads, mlp_dim=a.mlp, max_seq_len=a.seq,
    )  # fmt: skip


def _tokens(a, cfg, i: int) -> torch.Tensor:
    return random.randint(random.fold_in(random.key(1), i), (a.batch, a.seq), 0, cfg.vocab_size)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _fsdp2_side(a, cfg, params, mesh):
    import transformers
    from torch.distributed.fsdp import fully_shard

    from functional_mm.models.hf import llama as hf_llama

    hf_cfg = transformers.LlamaConfig(**hf_llama.config_to_hf(cfg))
    hf_cfg._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(hf_cfg)
    model.load_state_dict(hf_llama.to_hf_state_dict(params, cfg), strict=True)
    model.train()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, foreach=True)
    rank, world = dist.get_rank(), dist.get_world_size()

    def step(tokens):
        rows = tokens.chunk(world)[rank]
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def _ours_side(a, cfg, params, mesh, compile):
    rules = llama.default_rules()
    tx = optim.adamw(LR, weight_decay=WD)
    state = TrainState.create(shard(params, llama.logical_axes(cfg), mesh, rules), tx, random.key(2))
    train_step = make_train_step(lambda p, batch, key: llama.loss(p, cfg, batch), tx, compile=compile)

    def step(tokens):
        nonlocal state
        with use_mesh(mesh, rules):
            state, metrics = train_step(state, {"tokens": tokens})
        return metrics["loss"].full_tensor()

    return step


def _build(a, side: str, mesh):
    cfg = _cfg(a)
    params = llama.init(random.key(0), cfg)
    if side == "fsdp2":
        return _fsdp2_side(a, cfg, params, mesh)
    return _ours_side(a, cfg, params, mesh, compile=side == "ours compiled")


def _run(a, sides: tuple[str, ...]) -> dict:
    """On every rank: build ``sides``, run them interleaved, return per-side times (rank 0), losses and memory."""
    import transformers  # noqa: F401  (imported by every side's launch, so the baseline RSS includes it)
    from torch.distributed.fsdp import fully_shard  # noqa: F401

    torch._inductor.config.compile_threads = 1  # a compile-worker pool per rank only oversubscribes 2 cores
    dist.init_process_group("gloo")
    # One mesh for every side: torch 2.13 recompiles a compiled DTensor step whenever eager DTensor work on
    # another DeviceMesh object ran in between (a guard then sees a leftover FakeScriptObject for the mesh).
    mesh = make_mesh({"fsdp": -1})
    base_rss = _current_rss_mib()
    steps = {side: _build(a, side, mesh) for side in sides}
    times: dict[str, list[float]] = {s: [] for s in sides}
    losses: dict[str, list[float]] = {s: [] for s in sides}
    cfg = _cfg(a)
    for i in range(a.warmup + a.steps):
        tokens = _tokens(a, cfg, i)
        for side, step in steps.items():
            dist.barrier()
            t0 = time.perf_counter()
            loss = step(tokens)
            dt = time.perf_counter() - t0
            if side == "fsdp2":  # each rank's loss is over its own rows: average them for the global loss
                loss = loss.clone()
                dist.all_reduce(loss)
                loss /= dist.get_world_size()
            losses[side].append(float(loss))
            if i >= a.warmup:
                times[side].append(dt)
    peak = [None] * dist.get_world_size()
    dist.all_gather_object(peak, (_rss_mib(), base_rss))
    return {"times": times, "losses": losses, "rss": peak}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nprocs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--mlp", type=int, default=688)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="global batch (rows), split over the ranks")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-side memory launches")
    ap.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {SIDES}")
    a = ap.parse_args()
    sides = tuple(s.strip() for s in a.sides.split(","))
    if not set(sides) <= set(SIDES):
        ap.error(f"--sides: unknown {sorted(set(sides) - set(SIDES))}; known {SIDES}")
    if a.batch % a.nprocs:
        ap.error(f"--batch {a.batch} must be divisible by --nprocs {a.nprocs}")

    timeout = 3600
    together = run_local(_run, a.nprocs, a, sides, timeout=timeout)
    print(f"torch {torch.__version__}, {a.nprocs} processes (gloo, 1 thread each), config {_cfg(a)}")
    print(
        f"global batch {a.batch} x seq {a.seq} ({a.batch // a.nprocs} rows per rank), fp32, AdamW; "
        f"median of {a.steps} steps after {a.warmup} warm-up, interleaved"
    )
    base = statistics.median(together["times"].get("fsdp2", together["times"][sides[0]]))
    for side in sides:
        ts, ls = together["times"][side], together["losses"][side]
        med = statistics.median(ts)
        print(
            f"{side:14s} {med * 1e3:8.1f} ms/step  ratio vs FSDP2 {med / base:5.2f}  "
            f"loss step 1 {ls[0]:.5f}  last {ls[-1]:.5f}"
        )
    if a.no_memory:
        return
    print(
        "peak RSS per rank, each side alone in fresh processes (MiB; + = above the RSS after imports/setup):"
    )
    for side in sides:
        alone = run_local(_run, a.nprocs, a, (side,), timeout=timeout)
        cells = "  ".join(f"{peak:7.1f} (+{peak - start:6.1f})" for peak, start in alone["rss"])
        print(f"{side:14s} {cells}")


if __name__ == "__main__":
    main()
