"""Packaging contract: light imports and a single source of truth for the version.

Importing the package (and its public names) must not pull in the heavy retrieval stack
(faiss, autofaiss, transformers): those are imported inside the retrieval functions that need
them. Checked in a fresh interpreter, because this test process may already have imported them.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
HEAVY_MODULES = ("faiss", "autofaiss", "transformers")


def _heavy_modules_after(import_statement: str) -> list:
    """Run `import_statement` in a fresh interpreter; return the heavy modules it loaded."""
    probe = (
        "import json, sys\n"
        f"{import_statement}\n"
        f"heavy = {HEAVY_MODULES!r}\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "print(json.dumps(loaded))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (
        f"`{import_statement}` failed in a fresh interpreter:\n{result.stderr}"
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "import_statement",
    [
        "import diablogpt_pytorch",
        "from diablogpt_pytorch import DIABLOGPT, TrainingWrapper, DIABLOGPTDataset",
    ],
)
def test_import_does_not_load_retrieval_stack(import_statement):
    loaded = _heavy_modules_after(import_statement)
    assert loaded == [], (
        f"`{import_statement}` imported {loaded}; import faiss/autofaiss/transformers inside the "
        "retrieval functions that use them, not at module level"
    )


def _setup_py_version() -> str:
    """The `version=` keyword of the setup() call in setup.py, read without running it."""
    tree = ast.parse((REPO_ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            for keyword in node.keywords:
                if keyword.arg == "version":
                    return ast.literal_eval(keyword.value)
    raise AssertionError("setup.py has no setup(version=...) literal")


def test_version_matches_setup_py():
    import diablogpt_pytorch

    assert diablogpt_pytorch.__version__ == _setup_py_version()


def test_installed_distribution_version_matches_setup_py():
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("diablogpt-pytorch")
    except PackageNotFoundError:
        pytest.skip("diablogpt-pytorch is not pip-installed in this environment")
    assert installed == _setup_py_version(), (
        "the installed metadata is stale: re-run `pip install -e .`"
    )
