"""Checkpoints: model config + weights (+ optimizer, step, RNG state), saved atomically.

One file, written with ``torch.save`` to a temporary name beside the target and renamed. It holds
only tensors, numbers, strings, lists and dicts, so it loads with ``torch.load(weights_only=True)``
(no arbitrary unpickling). The model config is stored as a JSON string:

    {
      "format": "diablogpt-checkpoint", "version": 1,
      "config_json": '{"num_tokens": 30522, ...}',      # DIABLOGPT(**json.loads(...))
      "model_class": "DIABLOGPT",                        # or "RetroFitted" (absent: DIABLOGPT)
      "model": state_dict,
      "optimizer": state_dict or None,
      "step": int,
      "rng": {"torch": ByteTensor, "cuda": [ByteTensor, ...], "python": [...], "numpy": [...]},
      "rng_ranks": [rng of rank 0, rng of rank 1, ...],  # one per rank under torchrun
      "extra_json": '{...}'                              # caller's JSON-serialisable extras
    }

``load_model`` rebuilds a model for inference from the file alone: no documents folder, no
optimizer. ``load_checkpoint`` restores weights, optimizer and RNG state for an exact resume.

A retro-fitted model (:class:`diablogpt_pytorch.retrofit.RetroFitted`) with a frozen base stores
only its new weights; its config names the base model's folder and the SHA-256 of its weights,
and rebuilding it loads that base and refuses one whose weights differ.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from diablogpt_pytorch._io import atomic_path

logger = logging.getLogger(__name__)

FORMAT = "diablogpt-checkpoint"
VERSION = 1


def rng_state() -> dict[str, Any]:
    """Every random state training draws from (torch CPU/CUDA, Python, numpy), as plain data."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": _to_lists(random.getstate()),
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states saved by ``rng_state`` (its tensors may be on any device with data:
    torch and numpy need them as CPU tensors, so they are copied there first)."""
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    random.setstate(_to_tuples(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))


def rank_rng_states() -> list[dict[str, Any]]:
    """Every rank's :func:`rng_state`, in rank order (a collective under torchrun: call it on all
    ranks; ``[rng_state()]`` in one process)."""
    from diablogpt_pytorch import distributed

    return distributed.all_gather_object(rng_state(), what="gathering the ranks' RNG states")


def restore_rank_rng(payload: dict[str, Any]) -> None:
    """Restore this rank's RNG state from a checkpoint payload: its own entry of ``rng_ranks``
    when the checkpoint was saved by as many ranks as there are now (an exact resume). Saved by
    another number of ranks, every RNG is seeded afresh from the step with
    :func:`diablogpt_pytorch.distributed.seed_everything` (each rank its own stream), with a
    warning: the run continues, but not as the uninterrupted one would have."""
    from diablogpt_pytorch import distributed

    states = payload.get("rng_ranks") or [payload["rng"]]
    rank, world = distributed.get_rank(), distributed.get_world_size()
    if len(states) == world:
        set_rng_state(states[rank])
        return
    logger.warning("the checkpoint holds the RNG states of %d rank(s) but %d rank(s) resume: "
                   "seeding each rank's RNG from step %d instead (not an exact resume)",
                   len(states), world, int(payload["step"]))
    distributed.seed_everything(int(payload["step"]))


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def _to_device(x, device: torch.device):
    """``x`` (nested dicts/lists of tensors and plain values) with every tensor moved to ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device) for v in x)
    return x


def save_checkpoint(
    path: os.PathLike | str,
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    step: int = 0,
    extra: Optional[dict[str, Any]] = None,
    rng_states: Optional[list[dict[str, Any]]] = None,
) -> Path:
    """Write ``model`` (with its ``config``), ``optimizer``, ``step`` and the RNG state to ``path``.

    ``model`` must have a JSON-serialisable ``config`` dict with ``type(model)(**config)``
    rebuilding it. ``rng_states``: every rank's RNG state (:func:`rank_rng_states`) when one rank
    saves for all; default: this process's alone. The file appears only once complete
    (temporary name + rename).
    """
    path = Path(path)
    config = getattr(model, "config", None)
    if not isinstance(config, dict):
        raise TypeError(
            f"{type(model).__name__} has no `config` dict; save_checkpoint needs it to rebuild "
            "the model (use DIABLOGPT)"
        )
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config_json": json.dumps(config, sort_keys=True),
        "model_class": type(model).__name__,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": int(step),
        "rng": rng_states[0] if rng_states else rng_state(),
        "rng_ranks": list(rng_states) if rng_states else None,
        "extra_json": json.dumps(extra or {}, sort_keys=True),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    logger.info("saved checkpoint at step %d to %s", step, path)
    return path


def read_checkpoint(path: os.PathLike | str, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint file safely (``weights_only=True``) and check its format.

    Returns the payload with ``config`` and ``extra`` decoded from JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(
            f"{str(path)!r} is not a diablogpt checkpoint (written by "
            "diablogpt_pytorch.checkpoint.save_checkpoint)"
        )
    if payload.get("version") != VERSION:
        raise ValueError(
            f"checkpoint {str(path)!r} has format version {payload.get('version')}, this library "
            f"reads version {VERSION}"
        )
    payload["config"] = json.loads(payload["config_json"])
    payload["extra"] = json.loads(payload["extra_json"])
    return payload


def load_model(path: os.PathLike | str, map_location: Any = "cpu"):
    """A ``DIABLOGPT`` (or ``RetroFitted``) rebuilt from a checkpoint's config and weights, in
    eval mode.

    Needs only the checkpoint file: no documents folder, memmaps or optimizer. A retro-fitted
    model also loads its base model from the folder its config names, which must hold the same
    weights as when it was retro-fitted.
    """
    from diablogpt_pytorch.model import DIABLOGPT

    payload = read_checkpoint(path, map_location=map_location)
    model_class = payload.get("model_class", "DIABLOGPT")
    if model_class == "DIABLOGPT":
        model = DIABLOGPT(**payload["config"])
    elif model_class == "RetroFitted":
        from diablogpt_pytorch.retrofit import RetroFitted

        model = RetroFitted(**payload["config"])
    else:
        raise ValueError(f"checkpoint {str(path)!r} holds a {model_class!r}, which load_model cannot "
                         "rebuild (it rebuilds DIABLOGPT and RetroFitted)")
    model.load_state_dict(payload["model"])
    return model.eval()


def load_checkpoint(
    path: os.PathLike | str,
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    restore_rng: bool = True,
    map_location: Any = "cpu",
) -> dict[str, Any]:
    """Restore ``model`` (and ``optimizer``, RNG state) from ``path`` to resume training exactly.

    The model's config must equal the saved one. Under torchrun each rank restores its own RNG
    state (:func:`restore_rank_rng`). ``map_location`` (a device or device string)
    places the model and optimizer tensors of the returned payload; the RNG state always loads on
    the CPU, where ``torch.set_rng_state`` and numpy need it. Returns the payload (``step``,
    ``extra``, ...).
    """
    payload = read_checkpoint(path, map_location="cpu")
    if map_location is not None and torch.device(map_location) != torch.device("cpu"):
        device = torch.device(map_location)
        payload["model"] = _to_device(payload["model"], device)
        payload["optimizer"] = _to_device(payload["optimizer"], device)
    config = getattr(model, "config", None)
    if config is not None and json.loads(json.dumps(config)) != payload["config"]:
        diff = sorted(
            k for k in set(config) | set(payload["config"])
            if json.loads(json.dumps(config.get(k))) != payload["config"].get(k)
        )
        if "base_sha256" in diff:
            raise ValueError(
                f"checkpoint {str(path)!r} was retro-fitted onto a base model with weights sha256 "
                f"{payload['config'].get('base_sha256')}, but this model's base "
                f"({config.get('base')!r}) has sha256 {config.get('base_sha256')}: retro-fit the "
                "base the checkpoint was made from, or use load_model(path)"
            )
        raise ValueError(
            f"checkpoint {str(path)!r} was saved from a model with a different config (differs "
            f"in {diff}); build the model with read_checkpoint(path)['config'] or load_model(path)"
        )
    model.load_state_dict(payload["model"])
    if optimizer is not None:
        if payload["optimizer"] is None:
            raise ValueError(f"checkpoint {str(path)!r} holds no optimizer state to resume from")
        optimizer.load_state_dict(payload["optimizer"])
    if restore_rng:
        restore_rank_rng(payload)
    return payload
