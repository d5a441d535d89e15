"""The train binary end to end on a tiny config (eager, so it stays fast)."""

import json
import subprocess
import sys

import pytest

from functional_mm.train import main as train_main

sys.path.insert(0, "configs")
import llama as llama_config  # noqa: E402


def test_tiny_run_loss_falls_and_metrics_are_written(tmp_path, capsys):
    c = llama_config.get_config("tiny")
    c.train.num_steps, c.train.eval_every, c.train.compile = 40, 20, False
    c.optim.warmup_steps = 5
    c.data.train_docs, c.data.batch_size = 400, 8
    final = train_main.train(c, str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(10, 41, 10))
    assert {"loss", "grad_norm", "update_norm", "lr", "nonfinite", "tokens_per_s"} <= rows[0].keys()
    out = capsys.readouterr().out
    first_eval = float(out.split("step 0: eval loss ")[1].split()[0])
    assert final["eval_loss"] < first_eval - 2.0  # from ~ln(264) = 5.6 to well under 3.6
    assert "sample: alice has" in out


def test_cli_rejects_unknown_config_field(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "functional_mm.train", "--config", "configs/llama.py:tiny",
         f"--workdir={tmp_path}", "--config.optim.learning_rate=1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode != 0 and "learning_rate" in r.stderr


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match="unknown variant 'huge'"):
        llama_config.get_config("huge")
