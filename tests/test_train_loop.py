"""The train binary and loop end to end on a very small Llama (eager, so the suite stays fast)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from functional_mm import checkpoint, evaluate, pytree
from functional_mm.train import loop

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import llama as llama_config  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")


def small_config(**train):
    c = llama_config.get_config("tiny")
    c.model.overrides.update(
        dict(dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, max_seq_len=32)
    )
    c.data.update(dict(train_docs=200, eval_docs=20, seq_len=32, batch_size=4))
    c.train.update(dict(num_steps=20, log_every=5, eval_every=10, eval_batches=2, compile=False) | train)
    c.optim.warmup_steps = 2
    c.checkpoint.every_steps = 5
    c.sample.max_new_tokens = 8
    return c


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _final_params(workdir):
    with checkpoint.CheckpointManager(os.path.join(workdir, "checkpoints")) as mgr:
        flat = pytree.to_flat_dict(mgr.restore(targets={"state": None})["state"])
    return {k: v for k, v in flat.items() if v is not None}  # loss_scale is None without fp16


def test_tiny_run_logs_evaluates_checkpoints_and_reports(tmp_path, capsys):
    c = small_config(num_steps=40)
    c.optim.lr = 1e-2
    final = loop.train(c, str(tmp_path))
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(5, 41, 5))
    keys = {"loss", "grad_norm", "update_norm", "lr", "tokens_per_s", "samples_per_s", "data_wait_frac",
            "step_time_s", "peak_memory_gib", "compiled_graphs", "skipped_steps"}  # fmt: skip
    assert keys <= rows[0].keys() and "mfu" not in rows[0]  # a CPU has no entry in the peak table: no guess
    out = capsys.readouterr().out
    first_eval = float(out.split("step 0: eval loss ")[1].split()[0])
    assert final["eval_loss"] < first_eval - 1.5
    assert "sample: alice has" in out
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["35", "40"]  # max_to_keep=2
    # The evaluate binary restores the newest checkpoint and reproduces the final eval loss.
    assert evaluate.evaluate(c, str(tmp_path)) == pytest.approx(final["eval_loss"], rel=1e-6)


def test_resume_is_bitwise_exact(tmp_path):
    c = small_config(num_steps=20)
    c.optim.decay_steps = 20  # the schedule's length, independent of where a run stops
    loop.train(c, str(tmp_path / "straight"))
    loop.train(_with(c, num_steps=10), str(tmp_path / "split"))  # stops at 10 (as a preempted job would) ...
    loop.train(c, str(tmp_path / "split"))  # ... and the restart resumes from the checkpoint at step 10
    straight, split = _rows(tmp_path / "straight"), _rows(tmp_path / "split")
    assert [r["loss"] for r in straight] == [r["loss"] for r in split]
    a, b = _final_params(tmp_path / "straight"), _final_params(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_finishes_the_step_saves_and_exits_cleanly(tmp_path):
    cmd = [sys.executable, "-m", "functional_mm.train", "--config", "configs/llama.py:tiny", f"--workdir={tmp_path}",
           "--config.train.compile=False", "--config.train.num_steps=100000", "--config.train.log_every=1",
           "--config.checkpoint.every_steps=100000", "--config.data.train_docs=50", "--config.model.overrides.dim=32",
           "--config.model.overrides.num_layers=1", "--config.data.batch_size=2", "--config.data.seq_len=16"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "metrics.jsonl").exists():
        time.sleep(0.5)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped by signal" in out
    steps = [int(s) for s in os.listdir(tmp_path / "checkpoints")]
    assert len(steps) == 1 and steps[0] == _rows(tmp_path)[-1]["step"]


def test_nan_policies(tmp_path):
    c = small_config(num_steps=6)
    c.optim.lr, c.optim.clip_norm = (
        1e30,
        1e30,
    )  # the first update overflows the weights: every later loss is NaN
    with pytest.raises(FloatingPointError, match="non-finite loss/gradients at step"):
        loop.train(_with(c, nan_policy="stop"), str(tmp_path / "stop"))
    last = loop.train(_with(c, nan_policy="skip"), str(tmp_path / "skip"))
    assert last["skipped_steps"] >= 4


def _with(c, **train):
    c = c.copy_and_resolve_references()
    c.train.update(train)
    return c


def test_lora_mode_trains_only_adapters(tmp_path):
    c = small_config(num_steps=10)
    c.mode.kind = "lora"
    c.mode.lora.targets = [r"attn/(q|v)/weight$"]
    c.mode.lora.dropout = 0.1  # a fresh input-feature mask per step, from the step key
    c.sample.prompt = ""
    loop.train(c, str(tmp_path))
    saved = _final_params(tmp_path)
    params = [k for k in saved if k.startswith("params/")]
    assert len(params) == 8 and all(k.endswith(("/a", "/b")) and "/attn/" in k for k in params)


def test_dynamic_profiling_request_produces_a_trace(tmp_path):
    (tmp_path / "profile_request.json").write_text(json.dumps({"num_steps": 2}))
    loop.train(small_config(num_steps=4), str(tmp_path))
    traces = os.listdir(tmp_path / "profile")
    assert traces == ["trace_rank0_steps1-2.json"]
    assert json.loads((tmp_path / "profile" / traces[0]).read_text())["traceEvents"]
    assert (tmp_path / "profile_request.json.done").exists()


def test_config_errors_name_the_key(tmp_path):
    c = small_config()
    c.train.nan_policy = "ignore"
    with pytest.raises(ValueError, match="config.train.nan_policy='ignore'"):
        loop.train(c, str(tmp_path))
    c = small_config()
    c.mode.kind = "finetune"
    with pytest.raises(ValueError, match="config.mode.init_from"):
        loop.train(c, str(tmp_path))
    r = subprocess.run(
        [sys.executable, "-m", "functional_mm.train", "--config", "configs/llama.py:tiny", f"--workdir={tmp_path}",
         "--config.optim.learning_rate=1"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode != 0 and "learning_rate" in r.stderr


def _train_fsdp2(c, workdir):
    final = loop.train(c, workdir)
    return final["loss"], final["eval_loss"]


@pytest.mark.parametrize("mode", ["pretrain", "lora"])
def test_two_process_fsdp_run_matches_one_process(tmp_path, mode):
    """Full training, and LoRA (the adapters sharded like the weights they adapt, ``lora.logical_axes``)."""
    from functional_mm import parallelism

    c = small_config(num_steps=10 if mode == "pretrain" else 6)
    c.sample.prompt = ""
    c.mode.kind = mode
    single = loop.train(c, str(tmp_path / "one"))
    c2 = c.copy_and_resolve_references()
    c2.mesh.axes = {"fsdp": 2}
    loss, eval_loss = parallelism.run_local(_train_fsdp2, 2, c2, str(tmp_path / "two"), timeout=600)
    assert loss == pytest.approx(single["loss"], rel=1e-4) and eval_loss == pytest.approx(
        single["eval_loss"], rel=1e-4
    )
    if mode == "pretrain":  # the 2-process checkpoint restores in one process and equals the 1-process params
        a, b = _final_params(tmp_path / "one"), _final_params(tmp_path / "two")
        assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
