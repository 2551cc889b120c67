"""The benchmarks are a package run from the repository root (``python -m benchmarks.<group>.<name>``):
every module imports in a fresh interpreter whose path holds only the repository root (no module
patches sys.path to find another), and benchmarks/ holds only its groups, the helper package and
results/."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
GROUPS = ("common", "micro", "reference", "end_to_end")


def test_every_benchmark_module_imports_from_the_repository_root():
    probe = (
        "import importlib, json, pkgutil, sys\n"
        "import benchmarks\n"
        "names = sorted(m.name for m in pkgutil.walk_packages(benchmarks.__path__, 'benchmarks.'))\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(names))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"a benchmark module failed to import:\n{result.stderr}"
    names = json.loads(result.stdout.strip().splitlines()[-1])
    scripts = sorted(p for g in GROUPS for p in (REPO_ROOT / "benchmarks" / g).glob("*.py"))
    assert len(scripts) >= 14
    for path in scripts:
        rel = path.relative_to(REPO_ROOT).with_suffix("")
        assert ".".join(rel.parts).removesuffix(".__init__") in names


def test_no_loose_files_beside_the_groups():
    top = {p.name for p in (REPO_ROOT / "benchmarks").iterdir() if not p.name.startswith(".")
           and p.name not in ("__pycache__", "_work")}
    assert top == {"__init__.py", "results", *GROUPS}, (
        "benchmarks/ holds the groups, the helper package and results/ only: "
        f"{sorted(top - {'__init__.py', 'results', *GROUPS})} belong in one of them")
