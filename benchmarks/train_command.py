"""The training command a user runs, timed end to end: this checkout against another version.

The command is the training-step goal's own (``deqdet_tiny`` from scratch at the digits demo's model shape:
10 queries, 16 points, 6 no-grad steps, RAG branches after 1, 3, 6, batch 4, 128-192 px, 400 training
images, one epoch, ``--workers 0``), run through the CLI in a fresh process per run with torch's default
threads, as a user runs it. Each round runs both versions, in alternating order; a run's time is the epoch
time the CLI prints (training only: loading and the steps, not the evaluation after it), and its loss is
the epoch's mean. On a shared machine whole processes run faster or slower than others, so the result is
the ratio of the medians over rounds, with each round's own ratio beside it.

Run: ``.venv/bin/python benchmarks/train_command.py --baseline DIR [--rounds 5]`` (``DIR``: a checkout of
another commit, e.g. ``git worktree add /tmp/base <commit>``).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import Report, base_parser, checkout_prelude, command_line, machine, markdown_table

HERE = Path(__file__).resolve().parent
#: the goal's command line, after ``python -m implicitkit_det.cli``
COMMAND = [
    "--config", "deqdet_tiny", "--model-arg", "num_queries=10", "--model-arg", "num_points=16",
    "--model-arg", "train_steps=6", "--model-arg", "supervise_steps=[1,3,6]", "--image-size", "128",
    "--max-size", "192", "--batch-size", "4", "--epochs", "1", "--digits-train", "400", "--workers", "0",
]  # fmt: skip
_EPOCH = re.compile(r"epoch 0 done in ([0-9.]+)s: loss ([0-9.]+)")


def run_command(root: Path, argv: list[str], out_dir: Path) -> tuple[float, float]:
    """The CLI with `argv`, its library imported from the checkout `root`: ``(epoch seconds, epoch loss)``."""
    argv = ["implicitkit_det.cli", *argv, "--output-dir", str(out_dir)]
    code = (
        checkout_prelude(root)
        + f"import runpy; sys.argv = {argv!r}; "
        + "runpy.run_module('implicitkit_det.cli', run_name='__main__')"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=root)
    found = _EPOCH.search(done.stdout + done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"the command failed in {root}:\n{(done.stdout + done.stderr)[-3000:]}")
    return float(found[1]), float(found[2])


def rounds_table(baseline: Path, rounds: int, argv: list[str]) -> str:
    """`rounds` runs of each version in alternating order: every round, the medians and their ratio."""
    trees = {"this": HERE.parent, "baseline": baseline.resolve()}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as scratch:
        for r in range(rounds):
            for name in list(trees) if r % 2 else list(trees)[::-1]:
                out = Path(scratch) / f"{name}-{r}"
                runs[name].append(run_command(trees[name], argv, out))
    rows = []
    for r, ((base_s, _), (this_s, _)) in enumerate(zip(runs["baseline"], runs["this"], strict=True)):
        rows.append([f"round {r + 1}", f"{base_s:.1f}", f"{this_s:.1f}", f"x{base_s / this_s:.2f}"])
    base_median = statistics.median(s for s, _ in runs["baseline"])
    this_median = statistics.median(s for s, _ in runs["this"])
    speed_up = f"**x{base_median / this_median:.2f}**"
    rows.append(["**median**", f"{base_median:.1f}", f"{this_median:.1f}", speed_up])
    base_loss, this_loss = runs["baseline"][0][1], runs["this"][0][1]
    return markdown_table(["", "baseline epoch s", "this epoch s", "speed-up"], rows) + (
        f"\n\nThe epoch's mean loss: baseline {base_loss:.4f}, this {this_loss:.4f} (relative difference "
        f"{abs(this_loss - base_loss) / abs(base_loss):.1e}; the CLI prints four decimals). "
        f"{rounds} rounds, the versions in alternating order; torch's default threads."
    )


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="a checkout of another version")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each version, in alternating order")
    args: argparse.Namespace = parser.parse_args(argv)
    command = [*COMMAND, "--max-iters", "2"] if args.quick else COMMAND
    report = Report(
        args.out,
        "train_command",
        f"# The training command, end to end\n\n{machine()}\n\n`{command_line()}`\n\n"
        f"`python -m implicitkit_det.cli {' '.join(command)}`\n",
    )
    rounds = 1 if args.quick else args.rounds
    report.add(f"Against {args.baseline}", rounds_table(args.baseline, rounds, command))
    report.write()


if __name__ == "__main__":
    main()
