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


# ----------------------------------------------------------------------------- dependencies

# Releases current when these bounds were set: the required set must admit them (numpy 2 above
# all: autofaiss, which needs numpy<2, is an extra), so that the package installs beside them.
CURRENT_RELEASES = {"numpy": ["2.0.0", "2.4.6"], "faiss-cpu": ["1.15.1"], "torch": ["2.15.0"],
                    "pyarrow": ["26.0.1"], "transformers": ["5.25.0"]}


def _setup_py_keyword(name: str):
    tree = ast.parse((REPO_ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            for keyword in node.keywords:
                if keyword.arg == name:
                    return ast.literal_eval(keyword.value)
    raise AssertionError(f"setup.py has no setup({name}=...) literal")


def _check_requirements(requirements: list, where: str) -> None:
    from packaging.requirements import Requirement

    required = {}
    for line in requirements:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            required[req.name.lower()] = req
    assert "autofaiss" not in required, f"{where}: autofaiss must be an extra, not required"
    for name, versions in CURRENT_RELEASES.items():
        assert name in required, f"{where}: {name} is not required"
        for v in versions:
            assert required[name].specifier.contains(v), (
                f"{where}: {required[name]} excludes {name} {v}")


def test_setup_py_requirements_admit_numpy_2_and_current_releases():
    _check_requirements(_setup_py_keyword("install_requires"), "setup.py")
    extras = _setup_py_keyword("extras_require")
    assert any(r.startswith("autofaiss") for r in extras["autofaiss"])


def test_installed_metadata_admits_numpy_2_and_current_releases():
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("diablogpt-pytorch")
    except PackageNotFoundError:
        pytest.skip("diablogpt-pytorch is not pip-installed in this environment")
    # an editable install's metadata: a dist-info naming this checkout, or the egg-info beside
    # setup.py that the install wrote (found first when the repository root is on sys.path)
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    here = (direct.get("url", "").removeprefix("file://") == str(REPO_ROOT)
            or Path(dist.locate_file("")).resolve() == REPO_ROOT)
    if not here:
        pytest.skip(f"the installed diablogpt-pytorch is not this checkout (its url: "
                    f"{direct.get('url')}, its files: {dist.locate_file('')})")
    _check_requirements(dist.requires or [], "the installed metadata")


def test_tiny_database_build_under_the_installed_numpy(tmp_path):
    """Chunks, embeddings, a faiss index and neighbours from four short texts, in a fresh
    interpreter, with whatever numpy (1.x or 2.x) and faiss-cpu are installed."""
    probe = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "import numpy as np, faiss\n"
        "from diablogpt_pytorch import retrieval\n"
        "out = Path(sys.argv[1])\n"
        "docs = out / 'docs'; docs.mkdir()\n"
        "texts = ['The cat sat on the mat and looked at the garden for a long time. ' * 3,\n"
        "         'Rivers carry water from the mountains down to the open sea. ' * 3,\n"
        "         'A compiler turns source code into machine instructions quickly. ' * 3,\n"
        "         'The orchestra played a symphony in the old concert hall. ' * 3]\n"
        "for i, t in enumerate(texts): (docs / f'{i}.txt').write_text(t)\n"
        "stats = retrieval.text_folder_to_chunks_(docs, '*.txt', out / 'db.chunks.dat',\n"
        "    out / 'db.seq.dat', out / 'db.doc_ids.dat', chunk_size=16, seq_len=64)\n"
        "n = stats['chunks']\n"
        "path, index = retrieval.chunks_to_precalculated_knn_(num_nearest_neighbors=2,\n"
        "    num_chunks=n, chunk_size=16, chunk_memmap_path=out / 'db.chunks.dat',\n"
        "    doc_ids_memmap_path=out / 'db.doc_ids.dat', num_extra_neighbors=1)\n"
        "knn = np.fromfile(path, dtype=np.int32).reshape(n, 2)\n"
        "doc_ids = np.fromfile(out / 'db.doc_ids.dat', dtype=np.int32)\n"
        "print(json.dumps(dict(numpy=np.__version__, faiss=faiss.__version__, n=n,\n"
        "    ntotal=index.ntotal, docs=len(set(doc_ids.tolist())),\n"
        "    valid=bool((knn >= 0).all() and (knn < n).all()),\n"
        "    other_doc=bool((doc_ids[knn] != doc_ids[:, None]).all()))))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"the tiny database build failed:\n{result.stderr}"
    got = json.loads(result.stdout.strip().splitlines()[-1])
    import numpy as np

    assert got["numpy"] == np.__version__
    assert got["n"] >= 8 and got["ntotal"] == got["n"] and got["docs"] == 4
    assert got["valid"] and got["other_doc"]
