"""DEQDet's early exit at inference: COCO AP against the mean refinement steps per image.

Loads a DEQDet checkpoint written by the CLI, then evaluates it on its validation split (by default the
bundled digits set at the demo's sizes) with a fixed number of refinement steps and with each image
stopping at a tolerance (plain iteration of ``F``, or Anderson acceleration), and prints / writes a table
and a plot of AP versus mean steps:

    python benchmarks/early_exit.py --checkpoint /tmp/deqdet_digits

Extra arguments after ``--`` go to the CLI's data options (e.g. ``-- --data-root /data/coco``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from implicitkit_det import cli
from implicitkit_det.engine.checkpoint import load_checkpoint, read_checkpoint
from implicitkit_det.engine.evaluate import evaluate
from implicitkit_det.engine.run_config import build_run_config
from implicitkit_det.engine.run_setup import load_data, make_eval_loader
from implicitkit_det.evaluation import CocoEvaluator
from implicitkit_det.models import DEQDet, build_model
from implicitkit_det.models.registry import read_overrides

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--max-steps", type=int, default=21, help="test_steps: the most applications of F")
    p.add_argument("--fixed-steps", default="1,2,3,4,6,9,13,21", help="fixed step counts to compare")
    p.add_argument("--tols", default="0.5,0.3,0.2,0.1,0.05,0.02", help="tolerances for early exit")
    p.add_argument("--solvers", default="fixed,anderson")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--name", default="early_exit")
    args, rest = p.parse_known_args(argv)
    return args, [a for a in rest if a != "--"]


def load(args: argparse.Namespace, data_argv: list[str]) -> tuple[DEQDet, Any, Any]:
    """The model of the checkpoint (in eval mode), the validation loader and dataset."""
    checkpoint = read_checkpoint(args.checkpoint)
    config = checkpoint["config"]
    overrides, _ = read_overrides(
        config["name"], config["overrides"]
    )  # a run's options shared by every detector
    model = build_model(config["name"], config["num_classes"], **overrides)
    if not isinstance(model, DEQDet):
        raise SystemExit(f"{args.checkpoint} holds a {type(model).__name__}; early exit needs a DEQDet")
    load_checkpoint(checkpoint, model=model)
    # The checkpoint's data and input size (or those given after --), as --eval-only would use them.
    argv = ["--workers", "0", "--eval-only", "--resume", str(args.checkpoint), *data_argv]
    parser = cli.build_parser()
    cfg = build_run_config(vars(parser.parse_args(argv)), cli.given_options(parser, argv), checkpoint)
    cfg = dataclasses.replace(cfg, eval_batch_size=args.batch_size, skip_image_check=True)
    data = load_data(cfg, train=False)
    loader = make_eval_loader(cfg, data.val, torch.device("cpu"), data.paths.digits)
    val_set = data.val
    return model.eval(), loader, val_set


def run_setting(model: DEQDet, loader: Any, val_set: Any, **setting: Any) -> dict[str, Any]:
    for key, value in setting.items():
        setattr(model, key, value)
    start = time.perf_counter()
    stats = evaluate(
        model,
        loader,
        CocoEvaluator(val_set.coco),
        device=torch.device("cpu"),
        label_to_category_id=val_set.label_to_category_id,
        verbose=False,
    )
    return {
        **setting,
        "AP": stats["AP"],
        "AP50": stats["AP50"],
        "mean_steps": stats["mean_steps"],
        "time_s": time.perf_counter() - start,
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| mode | tol | mean steps / image | AP | AP50 | eval time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        mode = "fixed count" if r["test_tol"] is None else f"early exit, {r['test_solver']}"
        tol = "-" if r["test_tol"] is None else f"{r['test_tol']:g}"
        lines.append(
            f"| {mode} | {tol} | {r['mean_steps']:.2f} | {r['AP']:.4f} | {r['AP50']:.4f} | {r['time_s']:.1f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series = {"fixed count": [r for r in rows if r["test_tol"] is None]}
    for solver in sorted({r["test_solver"] for r in rows if r["test_tol"] is not None}):
        series[f"early exit ({solver})"] = [
            r for r in rows if r["test_tol"] is not None and r["test_solver"] == solver
        ]
    for (label, rs), marker in zip(series.items(), "os^", strict=False):
        rs = sorted(rs, key=lambda r: r["mean_steps"])
        ax.plot([r["mean_steps"] for r in rs], [r["AP"] for r in rs], marker=marker, label=label)
        if label != "fixed count":
            for r in rs:
                ax.annotate(
                    f"{r['test_tol']:g}",
                    (r["mean_steps"], r["AP"]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    ax.set_xlabel("mean applications of F per image")
    ax.set_ylabel("COCO AP (digits val)")
    ax.set_title("DEQDet inference: fixed step count vs early exit")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    args, data_argv = parse_args(argv)
    model, loader, val_set = load(args, data_argv)
    settings: list[dict[str, Any]] = [
        {"test_steps": int(n), "test_tol": None, "test_solver": "fixed"} for n in args.fixed_steps.split(",")
    ]
    for solver in args.solvers.split(","):
        for tol in args.tols.split(","):
            settings.append({"test_steps": args.max_steps, "test_tol": float(tol), "test_solver": solver})
    rows = []
    for setting in settings:
        rows.append(run_setting(model, loader, val_set, **setting))
        print(json.dumps(rows[-1]), flush=True)
    text = table(rows)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text(
        f"Checkpoint: `{args.checkpoint}`; {len(val_set)} validation images, batch {args.batch_size}, "
        f"at most {args.max_steps} steps.\n\n{text}\n"
    )
    (args.out / f"{args.name}.json").write_text(json.dumps(rows, indent=2))
    plot(rows, args.out / f"{args.name}.png")
    return rows


if __name__ == "__main__":
    main()
