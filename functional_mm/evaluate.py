"""Evaluate a checkpoint: ``python -m functional_mm.evaluate --config configs/llama.py:tiny --workdir DIR``.

Shares the train binary's config; restores the newest checkpoint in ``DIR/checkpoints`` (or the weights named
by ``config.mode.init_from``) and prints the held-out loss.
"""

from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

from functional_mm import checkpoint, random
from functional_mm.train import loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/llama.py:tiny.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory whose newest checkpoint is evaluated.")


def evaluate(c, workdir: str) -> float:
    """Held-out loss of the newest checkpoint in ``workdir`` (or of ``config.mode.init_from`` without one)."""
    run = loop.build(c, workdir)
    trainable = run.trainable
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpt_dir):
        with checkpoint.CheckpointManager(ckpt_dir) as mgr:
            if mgr.latest_step() is not None:
                state_target = loop.initial_state(run)
                trainable = mgr.restore(targets={"state": state_target})["state"].params
    elif not c.mode.init_from:
        raise FileNotFoundError(
            f"--workdir={workdir!r} has no checkpoints/ and config.mode.init_from is empty"
        )
    _, _, eval_key, _ = random.split(random.key(c.seed), 4)
    return loop.evaluate(run, trainable, eval_key)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    print(f"eval loss {evaluate(_CONFIG.value, _WORKDIR.value):.4f}")


if __name__ == "__main__":
    app.run(main)
