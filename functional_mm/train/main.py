"""The train binary: ``python -m functional_mm.train --config configs/llama.py:tiny --workdir DIR``.

Only ``--config`` and ``--workdir`` are flags; every other knob lives in the (locked) ml_collections config and
is overridden as ``--config.optim.lr=1e-3``. Under ``torchrun --nproc_per_node N`` the same command trains on
the mesh of ``config.mesh.axes`` (default: FSDP over all processes). See :mod:`functional_mm.train.loop`.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from functional_mm.train import loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/llama.py:tiny.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints, traces and the report.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: every option is a --config.* override")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    loop.train(_CONFIG.value, _WORKDIR.value)


def run():
    app.run(main)
