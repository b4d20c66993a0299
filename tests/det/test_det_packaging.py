"""`pip install "implicitkit[det]"` brings everything the demo and the command line import.

The wheel is built from this checkout and installed into a fresh virtual environment with the ``[det]``
extra only (no development or benchmark extras, no site packages), then the command line's ``--help`` and
a one-iteration training run on a tiny bundled digits set run in that environment, from a folder outside
the checkout so that only the installed copy can be imported. Installing torch takes about 80 s here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# One iteration of the smallest DEQDet on a 4-image digits set, evaluated on 2 images, with the pictures the
# demo draws (matplotlib).
ONE_ITERATION = [
    "--config", "deqdet_tiny", "--digits-train", "4", "--digits-val", "2",
    "--image-size", "64", "--max-size", "96", "--batch-size", "2", "--workers", "0",
    "--epochs", "1", "--max-iters", "1", "--warmup-iters", "1", "--print-freq", "1",
    "--model-arg", "num_queries=4", "--model-arg", "train_steps=2", "--model-arg", "supervise_steps=[2]",
    "--model-arg", "test_steps=2", "--refinement-curve", "2", "--save-predictions", "1",
]  # fmt: skip


# Without the checkout on the path (the test suite runs with PYTHONPATH pointing at it), and one thread.
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
CLEAN_ENV["OMP_NUM_THREADS"] = "1"


def run(cmd: list[str], cwd: Path, env: dict[str, str] = CLEAN_ENV) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def det_only_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv holding the wheel of this checkout installed with ``[det]``; its python.

    The venv (about 6 GB: torch's build on this disk carries CUDA) is removed after the module, pass or fail,
    so that repeated runs do not fill the disk.
    """
    tmp = tmp_path_factory.mktemp("packaging")
    # Built from a copy of what the wheel packs, so that the build leaves nothing in the checkout.
    source = tmp / "source"
    for package in ("implicitkit", "implicitkit_det"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    wheels = tmp / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
         str(source)], cwd=tmp)  # fmt: skip
    (wheel,) = wheels.glob("implicitkit-*.whl")
    venv.create(tmp / "venv", with_pip=True)
    python = tmp / "venv" / "bin" / "python"
    try:
        run([str(python), "-m", "pip", "install", "-q", "--no-cache-dir", f"{wheel}[det]"], cwd=tmp)
        yield python
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_det_extra_runs_the_command_line(det_only_env: Path, tmp_path: Path):
    env = {**CLEAN_ENV, "IMPLICITKIT_CACHE": str(tmp_path / "cache")}
    where = run(
        [str(det_only_env), "-c", "import implicitkit_det; print(implicitkit_det.__file__)"], tmp_path, env
    )
    assert str(ROOT) not in where and "site-packages" in where

    helped = run([str(det_only_env), "-m", "implicitkit_det.cli", "--help"], tmp_path, env)
    assert "--config" in helped and "--digits-train" in helped

    out = tmp_path / "run"
    printed = run([str(det_only_env), "-m", "implicitkit_det.cli", *ONE_ITERATION, "--output-dir", str(out)],
                  tmp_path, env)  # fmt: skip
    assert "Average Precision" in printed
    for name in ("checkpoint_last.pth", "metrics.jsonl", "refinement_curve.png", "predictions.png"):
        assert (out / name).is_file(), name


# What a checkout holds beside the tracked files: environments, runs, build leftovers.
UNTRACKED = shutil.ignore_patterns(".git", ".venv*", "outputs", "predictions", "build", "dist", "*.egg-info",
                                   "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis")  # fmt: skip


def test_the_distributions_carry_the_license_and_the_test_suite_what_it_reads(tmp_path: Path):
    """The wheel ships the licence text, and the source distribution its tests with the helpers, docs,
    examples and benchmarks they read (setuptools alone packs ``tests/test_*.py`` and nothing they import)."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=UNTRACKED)
    # setuptools rewrites sys.argv while it builds: the folder is read first.
    build = "import sys; out = sys.argv[1]; from setuptools import build_meta as b; b.build_sdist(out); b.build_wheel(out)"
    run([sys.executable, "-c", build, str(tmp_path / "dist")], cwd=source)
    (sdist,) = (tmp_path / "dist").glob("implicitkit-*.tar.gz")
    (wheel,) = (tmp_path / "dist").glob("implicitkit-*.whl")
    with tarfile.open(sdist) as archive:
        packed = {name.partition("/")[2] for name in archive.getnames()}
    for needed in ("LICENSE", "tests/conftest.py", "tests/problems.py", "tests/docs_blocks.py",
                   "tests/det/conftest.py", "docs/quickstart.md", "examples/deqdet_coco.py",
                   "benchmarks/_common.py"):  # fmt: skip
        assert needed in packed, needed
    assert not any("__pycache__" in name for name in packed)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    assert not any(name.startswith(("tests/", "docs/", "benchmarks/")) for name in names)


def test_the_detection_package_without_its_extra_names_the_extra_to_install():
    """A plain ``pip install implicitkit`` has no torchvision: importing the detection package says which
    extra brings it (a bare ModuleNotFoundError before)."""
    code = "import sys; sys.modules['torchvision'] = None; import implicitkit_det"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "implicitkit_det needs 'torchvision'" in done.stderr
    assert "pip install 'implicitkit[det]'" in done.stderr
