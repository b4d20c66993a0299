"""Runs that lose nothing, through the real command line in subprocesses: Ctrl-C part-way through an epoch
saves a checkpoint there, and resuming from it ends with the same parameters as a run never stopped (with
DataLoader workers, evaluation every epoch and an lr drop between the epochs), in one process and under
``torchrun`` with two. A fresh run never touches an earlier run's files."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from implicitkit_det import cli
from implicitkit_det.engine.interrupt import INTERRUPT_AT_ENV

# Two epochs of 5 iterations (10 images, batch 2), the lr dropped 10x for the second, evaluation after each,
# 2 loader workers, a checkpoint every 2 iterations as well.
RUN = [
    "--config", "deqdet_tiny", "--image-size", "64", "--max-size", "96", "--batch-size", "2",
    "--epochs", "2", "--lr-drops", "1", "--warmup-iters", "2", "--workers", "2", "--checkpoint-every", "2",
    "--print-freq", "0", "--deq-steps", "2", "--device", "cpu",
    "--model-arg", "train_steps=2", "--model-arg", "supervise_steps=1,2", "--model-arg", "num_queries=8",
]  # fmt: skip
CLI = ["-m", "implicitkit_det.cli"]
TORCHRUN = ["-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1"]


def _run(
    args: list[str], *, interrupt_at: str | None = None, timeout: int = 240
) -> subprocess.CompletedProcess:
    """`args` run by this Python in a session of its own (a process group that a hook may signal whole)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    env.pop(INTERRUPT_AT_ENV, None)
    if interrupt_at is not None:
        env[INTERRUPT_AT_ENV] = interrupt_at
    # The subprocess imports this checkout, whatever the working directory.
    env["PYTHONPATH"] = os.pathsep.join([str(Path(cli.__file__).parents[1]), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        start_new_session=True,
    )


def _params(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "checkpoint_last.pth", map_location="cpu", weights_only=True)["model"]


def _assert_same_parameters(a: Path, b: Path) -> None:
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    different = [k for k in pa if not torch.equal(pa[k], pb[k])]
    assert not different, f"{len(different)} of {len(pa)} tensors differ, e.g. {different[:3]}"


def _interrupt_and_resume(launcher: list[str], data: list[str], tmp_path: Path, interrupt_at: str) -> None:
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    done = _run([*launcher, *CLI, *RUN, *data, "--output-dir", str(whole)])
    assert done.returncode == 0, done.stderr[-3000:]

    cut = _run([*launcher, *CLI, *RUN, *data, "--output-dir", str(stopped)], interrupt_at=interrupt_at)
    text = cut.stdout + cut.stderr
    assert "stopped at epoch 0, iteration 3/5; checkpoint saved to" in text, text[-3000:]
    assert f"--resume {stopped}" in text
    if launcher[:1] != TORCHRUN[:1]:
        assert cut.returncode == 130
    assert not (stopped / "metrics.jsonl").exists()  # stopped before the first epoch's end
    assert not list(stopped.glob(".*.tmp"))

    resumed = _run([*launcher, *CLI, "--resume", str(stopped)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stdout and "(epoch 0, iteration 3/5)" in resumed.stdout
    _assert_same_parameters(whole, stopped)
    # The same per-epoch records (the evaluation and the epoch's mean losses, times aside).
    records = [(p / "metrics.jsonl").read_text().splitlines() for p in (whole, stopped)]
    assert len(records[0]) == len(records[1]) == 2
    for a, b in zip(*records):
        a, b = json.loads(a), json.loads(b)
        assert a["eval"]["AP"] == b["eval"]["AP"] and a["train"]["loss"] == pytest.approx(b["train"]["loss"])


def test_sigterm_mid_epoch_then_resume_equals_an_uninterrupted_run(tiny_digits, tmp_path):
    # SIGTERM to the whole process group after iteration 2 (0-based 1), as a scheduler stops a job: the data
    # workers get it too (they died of it, and the run with them, unsaved); the next iteration votes to
    # stop, so the run stops after 3 of 5. (Ctrl-C's SIGINT: the torchrun test below, and the CLI's tests.)
    data = ["--data-root", str(tiny_digits.root)]
    _interrupt_and_resume([], data, tmp_path, interrupt_at="0:1:group-term")

    # A crash (SIGKILL) in the second epoch: the run resumes from the last --checkpoint-every checkpoint
    # (after iteration 3 of epoch 1: 8 iterations in all, a multiple of 2) and still ends the same.
    crashed = tmp_path / "crashed"
    killed = _run([*CLI, *RUN, *data, "--output-dir", str(crashed)], interrupt_at="1:3:kill")
    assert killed.returncode == -9
    resumed = _run([*CLI, "--resume", str(crashed)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(epoch 1, iteration 3/5)" in resumed.stdout
    _assert_same_parameters(tmp_path / "whole", crashed)


@pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")
def test_ctrl_c_under_torchrun_then_resume_equals_an_uninterrupted_run(tiny_digits, tmp_path):
    # The SIGINT goes to torchrun, which forwards it to both processes, as a Ctrl-C in its terminal does.
    # 10 images over 2 processes, batch 1: 5 iterations per epoch, as in one process with batch 2.
    launcher = [*TORCHRUN, f"--master-port={_free_port()}"]
    data = ["--data-root", str(tiny_digits.root), "--batch-size", "1"]
    _interrupt_and_resume(launcher, data, tmp_path, interrupt_at="0:1:launcher")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


def test_a_fresh_run_leaves_a_finished_run_untouched(tiny_digits, tmp_path, capsys):
    fast = [
        "--config", "deqdet_tiny", "--image-size", "64", "--max-size", "96", "--batch-size", "2",
        "--epochs", "1", "--warmup-iters", "1", "--workers", "0", "--max-iters", "1", "--print-freq", "0",
        "--model-arg", "train_steps=1", "--model-arg", "supervise_steps=1", "--model-arg", "num_queries=4",
        "--data-root", str(tiny_digits.root),
    ]  # fmt: skip
    out = tmp_path / "run"
    cli.main([*fast, "--output-dir", str(out), "--log-steps"])
    before = _digest(out)
    assert {"config.json", "metrics.jsonl", "checkpoint_last.pth", "checkpoint_best.pth"} <= set(before)
    assert {"training_curves.png", "steps.jsonl"} <= set(before)
    step = json.loads((out / "steps.jsonl").read_text())
    assert step["epoch"] == 0 and step["iteration"] == 0 and {"loss", "lr", "grad_norm"} <= set(step)

    cli.main([*fast, "--output-dir", str(out), "--seed", "1"])
    printed = capsys.readouterr().out
    assert f"{out} holds an earlier run, left as it is; this run writes to {out}-run2" in printed
    assert _digest(out) == before  # byte for byte
    assert (tmp_path / "run-run2" / "checkpoint_last.pth").is_file()

    cli.main([*fast, "--output-dir", str(out), "--seed", "2", "--overwrite"])
    assert _digest(out)["checkpoint_last.pth"] != before["checkpoint_last.pth"]
    assert not (tmp_path / "run-run3").exists()
