"""The wheel is installable on its own: built from a copy of the source tree, installed into a fresh venv
(``--system-site-packages``, so torch and the other dependencies are not downloaded again) and run from a
folder with no ``eval/`` or ``adapters/``, it lists the tasks, evaluates a task by name and fine-tunes with a
recipe by name: the task and recipe YAMLs travel inside it (``vlmkit/_shipped/``, copied by ``setup.py``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(cmd, cwd, env, timeout=600) -> subprocess.CompletedProcess:
    run = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"{cmd}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run


def _yaml_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.yaml"))


def test_built_wheel_carries_tasks_and_recipes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "_shipped")
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("vlmkit", "eval", "adapters"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VLMKIT_TASKS_DIR", "VLMKIT_ADAPTERS")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1")

    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "-q", "-w", dist], tmp_path, env)
    (wheel,) = dist.glob("vlmkit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("eval", "adapters"):  # every YAML of the top-level folders, subfolders included
        files = _yaml_files(REPO / folder)
        assert files
        missing = [f for f in files if f"vlmkit/_shipped/{folder}/{f}" not in names]
        assert not missing, missing
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "[lmms_eval.models]" in entry_points and "vlmkit.evaluation.lmms_bridge:lmms_manifest" in entry_points

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", venv], tmp_path, env)
    py, exe = venv / "bin" / "python", venv / "bin" / "vlmkit"
    _run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], tmp_path, env)

    run_dir = tmp_path / "elsewhere"  # no eval/ or adapters/ here, and no source tree above
    run_dir.mkdir()
    where = _run([py, "-c", "import vlmkit, vlmkit.resources as r; print(vlmkit.__file__); "
                  "print(r.data_dir('eval')); print(r.data_dir('adapters'))"], run_dir, env).stdout.split()
    site = venv.resolve()
    assert all(Path(w).resolve().is_relative_to(site) for w in where), where  # the installed copy, not the tree
    assert where[1].endswith(os.path.join("_shipped", "eval")) and where[2].endswith(os.path.join("_shipped", "adapters"))

    listed = _run([exe, "eval", "--tasks", "list"], run_dir, env).stdout
    for path in (REPO / "eval").glob("*.yaml"):
        if not path.name.startswith("_"):
            assert yaml.safe_load(path.read_text())["task"] in listed, path.name

    (run_dir / "data").mkdir()
    _run([exe, "eval", "--model", "tiny:llava", "--tasks", "shapes_vqa", "--limit", "2", "--data-root", "data",
          "--output", "evals", "--quiet"], run_dir, env)
    (results,) = (run_dir / "evals").rglob("*_results.json")
    assert json.loads(results.read_text())["n-samples"]["shapes_vqa"]["effective"] == 2

    _run([exe, "shapes", "--out", "shapes", "--n", "4", "--seed", "0", "--size", "32"], run_dir, env)
    _run([exe, "finetune", "--recipe", "lora", "--model", "tiny:llava", "--data", "shapes/llava_shapes_vqa.json",
          "--output", "ft", "--max-steps", "1", "--batch-size", "1", "--quiet"], run_dir, env)
    meta = json.loads((run_dir / "ft" / "finetune.json").read_text())
    assert Path(meta["recipe_file"]).resolve().is_relative_to(site) and meta["steps"] == 1
    assert (run_dir / "ft" / "adapter_model.safetensors").is_file()
