"""The reproduction benchmark's smoke version runs every claim end to end through the CLI."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "reproduction.py"
CLAIMS = {"rag", "rap", "refinement", "convergence", "memory", "sparse", "early_exit"}
PLOTS = {"convergence", "refinement", "memory", "early_exit"}


def _finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


@pytest.mark.slow
def test_reproduction_quick_covers_every_claim(tmp_path):
    out = tmp_path / "repro"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    cmd = [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    data = json.loads((out / "reproduction.json").read_text())
    claims = {c["key"]: c for c in data["claims"]}
    assert set(claims) == CLAIMS
    for key, claim in claims.items():
        assert claim["rows"], key
        assert claim["verdicts"], key
        assert all("verdict" in v for v in claim["verdicts"])
        if key == "memory":
            assert all(_finite(r["depth"], r["step_mib"], r["peak_rss_mib"]) for r in claim["rows"])
            continue
        for row in claim["rows"]:
            assert "error" not in row, row
            assert _finite(row["AP"], row["AP50"], row["AP75"], row["wall_s"]), row
            assert row["AP_per_epoch"] and _finite(*(p["AP"] for p in row["AP_per_epoch"]))
            assert _finite(*row["metrics"].values()), row
            assert row["seed"] == 0
    depth = data["train_depth"]
    for row in claims["refinement"]["rows"]:
        assert [p["steps"] for p in row["refinement_curve"]] == list(range(2 * depth + 1))
    early = {r["variant"]: r for r in claims["early_exit"]["rows"]}
    tol_rows = [r for r in early.values() if r["tol"] is not None]
    assert tol_rows and all(0 < r["mean_steps"] <= data["test_steps"] for r in tol_rows)

    assert {p.name for p in out.glob("*.png")} == {f"reproduction_{k}.png" for k in PLOTS}
    report = (out / "reproduction.md").read_text()
    assert all(f"## {c['title']}" in report for c in data["claims"])

    # The docs page's result blocks are filled from the JSON.
    page = tmp_path / "reproduction.md"
    shutil.copy(ROOT / "docs" / "reproduction.md", page)
    subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--render-docs", str(page)],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    text = page.read_text()
    assert "To be filled" not in text
    assert "RAG k=2 vs JFB" in text and "DEQ Sparse R-CNN vs Sparse R-CNN" in text

    # A second run reuses every finished run instead of training again.
    again = subprocess.run(
        [*cmd, "--claims", "rag"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reused" in again.stdout and "  done" not in again.stdout


def test_seeds_for_gives_one_claim_its_own_seeds(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import reproduction

    args = reproduction.parse_args(["--seeds", "0,1,2", "--seeds-for", "rap=0", "--seeds-for", "sparse=4,5"])
    assert args.seeds_of("rap") == [0] and args.seeds_of("sparse") == [4, 5]
    assert args.seeds_of("rag") == [0, 1, 2]
    with pytest.raises(SystemExit):
        reproduction.parse_args(["--seeds-for", "nope=1"])
