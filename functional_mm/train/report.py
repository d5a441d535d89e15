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
    if "tokens_per_s" in rows[0]:
        ax_tput.plot(steps, [r["tokens_per_s"] for r in rows])
        ax_tput.set(xlabel="step", ylabel="tokens/s", title="throughput")
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
