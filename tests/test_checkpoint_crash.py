"""Crash safety: saves killed with SIGKILL at random moments, and a process that exits mid-save.

One driver process imports torch once and forks every writer and every checker (a spawned process would pay
2-4 s of imports per trial). Forked children only: the driver itself never touches tensorstore, whose thread
pool would not survive a fork.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

from functional_mm import checkpoint

TRIALS = 24


class Moments(NamedTuple):
    mu: torch.Tensor
    nu: object


def _state(step: int) -> dict:
    # ~2.3 MB over several arrays, so that kills land in every phase: planning, writing, committing, deleting
    return {
        "w": torch.full((512, 512), float(step)),
        "b": (torch.arange(4096) + step).to(torch.bfloat16),
        "opt": Moments(torch.full((256, 256), -float(step)), None),
        "step": torch.tensor(step),
    }


def _check(root: str) -> dict:
    """Open the directory as a new run would, and restore every listed step."""
    before = sorted(os.listdir(root)) if os.path.isdir(root) else []
    mgr = checkpoint.CheckpointManager(root)
    steps = mgr.all_steps()
    bad = []
    for s in steps:
        try:
            out = mgr.restore(s, targets={"state": _state(0), "meta": None})
            want = _state(s)
            ok = (
                out["meta"] == {"step": s}
                and all(torch.equal(out["state"][k], want[k]) for k in ("w", "b", "step"))
                and torch.equal(out["state"]["opt"].mu, want["opt"].mu)
            )
        except Exception as e:  # noqa: BLE001 - reported to the test
            ok = False
            bad.append(f"{s}: {type(e).__name__}: {e}")
        if not ok and not bad:
            bad.append(f"{s}: wrong values")
    after = sorted(os.listdir(root))
    return {"steps": steps, "bad": bad, "tmp_before": [n for n in before if not n.isdigit()],
            "tmp_after": [n for n in after if not n.isdigit()]}  # fmt: skip


def _in_child(fn, *args) -> dict:
    """Run ``fn`` in a forked child and return its JSON result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = fn(*args)
        except BaseException as e:  # noqa: BLE001
            out = {"error": f"{type(e).__name__}: {e}"}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks))


def _writer(root: str, first: int) -> None:
    mgr = checkpoint.CheckpointManager(root, checkpoint.CheckpointManagerOptions(max_to_keep=2))
    step = first
    while True:
        mgr.save(step, {"state": _state(step), "meta": {"step": step}})
        step += 1


def _exit_without_waiting(root: str) -> None:
    mgr = checkpoint.CheckpointManager(root)
    mgr.save(1, {"state": _state(1), "meta": {"step": 1}})
    # returns at once: the interpreter's normal exit must still finish and commit the save


def driver(root: str, trials: int, seed: int) -> dict:
    import random

    torch.set_num_threads(1)
    rng = random.Random(seed)
    report: dict = {"trials": []}

    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            _exit_without_waiting(os.path.join(root, "exit"))
        except BaseException:  # noqa: BLE001
            code = 1
        sys.exit(code)  # a normal exit (atexit, thread joins), unlike os._exit
    report["exit_status"] = os.waitpid(pid, 0)[1]
    report["exit_check"] = _in_child(_check, os.path.join(root, "exit"))

    kill_dir = os.path.join(root, "kill")
    latest = 0
    for _ in range(trials):
        pid = os.fork()
        if pid == 0:
            try:
                _writer(kill_dir, latest + 1)
            finally:
                os._exit(1)
        delay = rng.uniform(0.0, 0.3)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        check = _in_child(_check, kill_dir)
        check["delay"] = round(delay, 3)
        check["previous"] = latest
        report["trials"].append(check)
        if check.get("steps"):
            latest = max(check["steps"])
    return report


def test_sigkill_never_leaves_a_listed_but_broken_step(tmp_path):
    tests = str(Path(__file__).parent)
    code = (
        f"import sys, json; sys.path.insert(0, {tests!r}); import test_checkpoint_crash as t; "
        f"print(json.dumps(t.driver({str(tmp_path)!r}, {TRIALS}, 0)))"
    )
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    elapsed = time.monotonic() - start

    assert report["exit_status"] == 0
    assert report["exit_check"]["steps"] == [1] and not report["exit_check"]["bad"], report["exit_check"]

    trials = report["trials"]
    assert len(trials) == TRIALS
    for t in trials:
        assert "error" not in t, t
        assert not t["bad"], t  # every listed step restores with the right values
        assert t["tmp_after"] == [], t  # a new manager removes what the killed save left
        assert t["steps"] and max(t["steps"]) >= t["previous"], t  # the previous step survived
        assert len(t["steps"]) <= 3, t  # max_to_keep=2 (+1 if killed between commit and delete)
    # the kills must have hit saves in flight, not only idle moments, for the test to mean anything
    assert sum(bool(t["tmp_before"]) for t in trials) >= TRIALS // 4, trials
    assert max(t["steps"][-1] for t in trials) > TRIALS // 2, "the writer made little progress"
    assert elapsed < 150
