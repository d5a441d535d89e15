"""The train loop behind ``python -m functional_mm.train``: setup from a config, then step, log, evaluate,
checkpoint, profile and resume.

Setup (:func:`build`, shared with ``python -m functional_mm.evaluate``): the model family comes from the
registry (``config.model.family``), the mesh from ``config.mesh.axes`` (empty: one process, no sharding), the
initial weights from ``config.mode.init_from`` (a Hugging Face directory or one of our workdirs) or a fresh
init, and ``config.mode.kind`` picks pretrain / finetune (optionally freezing ``config.mode.freeze``) / lora.

What the batches hold and how the trained model is shown comes from the family's task
(:mod:`functional_mm.train.tasks`: text windows, captioned images, prompted images).

The loop (:func:`train`): resumes from the newest checkpoint in ``WORKDIR/checkpoints`` (train state with its
PRNG key and the data loader's position, so the resumed run sees exactly the batches it would have seen),
logs metrics to ``metrics.jsonl`` and TensorBoard, evaluates every ``eval_every`` steps, saves every
``checkpoint.every_steps``, stops cleanly on SIGTERM/SIGINT (finish the step, save, exit 0), applies the NaN
policy and writes ``report.png`` at the end.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import signal
import time
from typing import Any

import torch
import torch.distributed as dist
from absl import logging
from tqdm import tqdm

from functional_mm import checkpoint, device, lora, nn, optim, parallelism, pytree, random
from functional_mm.models import registry
from functional_mm.train import metrics as metrics_lib
from functional_mm.train import profiling, report, tasks
from functional_mm.train.state import TrainState
from functional_mm.train.step import make_train_step

NAN_POLICIES = ("skip", "stop")
MODES = ("pretrain", "finetune", "lora")


def validate(c) -> None:
    """Check values the config types cannot: errors name the key."""

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ValueError(f"config.{key}={c_get(key)!r}: {what}")

    def c_get(key: str) -> Any:
        node = c
        for part in key.split("."):
            node = node[part]
        return node

    need(c.train.num_steps > 0, "train.num_steps", "must be > 0")
    need(c.train.log_every > 0, "train.log_every", "must be > 0")
    need(c.train.eval_every > 0, "train.eval_every", "must be > 0")
    need(c.train.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1")
    need(c.train.nan_policy in NAN_POLICIES, "train.nan_policy", f"must be one of {NAN_POLICIES}")
    need(c.mode.kind in MODES, "mode.kind", f"must be one of {MODES}")
    need(
        c.mode.kind != "finetune" or bool(c.mode.init_from),
        "mode.init_from",
        "finetune needs weights to start from",
    )
    need(c.optim.lr > 0, "optim.lr", "must be > 0")
    need(
        0 <= c.optim.warmup_steps < c.train.num_steps, "optim.warmup_steps", "must be in [0, train.num_steps)"
    )
    need(
        c.data.batch_size > 0 and c.data.seq_len > 1,
        "data.batch_size",
        "batch_size > 0 and seq_len > 1 required",
    )
    need(c.checkpoint.every_steps > 0, "checkpoint.every_steps", "must be > 0")
    need(c.model.family in registry.names(), "model.family", f"must be one of {registry.names()}")


@dataclasses.dataclass
class Run:
    """Everything :func:`build` sets up."""

    config: Any
    family: registry.ModelFamily
    model_cfg: Any
    mesh: Any
    rules: Any
    base: Any  # full parameter tree (frozen base under LoRA)
    trainable: Any  # what the optimizer updates: base params, or the LoRA adapters
    loss_fn: Any  # loss_fn(trainable, batch, key)
    params_of: Any  # trainable -> full params for apply / export
    task: tasks.Task
    rank: int
    world: int


def _setup_mesh(c, family):
    axes = dict(c.mesh.axes)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not axes and world > 1:
        axes = {"fsdp": -1}  # several processes and no mesh given: plain FSDP over all of them
    if not axes:
        return None, None
    mesh = parallelism.make_mesh(axes)
    rules = list(c.mesh.rules) if c.mesh.rules else family.default_rules()
    return mesh, rules


def _initial_params(c, family, model_cfg, key):
    src = c.mode.init_from
    if not src:
        return nn.unbox(family.init_boxed(key, model_cfg))[0]
    if os.path.exists(os.path.join(src, "config.json")):
        hf_cfg, params = family.hf_load(src)
        if hf_cfg != model_cfg:
            raise ValueError(
                f"config.mode.init_from={src!r} holds {hf_cfg}, but config.model describes {model_cfg}; "
                "make config.model match the checkpoint"
            )
        return params
    ckpt_dir = os.path.join(src, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(
            f"config.mode.init_from={src!r} is neither a Hugging Face directory (no config.json) nor a workdir "
            f"of ours (no checkpoints/ folder)"
        )
    target = nn.unbox(family.init_boxed(key, model_cfg))[0]
    with checkpoint.CheckpointManager(ckpt_dir) as mgr:
        if mgr.latest_step() is None:
            raise FileNotFoundError(f"config.mode.init_from={src!r}: no committed checkpoint in {ckpt_dir}")
        state = mgr.restore(targets={"state": None})["state"]
    restored = state["params"] if isinstance(state, dict) else state[1]
    return pytree.tree_map(lambda t, r: r.to(t.dtype), target, _restructure(target, restored))


def _restructure(target, restored):
    """A checkpoint restored without a target comes back as nested dicts: map it onto ``target``'s tree."""
    flat = pytree.to_flat_dict(restored)
    missing = [p for p in pytree.paths(target) if p not in flat]
    if missing:
        raise ValueError(f"checkpoint lacks parameters {missing[:10]} (and {max(0, len(missing) - 10)} more)")
    return pytree.map_with_path(lambda p, _: flat[p], target)


def build(c, workdir: str | None = None, *, with_data: bool = True) -> Run:
    """Set up a run from config ``c`` (validated first); generated data lands in ``workdir``.
    ``with_data=False`` (inference) skips the data pipeline: ``run.task`` is None."""
    validate(c)
    family = registry.get(c.model.family)
    model_cfg = family.make_config(c.model.variant, c.model.overrides.to_dict())
    mesh, rules = _setup_mesh(c, family)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1

    task = tasks.make(c, family, model_cfg, workdir) if with_data else None
    if rank == 0 and with_data:
        print(memory_estimate(family, model_cfg, c, mesh))

    init_key, lora_key = random.split(random.fold_in(random.key(c.seed), 0))
    base = _initial_params(c, family, model_cfg, init_key)
    if mesh is not None:
        family.check_layout(model_cfg, mesh, rules)
        axes = nn.abstract(family.init_boxed, init_key, model_cfg)[1]
        base = parallelism.shard(base, axes, mesh, rules)

    remat = c.train.remat or None
    loss = lambda p, batch, key: family.loss(p, model_cfg, batch, key=key, remat_policy=remat)
    if c.mode.kind == "lora":
        lcfg = lora.LoraConfig(
            rank=c.mode.lora.rank, alpha=c.mode.lora.alpha, dropout=c.mode.lora.dropout,
            targets=tuple(c.mode.lora.targets),
        )  # fmt: skip
        trainable = lora.init(lora_key, base, lcfg)
        if mesh is not None:  # the adapters laid out like the weights they adapt (the rank dim whole)
            trainable = parallelism.shard(trainable, lora.logical_axes(trainable, axes), mesh, rules)
        params_of = lambda adapters: lora.merge(base, adapters, lcfg)  # no dropout: eval / export

        def loss_fn(adapters, batch, key):
            k_drop, k_loss = random.split(key)
            return loss(lora.merge(base, adapters, lcfg, key=k_drop), batch, k_loss)

    else:
        trainable, params_of = base, lambda p: p
        loss_fn = loss
    return Run(c, family, model_cfg, mesh, rules, base, trainable, loss_fn, params_of, task, rank, world)


def memory_estimate(family, model_cfg, c, mesh) -> str:
    """Parameter count and per-rank bytes of params + grads + AdamW state, from the abstract init (meta
    tensors: nothing allocated). Sharding is counted as an even split over every non-``dp`` mesh axis."""
    shapes, _ = nn.abstract(family.init_boxed, random.key(0), model_cfg)
    leaves = pytree.leaves(shapes)
    count = sum(x.numel() for x in leaves)
    param_bytes = sum(x.numel() * x.element_size() for x in leaves)
    shards = 1
    if mesh is not None:
        shards = math.prod(n for name, n in zip(mesh.mesh_dim_names, mesh.mesh.shape) if name != "dp")
    # grads in the param dtype; AdamW moments in float32 (4 bytes each per element)
    per_rank = (2 * param_bytes + 8 * count) / shards
    if c.mode.kind == "lora":
        per_rank = param_bytes / shards  # adapters and their state are small next to the frozen base
    return (
        f"model: {count / 1e6:.2f}M parameters ({param_bytes / 2**30:.2f} GiB); params + grads + optimizer "
        f"state ~{per_rank / 2**30:.2f} GiB per rank over {shards} shard(s), activations not included"
    )


def _optimizer(c, trainable):
    decay_steps = c.optim.decay_steps or c.train.num_steps
    lr = optim.warmup_cosine_decay_schedule(
        0.0, c.optim.lr, c.optim.warmup_steps, decay_steps, end_value=c.optim.lr * c.optim.end_lr_fraction
    )  # fmt: skip
    adamw = optim.adamw(
        lr, b1=c.optim.b1, b2=c.optim.b2, weight_decay=c.optim.weight_decay, mask=c.optim.decay_mask
    )
    tx = optim.chain(optim.clip_by_global_norm(c.optim.clip_norm), adamw)
    if c.mode.freeze:  # frozen parameters get no update and no optimizer state
        pattern = re.compile(c.mode.freeze)
        labels = pytree.map_with_path(lambda p, _: "frozen" if pattern.search(p) else "train", trainable)
        if all(lbl == "frozen" for lbl in pytree.leaves(labels)):
            raise ValueError(f"config.mode.freeze={c.mode.freeze!r} freezes every parameter")
        tx = optim.multi_transform({"train": tx, "frozen": optim.freeze()}, labels)
    return tx, lr


def initial_state(run: Run) -> TrainState:
    """The step-0 train state (also the restore target for a checkpoint of this run)."""
    c = run.config
    train_key = random.split(random.key(c.seed), 4)[3]
    tx, _ = _optimizer(c, run.trainable)
    return TrainState.create(run.trainable, tx, train_key, mixed_precision=c.train.mixed_precision or None)


def _batch(run: Run, split: str, step: int):
    b = run.task.batch(split, step)
    return parallelism.shard_batch(b, run.mesh, run.rules) if run.mesh is not None else b


def _scalar(x) -> float:
    return float(x.full_tensor() if hasattr(x, "full_tensor") else x)


def evaluate(run: Run, trainable, key) -> float:
    """Mean loss over ``config.train.eval_batches`` held-out batches."""
    with torch.no_grad():
        losses = [
            _scalar(run.loss_fn(trainable, _batch(run, "eval", i), random.fold_in(key, i)))
            for i in range(run.config.train.eval_batches)
        ]
    return sum(losses) / len(losses)


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it after each step (agreed across ranks)."""

    def __init__(self):
        self.requested = False
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        logging.warning("received signal %d: finishing this step, saving and exiting", signum)
        self.requested = True

    def agreed(self) -> bool:
        if not dist.is_initialized():
            return self.requested
        flag = torch.tensor([int(self.requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


def train(c, workdir: str) -> dict[str, float]:
    """Run the training described by config ``c`` in ``workdir``; returns the last logged metrics."""
    run = build(c, workdir)
    ctx = parallelism.use_mesh(run.mesh, run.rules) if run.mesh is not None else _nullcontext()
    with ctx:
        return _train(run, workdir)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def _train(run: Run, workdir: str) -> dict[str, float]:
    c = run.config
    is_main = run.rank == 0
    _, _, eval_key, _ = random.split(random.key(c.seed), 4)
    tx, lr = _optimizer(c, run.trainable)
    mixed_precision = c.train.mixed_precision or None
    state = initial_state(run)
    step_fn = make_train_step(
        run.loss_fn, tx, grad_accum_steps=c.train.grad_accum_steps, compile=c.train.compile,
        mixed_precision=mixed_precision, lr_schedule=lr,
    )  # fmt: skip

    options = checkpoint.CheckpointManagerOptions(
        save_interval_steps=c.checkpoint.every_steps, max_to_keep=c.checkpoint.max_to_keep,
        async_save=c.checkpoint.async_save, host_copy=False,  # the step is pure: saved tensors are never mutated
    )  # fmt: skip
    mgr = checkpoint.CheckpointManager(os.path.join(workdir, "checkpoints"), options)
    start = 0
    if mgr.latest_step() is not None:
        start = mgr.latest_step()
        restored = mgr.restore(start, targets={"state": state, "data": None})
        state = restored["state"]
        run.task.restore(restored["data"])
        if is_main:
            print(f"resumed from step {start} ({os.path.join(workdir, 'checkpoints', str(start))})")

    writer = metrics_lib.MetricWriter(workdir, enabled=is_main, append=start > 0)
    dev = device.default_device()
    peak = c.train.peak_tflops or metrics_lib.peak_tflops(metrics_lib.device_name(dev))
    units = run.task.units_per_step
    flops_per_step = (
        run.family.flops_per_token(run.model_cfg, c.data.seq_len) * c.data.batch_size * c.data.seq_len
        if run.family.flops_per_token
        else None
    )
    window = (
        profiling.Window(c.profile.start_step, c.profile.num_steps, list(c.profile.ranks))
        if c.profile.start_step >= 0
        else None
    )
    profiler = profiling.StepProfiler(workdir, run.rank, dev.type, window)
    stop = _StopFlag()
    skipped, last = 0, {}
    if start == 0:
        initial_eval = evaluate(run, state.params, eval_key)  # every rank: it runs collectives on a mesh
    if start == 0 and is_main:
        print(f"step 0: eval loss {initial_eval:.3f}")
        if c.train.compile:
            print("compiling the train step (the first step takes about a minute on a CPU)...")
    bar = tqdm(range(start + 1, c.train.num_steps + 1), desc="train", unit="step", disable=not is_main,
               initial=start, total=c.train.num_steps)  # fmt: skip
    data_time = compute_time = 0.0
    try:
        for step in bar:
            profiler.step_begin(step)
            t0 = time.perf_counter()
            batch = _batch(run, "train", step)
            t1 = time.perf_counter()
            new_state, m = step_fn(state, batch)
            nonfinite = _scalar(m["nonfinite"]) > 0
            t2 = time.perf_counter()
            data_time, compute_time = data_time + t1 - t0, compute_time + t2 - t1
            profiler.step_end(step)
            if nonfinite and c.train.nan_policy == "stop":
                raise FloatingPointError(
                    f"non-finite loss/gradients at step {step}; stopped (nan_policy='stop'), the last good "
                    f"checkpoint is step {mgr.latest_step()}"
                )
            if nonfinite:  # nan_policy == "skip": drop the update, move on to the next batch
                skipped += 1
                new_state = state._replace(step=new_state.step, key=new_state.key)
            state = new_state

            if step % c.train.log_every == 0 or step == c.train.num_steps:
                last = {k: _scalar(v) for k, v in m.items()}
                elapsed = data_time + compute_time
                steps_in_window = (
                    c.train.log_every if step % c.train.log_every == 0 else step % c.train.log_every
                )
                step_s = elapsed / steps_in_window
                last.update(
                    skipped_steps=skipped, step_time_s=step_s, data_wait_frac=data_time / elapsed,
                    samples_per_s=c.data.batch_size / step_s,
                    peak_memory_gib=metrics_lib.peak_memory_bytes(dev) / 2**30,
                    compiled_graphs=metrics_lib.compiled_graph_count(),
                )  # fmt: skip
                last[f"{run.task.unit}_per_s"] = units / step_s
                u = metrics_lib.mfu(flops_per_step, step_s, run.world, peak) if flops_per_step else None
                if u is not None:
                    last["mfu"] = u
                data_time = compute_time = 0.0
                if step % c.train.eval_every == 0 or step == c.train.num_steps:
                    last["eval_loss"] = evaluate(run, state.params, eval_key)
                writer.write(step, last)
                bar.set_postfix(loss=f"{last['loss']:.3f}", per_s=f"{last[f'{run.task.unit}_per_s']:.0f}")

            stopping = stop.agreed()
            if mgr.should_save(step) or stopping or step == c.train.num_steps:
                mgr.save(
                    step, {"state": state, "data": run.task.state()},
                    metrics={"loss": last.get("loss")} if last else None, force=True,
                )  # fmt: skip
            if stopping:
                if is_main:
                    print(f"stopped by signal at step {step}; checkpoint saved")
                break
    finally:
        bar.close()
        stop.restore()
        run.task.close()
        mgr.close()  # waits for the last save: nothing is lost at exit
        writer.close()
    finished = int(state.step) >= c.train.num_steps
    params = run.params_of(state.params) if finished else None
    if finished and run.mesh is not None:
        params = parallelism.gather(params)  # a collective: every rank takes part
    if is_main:
        print(
            f"step {int(state.step)}: "
            + ", ".join(f"{k} {last[k]:.3f}" for k in ("loss", "eval_loss") if k in last)
        )
        if finished and (shown := run.task.finish(params)):
            last.update(shown)
            final = metrics_lib.MetricWriter(workdir, append=True)
            final.write(int(state.step), shown)
            final.close()
        report.write_report(workdir)
    return last


def load_for_inference(c, checkpoint_path: str) -> tuple[Run, Any]:
    """``(run, params)`` for inference from ``checkpoint_path``: a Hugging Face directory (``config.json``),
    one of our workdirs, or its ``checkpoints/`` folder (newest step; LoRA runs come back merged). One
    process, no mesh."""
    if os.path.exists(os.path.join(checkpoint_path, "config.json")):
        c.mode.init_from, c.mode.kind = checkpoint_path, "finetune"
        c.mesh.axes = {}
        run = build(c, with_data=False)
        return run, run.params_of(run.trainable)
    workdir = checkpoint_path.rstrip("/")
    if os.path.basename(workdir) == "checkpoints":
        workdir = os.path.dirname(workdir)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(
            f"--checkpoint={checkpoint_path!r} is neither a Hugging Face directory (no config.json) nor a "
            "workdir of ours (no checkpoints/ folder)"
        )
    c.mesh.axes = {}
    run = build(c, with_data=False)
    with checkpoint.CheckpointManager(ckpt_dir) as mgr:
        if mgr.latest_step() is None:
            raise FileNotFoundError(
                f"--checkpoint={checkpoint_path!r}: no committed checkpoint in {ckpt_dir}"
            )
        state = mgr.restore(targets={"state": initial_state(run)})["state"]
    return run, run.params_of(state.params)
