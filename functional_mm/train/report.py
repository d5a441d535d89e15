"""``report.png``: loss and throughput curves of a run, drawn from ``WORKDIR/metrics.jsonl``.

The train loop writes it at the end; ``python -m functional_mm.train.report --workdir DIR`` redraws it at any
time (also while a run goes).
"""

from __future__ import annotations

import json
import os

from absl import app, flags


def write_report(workdir: str) -> str | None:
    """Draw the curves into ``workdir/report.png``; returns its path (None when there are no metrics yet)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if "loss" in r]  # end-of-run rows hold only scores (caption accuracy, ...)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_tput) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in rows]
    ax_loss.plot(steps, [r["loss"] for r in rows], label="train loss")
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if evals:
        ax_loss.plot(*zip(*evals), "o-", label="eval loss")
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_loss.legend()
    unit = next((k for k in ("tokens_per_s", "samples_per_s") if k in rows[0]), None)
    if unit:
        ax_tput.plot(steps, [r[unit] for r in rows])
        ax_tput.set(xlabel="step", ylabel=unit.replace("_per_s", "/s"), title="throughput")
    fig.tight_layout()
    out = os.path.join(workdir, "report.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv):
    del argv
    workdir = flags.FLAGS.workdir
    print(write_report(workdir) or f"no metrics in {workdir}")


if __name__ == "__main__":
    # Flags are defined here, not at import: the train binary imports this module and owns --workdir.
    flags.DEFINE_string("workdir", None, "Run directory holding metrics.jsonl.", required=True)
    app.run(main)
