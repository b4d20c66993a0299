"""The paper's claims about training, measured at small scale on the bundled digits set.

Every training and evaluation is a subprocess of the real command line (``python -m implicitkit_det.cli``)
started from :func:`implicitkit_det.recipes.digits_recipe` (the demo's options), so what is measured is what
a user runs. Every comparison uses the same data, the same budget (the recipe's epochs and batch) and the
same seeds (0, 1, 2 by default); a row is the mean ± sample std over seeds.

| claim | what runs | metric |
|---|---|---|
| ``rag``: RAG trains better than JFB | ``deqdet_tiny`` with ``rag_steps`` 2 (RAG, the default), 1 (JFB), 3 | final AP |
| ``rap``: RAP helps | content noise only (the default), off, the paper's content + box noise, box only | final AP |
| ``refinement``: AP rises with test steps and holds past the training depth | the refinement curve (``--refinement-curve``, 0 .. 2x the training depth) of the RAG and JFB runs | AP after 0, depth, 2x depth steps |
| ``convergence``: faster than AdaMixer | ``deqdet_tiny`` against ``adamixer_tiny``, AP after every epoch | AP halfway through and averaged over the epochs both train at the full rate |
| ``memory``: less memory at equal depth | read from ``benchmarks/results/deqdet_vs_adamixer_*.json`` (not re-measured) | training step's memory against depth |
| ``sparse``: equilibrium training improves Sparse R-CNN | ``deq_sparse_rcnn_tiny`` against ``sparse_rcnn_tiny`` | final AP |
| ``early_exit``: early exit keeps AP with fewer steps | the RAG checkpoints evaluated (``--eval-only``) with ``--deq-tol`` against the fixed step count | AP, mean steps per image |

Runs shared by several claims (the default DEQDet is RAG k=2, content-only RAP and the convergence run) are trained
once. A comparison's verdict: *holds* if the mean difference in the claimed direction exceeds
``2 x pooled std / sqrt(n)`` (pooled std = root of the mean of the two sample variances, ``n`` seeds),
*does not hold* if it exceeds it the other way, *not distinguishable* otherwise; "not worse" claims (AP
past the training depth, AP with early exit) hold unless significantly worse. A comparison of AP whose
variants both stay below ``AP_FLOOR`` is *not judged*: a model that learned nothing is a defect of the run
(a collapse, a recipe that does not fit), not evidence for or against a claim.

Run (from the repository root)::

    .venv/bin/python benchmarks/reproduction.py --quick            # ~2 minutes on one core: 1 seed, 1 epoch
    .venv/bin/python benchmarks/reproduction.py --jobs 16 --threads 1   # every variant, 3 seeds, 16 cores
    .venv/bin/python benchmarks/reproduction.py --render-docs      # paste the results into docs/reproduction.md

Outputs in ``--out``: ``reproduction.json`` (every run), ``reproduction.md`` (the tables with verdicts),
``reproduction_*.png`` and ``runs/<run>/`` (the CLI's own outputs and ``log.txt``). A run whose folder already
holds a finished record for the same command is reused, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from _common import DEFAULT_OUT as RESULTS
from _common import command_line, machine, markdown_table

from implicitkit_det.engine.optim import parse_drops
from implicitkit_det.models import CONFIGS
from implicitkit_det.recipes import digits_recipe

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = RESULTS / "reproduction"
DOCS_PAGE = ROOT / "docs" / "reproduction.md"
MEMORY_SOURCES = ("deqdet_vs_adamixer_tiny.json", "deqdet_vs_adamixer_paper.json")
# The smoke version: tiny splits, a few iterations, one epoch, smaller inputs and a 3-step DEQ path
# (appended to the recipe, so they override it).
QUICK_ARGS = (
    "--digits-train", "32", "--digits-val", "16", "--max-iters", "3", "--epochs", "1", "--lr-drops", "",
    "--image-size", "96", "--max-size", "128",
    "--model-arg", "train_steps=3", "--model-arg", "supervise_steps=[1,3]", "--model-arg", "test_steps=3",
)  # fmt: skip
CLAIM_KEYS = ("rag", "rap", "refinement", "convergence", "memory", "sparse", "early_exit")
FULL_RATE_MEAN = "AP averaged over the full-rate epochs"
HALFWAY = "AP halfway through the full-rate epochs"
ADAMIXER_CURVE_NOTE = (
    "AdaMixer's curve: step n is stage n's output (stages 0..5), and past its last stage that stage is "
    "applied again, the one way an explicit stack can refine further."
)


# -- what runs --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """One subprocess of the CLI: a training run, or (with `tol`) an evaluation of that run's checkpoint.

    `model_args` are ``KEY=VALUE`` overrides on top of the recipe (``--model-arg``); `tol` evaluates the
    checkpoint of the same spec without it with ``--deq-tol tol``.
    """

    config: str
    seed: int
    model_args: tuple[str, ...] = ()
    tol: float | None = None

    @property
    def name(self) -> str:
        """The run's folder name: config, overrides, seed (and tolerance)."""
        parts = [self.config, *(re.sub(r"[^\w.]", "", a) for a in self.model_args), f"seed{self.seed}"]
        if self.tol is not None:
            parts.append(f"tol{self.tol:g}")
        return "-".join(parts)

    @property
    def training(self) -> RunSpec:
        """The training run whose checkpoint this evaluation reads (itself for a training run)."""
        return replace(self, tol=None)


@dataclass(frozen=True)
class Variant:
    """One configuration of a claim, trained (or evaluated) once per seed."""

    label: str
    config: str = "deqdet_tiny"
    model_args: tuple[str, ...] = ()
    tol: float | None = None

    def spec(self, seed: int) -> RunSpec:
        return RunSpec(self.config, seed, self.model_args, self.tol)


@dataclass(frozen=True)
class Comparison:
    """``a`` against ``b``, each a (variant label, metric name): the claim says ``sign * (a - b) > 0``.

    `kind` ``"better"`` holds when the difference is significant; ``"not_worse"`` holds unless it is
    significant the other way.
    """

    label: str
    a: tuple[str, str]
    b: tuple[str, str]
    sign: int = 1
    kind: str = "better"


@dataclass
class Claim:
    """A claim of the paper: its statement, the variants it trains and the comparisons it is judged by."""

    key: str
    title: str
    statement: str
    variants: list[Variant]
    metrics: list[str]
    comparisons: list[Comparison]
    note: str = ""


@dataclass
class Settings:
    """What every run shares: the recipe's depths, the extra options, the device and the output folder."""

    out: Path
    quick: bool
    device: str | None
    extra: list[str]
    threads: int
    train_depth: int
    test_steps: int
    recipes: dict[str, list[str]] = field(default_factory=dict)
    #: The epochs every detector trains at the full learning rate: before the earliest first drop of the
    #: compared recipes (DEQDet's 7-epoch and AdaMixer's 12-epoch demos share their first 6).
    full_rate_epochs: int | None = None


def full_rate_epochs(recipe: Sequence[str]) -> int:
    """The epochs a recipe trains before its first learning-rate drop (its last ``--epochs`` /
    ``--lr-drops`` given)."""
    options = dict(itertools.pairwise(recipe))  # later options win, as on the command line
    return min([*parse_drops(options.get("--lr-drops", "")), int(options["--epochs"])])


def recipe_value(recipe: Sequence[str], key: str, config: str) -> Any:
    """The recipe's ``--model-arg key=...`` (the last one given), else the config's default."""
    value: Any = getattr(CONFIGS[config], key)
    for flag, arg in itertools.pairwise(recipe):
        if flag == "--model-arg" and arg.startswith(f"{key}="):
            value = json.loads(arg.split("=", 1)[1])
    return value


def _vs(a: str, b: str, metric: str = "AP", label: str | None = None, **kwargs: Any) -> Comparison:
    """Variant `a` against variant `b` on one metric."""
    return Comparison(label or f"{a} vs {b}", (a, metric), (b, metric), **kwargs)


RAG = Variant("RAG k=2 (default)")
JFB = Variant("JFB (k=1)", model_args=("rag_steps=1",))
ADAMIXER = Variant("AdaMixer (6 stages)", config="adamixer_tiny")


def rag_claim(quick: bool) -> Claim:
    """RAG k=2 (DEQDet's ``rag_steps``, the ``k`` of ``implicitkit.RAG``) against k=1 (JFB) and k=3."""
    k3 = [] if quick else [Variant("RAG k=3", model_args=("rag_steps=3",))]
    return Claim(
        "rag",
        "RAG trains better than JFB",
        "The refinement-aware gradient (k=2 grad-attached applications of F) trains a better detector "
        "than the 1-step Jacobian-free backward (k=1).",
        [RAG, JFB, *k3],
        ["AP", "AP50", "AP75"],
        [_vs(RAG.label, JFB.label, label="RAG k=2 vs JFB")]
        + [_vs(v.label, JFB.label, label="RAG k=3 vs JFB") for v in k3],
    )


def rap_claim(quick: bool) -> Claim:
    """Content noise only (the demo's default) and the paper's RAP (content and box noise) against RAP off,
    and box noise only."""
    demo, off = (
        Variant("content only (default)"),
        Variant("RAP off", model_args=("rap_content_prob=0", "rap_box_prob=0")),
    )
    parts = (
        []
        if quick
        else [
            Variant("content + box (the paper's)", model_args=("rap_box_prob=0.2",)),
            Variant("box only", model_args=("rap_content_prob=0", "rap_box_prob=0.2")),
        ]
    )
    return Claim(
        "rap",
        "RAP helps",
        "Refinement-aware perturbation of the no-grad path (content and box noise) improves AP.",
        [demo, off, *parts],
        ["AP", "AP50", "AP75"],
        [_vs(v.label, off.label) for v in (demo, *parts)],
    )


def refinement_claim(depth: int) -> Claim:
    """The refinement curves of the RAG, JFB and AdaMixer runs: AP after 0, `depth` and 2 `depth` steps."""
    at0, at_depth, at_2x = "AP after 0 steps", f"AP after {depth} steps", f"AP after {2 * depth} steps"
    return Claim(
        "refinement",
        "Refinement awareness",
        "AP rises with test-time refinement steps and does not collapse past the training depth; RAG "
        "makes F a better refiner than JFB does, and an explicit stack run past its depth does not hold up.",
        [RAG, JFB, ADAMIXER],
        [at0, at_depth, at_2x],
        [
            Comparison(
                "RAG: AP rises from 0 steps to the training depth", (RAG.label, at_depth), (RAG.label, at0)
            ),
            Comparison(
                "RAG: AP holds from the training depth to 2x",
                (RAG.label, at_2x),
                (RAG.label, at_depth),
                kind="not_worse",
            ),
            _vs(RAG.label, JFB.label, at_2x, label="RAG vs JFB at 2x the training depth"),
            _vs(RAG.label, ADAMIXER.label, at_2x, label="RAG vs AdaMixer (last stage repeated) at 2x"),
        ],
        note=ADAMIXER_CURVE_NOTE,
    )


def convergence_claim() -> Claim:
    """AP after every epoch, DEQDet against the 6-stage AdaMixer."""
    deq, ada = Variant("DEQDet"), ADAMIXER
    first, mean = HALFWAY, FULL_RATE_MEAN
    return Claim(
        "convergence",
        "Faster convergence than AdaMixer",
        "DEQDet reaches a higher AP than the 6-stage AdaMixer after the same number of epochs.",
        [deq, ada],
        [first, mean, "AP"],
        [
            _vs(
                deq.label, ada.label, first, label="DEQDet vs AdaMixer, halfway through the full-rate epochs"
            ),
            _vs(deq.label, ada.label, mean, label="DEQDet vs AdaMixer, averaged over the full-rate epochs"),
        ],
    )


def memory_claim() -> Claim:
    """Memory against depth: no runs, read from the DEQDet-vs-AdaMixer benchmark (:func:`memory_rows`)."""
    return Claim(
        "memory",
        "Less training memory at equal refinement depth",
        "DEQDet's training memory does not grow with the refinement depth; an explicit stack's does.",
        [],
        [],
        [],
    )


def sparse_claim() -> Claim:
    """DEQ Sparse R-CNN against the 6-stage Sparse R-CNN."""
    deq, plain = (
        Variant("DEQ Sparse R-CNN", config="deq_sparse_rcnn_tiny"),
        Variant("Sparse R-CNN", config="sparse_rcnn_tiny"),
    )
    return Claim(
        "sparse",
        "Equilibrium training also improves Sparse R-CNN",
        "DEQ Sparse R-CNN (one shared refinement stage, RAG, RAP) beats the 6-stage Sparse R-CNN.",
        [deq, plain],
        ["AP", "AP50", "AP75"],
        [_vs(deq.label, plain.label)],
    )


def early_exit_claim(test_steps: int, tols: Sequence[float]) -> Claim:
    """The RAG checkpoints with ``--deq-tol`` against the fixed `test_steps` (their training's last eval)."""
    fixed = Variant(f"fixed {test_steps} steps")
    exits = [Variant(f"tol {t:g}", tol=t) for t in tols]
    steps = "mean steps per image"
    return Claim(
        "early_exit",
        "Early exit keeps AP with fewer steps",
        "Stopping each image once its refinement converges keeps the AP of the fixed step count with "
        "fewer refinement steps per image.",
        [fixed, *exits],
        ["AP", "AP50", steps, "evaluation time (s)"],
        [
            c
            for v in exits
            for c in (
                _vs(v.label, fixed.label, label=f"{v.label}: AP kept", kind="not_worse"),
                _vs(v.label, fixed.label, steps, label=f"{v.label}: fewer steps", sign=-1),
            )
        ],
    )


def build_claims(
    keys: Sequence[str], quick: bool, depth: int, test_steps: int, tols: Sequence[float]
) -> list[Claim]:
    """The claims in `keys`; `quick` keeps two variants each (a smoke test of every code path)."""
    makers: dict[str, Callable[[], Claim]] = {
        "rag": lambda: rag_claim(quick),
        "rap": lambda: rap_claim(quick),
        "refinement": lambda: refinement_claim(depth),
        "convergence": convergence_claim,
        "memory": memory_claim,
        "sparse": sparse_claim,
        "early_exit": lambda: early_exit_claim(test_steps, tols),
    }
    return [makers[k]() for k in keys]


def all_specs(
    claims: Iterable[Claim], seeds: Callable[[str], Sequence[int]]
) -> tuple[list[RunSpec], list[RunSpec]]:
    """The distinct training runs and evaluation runs (early exit) the claims need, in a stable order.

    `seeds` gives each claim's seeds (by its key). A fixed-step variant of the early-exit claim reuses its
    training run's last evaluation: the same checkpoint, the same validation images and the trained
    ``test_steps``.
    """
    train: dict[RunSpec, None] = {}
    evals: dict[RunSpec, None] = {}
    for claim in claims:
        for variant in claim.variants:
            for seed in seeds(claim.key):
                spec = variant.spec(seed)
                train[spec.training] = None
                if spec.tol is not None:
                    evals[spec] = None
    return list(train), list(evals)


# -- running the CLI --------------------------------------------------------------------------------------
def command(spec: RunSpec, settings: Settings) -> list[str]:
    """The CLI invocation of `spec`: the recipe, the run's overrides, then the benchmark's options."""
    run_dir = settings.out / "runs" / spec.name
    args = [sys.executable, "-m", "implicitkit_det.cli", *settings.recipes[spec.config]]
    args += [a for kv in spec.model_args for a in ("--model-arg", kv)]
    args += ["--seed", str(spec.seed), "--output-dir", str(run_dir), "--print-freq", "1000"]
    if settings.device:
        args += ["--device", settings.device]
    if spec.tol is None:
        args += ["--eval-every", "1"]
        if CONFIGS[spec.config].arch in ("deqdet", "adamixer"):
            args += ["--refinement-curve", str(2 * settings.train_depth)]
    else:
        trained = settings.out / "runs" / spec.training.name
        args += ["--eval-only", "--resume", str(trained), "--deq-tol", f"{spec.tol:g}"]
    return args + settings.extra


def finished(run_dir: Path, cmd: Sequence[str]) -> dict[str, Any] | None:
    """The run's record if its folder holds a finished run of the same command, else None."""
    marker = run_dir / "run.json"
    if not (marker.is_file() and (run_dir / "metrics.jsonl").is_file()):
        return None
    record = json.loads(marker.read_text())
    if record.get("command") != list(cmd) or record.get("returncode") != 0:
        return None
    if not any("eval" in r for r in read_jsonl(run_dir / "metrics.jsonl")):
        return None
    return record


def execute(spec: RunSpec, settings: Settings) -> dict[str, Any]:
    """Run `spec` as a subprocess (or reuse its finished folder); return its ``run.json`` record."""
    run_dir = settings.out / "runs" / spec.name
    cmd = command(spec, settings)
    record = finished(run_dir, cmd)
    if record is not None:
        print(f"  reused   {spec.name} ({record['wall_s']:.0f}s when run)", flush=True)
        return {**record, "reused": True}
    shutil.rmtree(run_dir, ignore_errors=True)  # what an unfinished run left: it starts again, from scratch
    run_dir.mkdir(parents=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(settings.threads),
        "MKL_NUM_THREADS": str(settings.threads),
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    start = time.perf_counter()
    with (run_dir / "log.txt").open("w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    record = {"command": cmd, "returncode": proc.returncode, "wall_s": time.perf_counter() - start}
    (run_dir / "run.json").write_text(json.dumps(record, indent=1))
    status = "done    " if proc.returncode == 0 else f"FAILED ({proc.returncode})"
    print(f"  {status} {spec.name} in {record['wall_s']:.0f}s", flush=True)
    return record


def run_all(specs: Sequence[RunSpec], settings: Settings, jobs: int) -> dict[RunSpec, dict[str, Any]]:
    """Run `specs`, `jobs` at a time; return each one's record."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {spec: pool.submit(execute, spec, settings) for spec in specs}
        return {spec: future.result() for spec, future in futures.items()}


# -- reading the results ----------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_result(run_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one finished run: per-epoch AP, the last evaluation, the refinement curve."""
    evals = (
        [r for r in read_jsonl(run_dir / "metrics.jsonl") if "eval" in r] if record["returncode"] == 0 else []
    )
    if not evals:
        return {"error": f"the run failed (exit code {record['returncode']}); see {run_dir / 'log.txt'}"}
    last = evals[-1]["eval"]
    out: dict[str, Any] = {
        "AP_per_epoch": [{"epoch": r["epoch"], "AP": r["eval"]["AP"]} for r in evals],
        **{k: last[k] for k in ("AP", "AP50", "AP75")},
        "mean_steps": last.get("mean_steps"),
        "eval_s": last.get("time_s"),
        "wall_s": record["wall_s"],
    }
    curve_file = run_dir / "refinement_curve.json"
    if curve_file.is_file():
        out["refinement_curve"] = json.loads(curve_file.read_text())["curve"]
    return out


def metrics_of(result: dict[str, Any], depth: int, full_rate_epochs: int | None = None) -> dict[str, float]:
    """The named metrics the claims compare, from one run's numbers; the per-epoch mean over the first
    `full_rate_epochs` (every epoch when None)."""
    per_epoch = [p["AP"] for p in result["AP_per_epoch"]]
    metrics = {
        "AP": result["AP"],
        "AP50": result["AP50"],
        "AP75": result["AP75"],
        # Halfway, not after epoch 1: a set-prediction detector scores near 0 after its first epoch here.
        HALFWAY: per_epoch[min(len(per_epoch), max(1, (full_rate_epochs or len(per_epoch)) // 2)) - 1],
        FULL_RATE_MEAN: statistics.fmean(per_epoch[:full_rate_epochs]),
    }
    if result.get("mean_steps") is not None:
        metrics["mean steps per image"] = result["mean_steps"]
    if result.get("eval_s") is not None:
        metrics["evaluation time (s)"] = result["eval_s"]
    curve = {p["steps"]: p["AP"] for p in result.get("refinement_curve") or []}
    for steps in (0, depth, 2 * depth):
        if steps in curve:
            metrics[f"AP after {steps} steps"] = curve[steps]
    return metrics


def claim_rows(
    claim: Claim, seeds: Sequence[int], results: dict[RunSpec, dict[str, Any]], settings: Settings
) -> list[dict[str, Any]]:
    """One row per (variant, seed): the run's numbers and the claim's metrics."""
    rows = []
    for variant in claim.variants:
        for seed in seeds:
            spec = variant.spec(seed)
            result = results[spec] if spec.tol is not None else results[spec.training]
            if claim.key != "refinement":  # the curve is the refinement claim's; kept once in the JSON
                result = {k: v for k, v in result.items() if k != "refinement_curve"}
            row = {
                "claim": claim.key,
                "variant": variant.label,
                "seed": seed,
                "run": spec.name,
                "config": spec.config,
                "model_args": list(spec.model_args),
                "tol": spec.tol,
                **result,
            }
            if "error" not in result:
                row["metrics"] = metrics_of(result, settings.train_depth, settings.full_rate_epochs)
            rows.append(row)
    return rows


def memory_rows(results_dir: Path = RESULTS) -> list[dict[str, Any]]:
    """Training-step memory against refinement depth from the DEQDet-vs-AdaMixer benchmark's results.

    Depth is the decoder layer applications in a training step: AdaMixer's stage count; DEQDet's
    no-grad training steps (plus its init layer and two supervised refinements, the same for every depth).
    """
    rows = []
    for name in MEMORY_SOURCES:
        path = results_dir / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        source = {"claim": "memory", "source": f"benchmarks/results/{name}", "preset": data["preset"]}
        for m in data.get("models", []):
            if m["config"].startswith(("deqdet", "adamixer")):
                stages = re.search(r"(\d+) stages", m["model"])
                default = data["overrides"].get("train_steps", CONFIGS[m["config"]].train_steps)
                depth = int(stages.group(1)) if stages else default
                rows.append(
                    {
                        **source,
                        "variant": m["model"],
                        "depth": depth,
                        "step_mib": m["step_mib"],
                        "peak_rss_mib": m["peak_rss_mib"],
                        "step_s": m["step_s"],
                    }
                )
        for m in data.get("memory", []):
            branches = len(m["supervise_steps"])
            rows.append(
                {
                    **source,
                    "variant": f"DEQDet, {branches} RAG branch(es), {m['backward']}",
                    "depth": m["train_steps"],
                    "step_mib": m["step_mib"],
                    "peak_rss_mib": m["peak_rss_mib"],
                    "step_s": m["step_s"],
                }
            )
    return rows


# -- statistics and tables --------------------------------------------------------------------------------
def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


#: Below this mean AP (COCO AP as a fraction) on both sides, a comparison of AP is not judged.
AP_FLOOR = 0.05


def verdict(
    a: Sequence[float], b: Sequence[float], sign: int = 1, kind: str = "better", *, floor: float | None = None
) -> dict[str, Any]:
    """The verdict rule: the mean difference ``sign * (a - b)`` against ``2 * pooled std / sqrt(n)``; with
    `floor`, no verdict when both means are below it."""
    n = min(len(a), len(b))
    diff = sign * (statistics.fmean(a) - statistics.fmean(b))
    if floor is not None and max(statistics.fmean(a), statistics.fmean(b)) < floor:
        return {
            "difference": diff, "threshold": None, "n": n,
            "verdict": f"not judged: both below AP {floor} (the models learned nothing; investigate the run)",
        }  # fmt: skip
    if n < 2:
        return {"difference": diff, "threshold": None, "n": n, "verdict": "not distinguishable (one seed)"}
    pooled = math.sqrt((statistics.variance(a) + statistics.variance(b)) / 2)
    threshold = 2 * pooled / math.sqrt(n)
    if diff < -threshold:
        text = "does not hold"
    elif kind == "not_worse":
        text = "holds (no significant drop)"
    elif diff > threshold:
        text = "holds"
    else:
        text = "not distinguishable"
    return {"difference": diff, "threshold": threshold, "n": n, "verdict": text}


def _values(rows: Sequence[dict[str, Any]], variant: str, metric: str) -> list[float]:
    return [r["metrics"][metric] for r in rows if r["variant"] == variant and metric in r.get("metrics", {})]


def _cell(values: Sequence[float], metric: str) -> str:
    if not values:
        return "-"
    mean, sd = mean_sd(values)
    if metric.startswith("AP"):
        return f"{100 * mean:.1f} ± {100 * sd:.1f}"
    return f"{mean:.2f} ± {sd:.2f}"


def judge(claim: Claim, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every comparison of `claim` with its verdict."""
    out = []
    for c in claim.comparisons:
        a, b = _values(rows, *c.a), _values(rows, *c.b)
        if not a or not b:
            out.append({"comparison": c.label, "metric": c.a[1], "verdict": "no data (a run failed)"})
            continue
        floor = AP_FLOOR if c.a[1].startswith("AP") else None
        judged = verdict(a, b, c.sign, c.kind, floor=floor)
        out.append({"comparison": c.label, "metric": c.a[1], "kind": c.kind, **judged})
    return out


def verdict_cells(judged: dict[str, Any]) -> list[str]:
    """Comparison, difference, threshold and verdict as table cells (AP metrics in percent points)."""
    scale = 100 if judged.get("metric", "").startswith("AP") else 1

    def number(value: float | None, signed: bool) -> str:
        return (
            "-" if value is None else f"{scale * value:{'+' if signed else ''}.{1 if scale == 100 else 2}f}"
        )

    return [
        judged["comparison"],
        number(judged.get("difference"), True),
        number(judged.get("threshold"), False),
        judged["verdict"],
    ]


VERDICT_HEADERS = ["comparison", "difference (claimed direction)", "2 x pooled std / sqrt(n)", "verdict"]


def claim_markdown(claim: dict[str, Any], statement: bool = True) -> str:
    """The tables of one claim from its ``reproduction.json`` entry: numbers by variant, then verdicts."""
    lines = [f"*{claim['statement']}*", ""] if statement else []
    if claim["key"] == "memory":
        return "\n".join([*lines, memory_markdown(claim["rows"]), "", claim["note"]])
    rows = claim["rows"]
    table = []
    for v in dict.fromkeys(r["variant"] for r in rows):
        seeds = [r for r in rows if r["variant"] == v]
        wall = [r["wall_s"] for r in seeds if "wall_s" in r]
        cells = [_cell(_values(rows, v, m), m) for m in claim["metrics"]]
        failed = sum("error" in r for r in seeds)
        n = f"{len(seeds) - failed}" + (f" ({failed} failed)" if failed else "")
        table.append([v, n, *cells, f"{statistics.fmean(wall):.0f}" if wall else "-"])
    lines.append(markdown_table(["variant", "seeds", *claim["metrics"], "run time (s)"], table))
    lines += ["", "AP in percent (COCO AP x 100), mean ± std over seeds.", ""]
    lines.append(markdown_table(VERDICT_HEADERS, [verdict_cells(j) for j in claim["verdicts"]]))
    if claim.get("note"):
        lines += ["", claim["note"]]
    return "\n".join(lines)


def summary_markdown(data: dict[str, Any]) -> str:
    """Every comparison of every claim with its verdict, in one table."""
    rows = [[c["title"], *verdict_cells(j)] for c in data["claims"] for j in c["verdicts"]]
    return markdown_table(["claim", *VERDICT_HEADERS], rows)


def memory_markdown(rows: Sequence[dict[str, Any]]) -> str:
    table = [
        [
            r["variant"],
            r["preset"],
            str(r["depth"]),
            f"{r['step_mib']:.0f}",
            f"{r['peak_rss_mib']:.0f}",
            f"{r['step_s']:.2f}",
        ]
        for r in rows
    ]
    return markdown_table(
        [
            "model",
            "preset",
            "depth (layers / no-grad steps)",
            "step's memory (MiB)",
            "peak RSS (MiB)",
            "s/step",
        ],
        table,
    )


def memory_verdict(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """DEQDet's step memory against AdaMixer's at the nearest depth (tiny preset; single measurements)."""
    tiny = [r for r in rows if r["preset"] == "tiny"]
    deq = next((r for r in tiny if r["variant"] == "DEQDet"), None)
    stacks = [r for r in tiny if r["variant"].startswith("AdaMixer")]
    if deq is None or not stacks:
        return [], "No DEQDet-vs-AdaMixer results found: run benchmarks/deqdet_vs_adamixer.py first."
    nearest = min(stacks, key=lambda r: abs(r["depth"] - deq["depth"]))
    diff = nearest["step_mib"] - deq["step_mib"]
    text = "holds" if diff > 0 else "does not hold"
    judged = [
        {
            "comparison": f"DEQDet (depth {deq['depth']}) vs {nearest['variant']}",
            "metric": "step's memory (MiB)",
            "difference": diff,
            "threshold": None,
            "verdict": f"{text} (one measurement each, no spread)",
        }
    ]
    note = (
        f"Verdict: {judged[0]['comparison']}: DEQDet's step needs {diff:.0f} MiB less; {judged[0]['verdict']}. "
        "Numbers read from the DEQDet-vs-AdaMixer benchmark (peak RSS of a fresh CPU process), not re-measured."
    )
    return judged, note


# -- plots ------------------------------------------------------------------------------------------------
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _band(ax: Any, xs: Sequence[float], runs: Sequence[Sequence[float]], label: str) -> None:
    """Mean over seeds as a line, min..max over seeds as a band."""
    cols = list(zip(*runs))
    mean = [statistics.fmean(c) for c in cols]
    ax.plot(xs, mean, marker="o", ms=3, label=f"{label} (n={len(runs)})")
    if len(runs) > 1:
        ax.fill_between(xs, [min(c) for c in cols], [max(c) for c in cols], alpha=0.2)


def plot_convergence(data: dict[str, Any], path: Path) -> Path | None:
    pairs = [(c, c["rows"]) for c in data["claims"] if c["key"] in ("convergence", "sparse")]
    if not pairs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.5 * len(pairs), 3.6), squeeze=False)
    for ax, (claim, rows) in zip(axes[0], pairs):
        for variant in dict.fromkeys(r["variant"] for r in rows):
            runs = [
                [100 * p["AP"] for p in r["AP_per_epoch"]]
                for r in rows
                if r["variant"] == variant and "AP_per_epoch" in r
            ]
            if runs:
                n = min(len(r) for r in runs)
                _band(ax, list(range(1, n + 1)), [r[:n] for r in runs], variant)
        _label(ax, xlabel="epoch", ylabel="AP (%)", title=claim["title"])
        ax.xaxis.get_major_locator().set_params(integer=True)
    return _save(fig, path)


def plot_refinement(data: dict[str, Any], path: Path) -> Path | None:
    claim = next((c for c in data["claims"] if c["key"] == "refinement"), None)
    if claim is None:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for variant in dict.fromkeys(r["variant"] for r in claim["rows"]):
        curves = [
            r["refinement_curve"]
            for r in claim["rows"]
            if r["variant"] == variant and r.get("refinement_curve")
        ]
        if curves:
            n = min(len(c) for c in curves)
            _band(
                ax,
                [p["steps"] for p in curves[0][:n]],
                [[100 * p["AP"] for p in c[:n]] for c in curves],
                variant,
            )
    ax.axvline(
        data["train_depth"], color="grey", ls="--", lw=1, label=f"training depth ({data['train_depth']})"
    )
    _label(
        ax,
        xlabel="refinement steps at test",
        ylabel="AP (%)",
        title="Refinement curve (AdaMixer: its stages, then its last stage again)",
    )
    return _save(fig, path)


def plot_memory(data: dict[str, Any], path: Path) -> Path | None:
    claim = next((c for c in data["claims"] if c["key"] == "memory"), None)
    rows = [r for r in (claim or {}).get("rows", []) if r["preset"] == "tiny"]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    series = {
        "AdaMixer (stages)": [r for r in rows if r["variant"].startswith("AdaMixer")],
        "DEQDet, 1 RAG branch (no-grad steps)": [
            r for r in rows if "1 RAG branch(es), branch-wise" in r["variant"]
        ],
        "DEQDet, 6 RAG branches (no-grad steps)": [
            r for r in rows if "6 RAG branch(es), branch-wise" in r["variant"]
        ],
    }
    for label, points in series.items():
        points = sorted(points, key=lambda r: r["depth"])
        if points:
            ax.plot([r["depth"] for r in points], [r["step_mib"] for r in points], marker="o", label=label)
    _label(
        ax,
        xlabel="refinement depth in training",
        ylabel="training step's memory (MiB)",
        title="Training memory against depth (tiny preset, CPU RSS)",
    )
    return _save(fig, path)


def plot_early_exit(data: dict[str, Any], path: Path) -> Path | None:
    claim = next((c for c in data["claims"] if c["key"] == "early_exit"), None)
    if claim is None:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for variant in dict.fromkeys(r["variant"] for r in claim["rows"]):
        steps, ap = (
            _values(claim["rows"], variant, "mean steps per image"),
            _values(claim["rows"], variant, "AP"),
        )
        if steps and ap:
            (s, s_sd), (a, a_sd) = mean_sd(steps), mean_sd(ap)
            ax.errorbar([s], [100 * a], xerr=[s_sd], yerr=[100 * a_sd], marker="o", capsize=3, label=variant)
    _label(
        ax, xlabel="mean refinement steps per image", ylabel="AP (%)", title="Early exit: AP against steps"
    )
    return _save(fig, path)


def _label(ax: Any, **labels: str) -> None:
    """Axis labels and title; the y axis from 0, a light grid, the legend."""
    ax.set(**labels)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


PLOTS: dict[str, Callable[[dict[str, Any], Path], Path | None]] = {
    "convergence": plot_convergence,
    "refinement": plot_refinement,
    "memory": plot_memory,
    "early_exit": plot_early_exit,
}


# -- the report and the docs page -------------------------------------------------------------------------
def report_markdown(data: dict[str, Any]) -> str:
    """``reproduction.md``: the run's header, then every claim's tables."""
    parts = [
        "# The paper's claims at small scale",
        "",
        run_header(data),
    ]
    parts += ["", "## Verdicts", "", summary_markdown(data)]
    for claim in data["claims"]:
        parts += ["", f"## {claim['title']}", "", claim_markdown(claim)]
    return "\n".join(parts) + "\n"


def run_header(data: dict[str, Any]) -> str:
    return (
        f"Seeds {data['seeds']}"
        + "".join(f" ({key}: {seeds})" for key, seeds in data.get("claim_seeds", {}).items())
        + f", device {data['device'] or 'the CLI default'}, {data['jobs']} run(s) at once, "
        f"{data['runs']} CLI runs taking {data['runs_wall_s'] / 60:.1f} minutes summed "
        f"({data['reused']} reused from an earlier invocation); this invocation "
        f"{data['total_wall_s'] / 60:.1f} minutes wall clock. "
        f"Machine: {data['machine']}. Command: `{data['command']}`. Recipe: `{' '.join(data['recipe'])}`"
        + (" (quick: the backbone is not pre-trained)" if data["quick"] else "")
        + "."
    )


def render_docs(data: dict[str, Any], page: Path = DOCS_PAGE) -> Path:
    """Paste the tables of `data` into `page` between its ``<!-- results:KEY -->`` markers."""
    text = page.read_text()
    blocks = {
        "run": run_header(data),
        "summary": summary_markdown(data),
        **{c["key"]: claim_markdown(c, statement=False) for c in data["claims"]},
    }
    for key, body in blocks.items():
        pattern = re.compile(rf"(<!-- results:{key} -->\n).*?(\n<!-- /results:{key} -->)", re.S)
        text, count = pattern.subn(lambda m, body=body: m.group(1) + body + m.group(2), text)
        if not count:
            print(f"warning: {page} has no results:{key} block", flush=True)
    page.write_text(text)
    return page


# -- the program ------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="smoke version: 1 seed, tiny splits, 1 epoch, few variants"
    )
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; quick: 0)")
    p.add_argument(
        "--seeds-for",
        action="append",
        default=[],
        metavar="CLAIM=SEEDS",
        help="other seeds for one claim, e.g. rap=0 (repeatable)",
    )
    p.add_argument(
        "--claims", default=",".join(CLAIM_KEYS), help=f"comma-separated subset of {','.join(CLAIM_KEYS)}"
    )
    p.add_argument(
        "--jobs", type=int, default=1, help="CLI subprocesses at once (default 1; OMP threads = cores / jobs)"
    )
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="the CLI's --device (default: its own)"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="OMP_NUM_THREADS of each run (default: cores / jobs)"
    )
    p.add_argument("--tols", default="0.5,0.2", help="early-exit tolerances (--deq-tol; default 0.5,0.2)")
    p.add_argument(
        "--out", type=Path, default=None, help=f"output folder (default {DEFAULT_OUT}, quick: ..._quick)"
    )
    p.add_argument(
        "--extra-args",
        default="",
        help='more CLI options for every run, given with = (--extra-args="--amp --epochs 6")',
    )
    p.add_argument(
        "--render-docs",
        nargs="?",
        const=DOCS_PAGE,
        type=Path,
        metavar="PAGE",
        help=f"run nothing: paste <out>/reproduction.json's tables into PAGE (default {DOCS_PAGE.relative_to(ROOT)})",
    )
    args = p.parse_args(argv)
    args.out = args.out or (DEFAULT_OUT.with_name("reproduction_quick") if args.quick else DEFAULT_OUT)
    args.seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    args.claims = [c.strip() for c in args.claims.split(",") if c.strip()]
    args.claim_seeds = {}
    for item in args.seeds_for:
        key, _, seeds = item.partition("=")
        if key not in CLAIM_KEYS or not seeds:
            p.error(f"--seeds-for {item!r}: give CLAIM=SEEDS with a claim of {list(CLAIM_KEYS)}, e.g. rap=0")
        args.claim_seeds[key] = [int(s) for s in seeds.split(",")]
    args.seeds_of = lambda key: args.claim_seeds.get(key, args.seeds)
    unknown = sorted(set(args.claims) - set(CLAIM_KEYS))
    if unknown:
        p.error(f"--claims {unknown}: choose from {list(CLAIM_KEYS)}")
    args.tols = [float(t) for t in args.tols.split(",")][: 1 if args.quick else None]
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run (or reuse) every run the chosen claims need; write the JSON, the tables and the plots."""
    args = parse_args(argv)
    json_path = args.out / "reproduction.json"
    if args.render_docs:
        print(f"results pasted into {render_docs(json.loads(json_path.read_text()), args.render_docs)}")
        return {}
    start = time.perf_counter()
    configs = ["deqdet_tiny", "adamixer_tiny", "sparse_rcnn_tiny", "deq_sparse_rcnn_tiny"]
    # Once here, before any subprocess: builds the digits set and pre-trains the backbone (cached).
    quick = list(QUICK_ARGS) if args.quick else []
    recipes = {c: digits_recipe(c, pretrained=not args.quick) + quick for c in configs}
    base = recipes["deqdet_tiny"]
    settings = Settings(
        out=args.out,
        quick=args.quick,
        device=args.device,
        extra=shlex.split(args.extra_args),
        threads=args.threads or max(1, (os.cpu_count() or 1) // args.jobs),
        train_depth=recipe_value(base, "train_steps", "deqdet_tiny"),
        test_steps=recipe_value(base, "test_steps", "deqdet_tiny"),
        recipes=recipes,
        full_rate_epochs=min(full_rate_epochs(r) for r in recipes.values()),
    )
    claims = build_claims(args.claims, args.quick, settings.train_depth, settings.test_steps, args.tols)
    train_specs, eval_specs = all_specs(claims, args.seeds_of)
    print(
        f"{len(train_specs)} training runs, {len(eval_specs)} evaluations, {args.jobs} at a time, "
        f"{settings.threads} thread(s) each; outputs in {args.out / 'runs'}",
        flush=True,
    )
    records = run_all(train_specs, settings, args.jobs)
    records.update(run_all(eval_specs, settings, args.jobs))
    results = {spec: run_result(settings.out / "runs" / spec.name, rec) for spec, rec in records.items()}

    data: dict[str, Any] = {
        "quick": args.quick,
        "seeds": args.seeds,
        "claim_seeds": args.claim_seeds,
        "device": args.device,
        "jobs": args.jobs,
        "train_depth": settings.train_depth,
        "test_steps": settings.test_steps,
        "recipe": base,
        "extra_args": settings.extra,
        "machine": machine() + _gpu(args.device),
        "command": command_line(),
        "runs": len(records),
        "reused": sum(1 for record in records.values() if record.get("reused")),
        "claims": [],
    }
    for claim in claims:
        entry: dict[str, Any] = {
            "key": claim.key,
            "title": claim.title,
            "statement": claim.statement,
            "metrics": claim.metrics,
            "note": claim.note,
        }
        if claim.key == "memory":
            entry["rows"] = memory_rows()
            entry["verdicts"], entry["note"] = memory_verdict(entry["rows"])
        else:
            entry["rows"] = claim_rows(claim, args.seeds_of(claim.key), results, settings)
            entry["verdicts"] = judge(claim, entry["rows"])
        data["claims"].append(entry)
    data["runs_wall_s"] = sum(record["wall_s"] for record in records.values())
    data["total_wall_s"] = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data, indent=1))
    report = report_markdown(data)
    (args.out / "reproduction.md").write_text(report)
    print("\n" + report, flush=True)
    for key, plot in PLOTS.items():
        if key in args.claims and (png := plot(data, args.out / f"reproduction_{key}.png")):
            print(f"saved {png}", flush=True)
    failed = [r["run"] for c in data["claims"] for r in c["rows"] if "error" in r]
    if failed:
        raise SystemExit(f"{len(set(failed))} run(s) failed: {sorted(set(failed))}; see their log.txt")
    return data


def _gpu(device: str | None) -> str:
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return ""
    return f"; GPU {torch.cuda.get_device_name(0)}"


if __name__ == "__main__":
    main()
