"""The train binary: ``python -m functional_mm.train --config configs/llama.py:tiny --workdir DIR``.

Only ``--config`` and ``--workdir`` are flags; every other knob lives in the (locked) ml_collections config and
is overridden as ``--config.optim.lr=1e-3``. Metrics go to ``DIR/metrics.jsonl``; a progress bar shows step,
loss and throughput.
"""

from __future__ import annotations

import json
import os
import time

import torch
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from functional_mm import optim, pytree, random
from functional_mm.data import text
from functional_mm.models import llama
from functional_mm.train.state import TrainState
from functional_mm.train.step import make_train_step

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/llama.py:tiny.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics (and, later, checkpoints).")


def _optimizer(c) -> tuple[optim.GradientTransformation, object]:
    steps = c.train.num_steps
    lr = optim.warmup_cosine_decay_schedule(
        0.0, c.optim.lr, c.optim.warmup_steps, steps, end_value=c.optim.lr * c.optim.end_lr_fraction
    )
    # No weight decay on norms: the usual choice for Llama-style models.
    tx = optim.chain(
        optim.clip_by_global_norm(c.optim.clip_norm),
        optim.adamw(
            lr, b1=c.optim.b1, b2=c.optim.b2, weight_decay=c.optim.weight_decay, mask=r"^(?!.*norm).*$"
        ),
    )
    return tx, lr


def _eval_loss(params, model_cfg, stream, c, key) -> float:
    with torch.no_grad():
        losses = [
            llama.loss(
                params,
                model_cfg,
                text.random_windows(random.fold_in(key, i), stream, c.data.batch_size, c.data.seq_len),
            )
            for i in range(c.train.eval_batches)
        ]
    return float(torch.stack(losses).mean())


def train(c, workdir: str) -> dict[str, float]:
    """Run the training described by config ``c``; returns the final metrics."""
    os.makedirs(workdir, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model_cfg = llama.LlamaConfig.variant(c.model.variant, **c.model.overrides.to_dict())
    tok = text.ByteTokenizer()
    if model_cfg.vocab_size < tok.vocab_size:
        raise ValueError(
            f"config.model.overrides.vocab_size={model_cfg.vocab_size} < tokenizer vocab {tok.vocab_size}"
        )
    train_stream = text.token_stream(text.synthetic_corpus(c.data.seed, c.data.train_docs), tok)
    eval_stream = text.token_stream(text.synthetic_corpus(c.data.seed + 1, c.data.eval_docs), tok)

    init_key, data_key, eval_key, train_key = random.split(random.key(c.seed), 4)
    params = llama.init(init_key, model_cfg)
    logging.info("model: %s, %.2fM parameters", model_cfg, pytree.leaf_count(params) / 1e6)
    tx, lr = _optimizer(c)
    mixed_precision = c.train.mixed_precision or None
    state = TrainState.create(params, tx, train_key, mixed_precision=mixed_precision)
    step_fn = make_train_step(
        lambda p, batch, key: llama.loss(p, model_cfg, batch),
        tx,
        compile=c.train.compile,
        mixed_precision=mixed_precision,
        lr_schedule=lr,
    )

    log_path = os.path.join(workdir, "metrics.jsonl")
    metrics: dict[str, float] = {"eval_loss": _eval_loss(state.params, model_cfg, eval_stream, c, eval_key)}
    print(f"step 0: eval loss {metrics['eval_loss']:.3f}")
    if c.train.compile:
        print("compiling the train step (the first step takes about a minute on a CPU)...")
    tokens_per_step = c.data.batch_size * c.data.seq_len
    with open(log_path, "w") as log, tqdm(range(1, c.train.num_steps + 1), desc="train", unit="step") as bar:
        t_last = time.perf_counter()
        for step in bar:
            batch = text.random_windows(
                random.fold_in(data_key, step), train_stream, c.data.batch_size, c.data.seq_len
            )
            state, m = step_fn(state, batch)
            if step % c.train.log_every == 0 or step == c.train.num_steps:
                now = time.perf_counter()
                metrics = {k: float(v) for k, v in m.items()}
                metrics.update(step=step, tokens_per_s=tokens_per_step * c.train.log_every / (now - t_last))
                t_last = now
                if step % c.train.eval_every == 0 or step == c.train.num_steps:
                    metrics["eval_loss"] = _eval_loss(state.params, model_cfg, eval_stream, c, eval_key)
                log.write(json.dumps(metrics) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
    print(f"step {c.train.num_steps}: train loss {metrics['loss']:.3f}, eval loss {metrics['eval_loss']:.3f}")

    prompt = torch.tensor([tok.encode(c.sample.prompt, bos=True)])
    out = llama.generate(
        state.params, model_cfg, prompt, max_new_tokens=c.sample.max_new_tokens, stop_tokens=(tok.eos,)
    )
    print(f"sample: {tok.decode(out[0])}")
    return metrics


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: every option is a --config.* override")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    train(_CONFIG.value, _WORKDIR.value)


def run():
    app.run(main)
