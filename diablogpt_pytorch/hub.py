"""Hub-style model folders: ``config.json`` + ``model.safetensors``.

The same contract as huggingface_hub's ``PyTorchModelHubMixin``: ``config.json`` holds exactly the
model's constructor keyword arguments (``DIABLOGPT(**json.load(f))`` rebuilds it) and
``model.safetensors`` its state dict (safetensors: tensors only, nothing is unpickled on load).
A folder written by ``save_pretrained`` can be uploaded to the Hub as is, and a Hub repository
holding these two files loads with ``from_pretrained(repo_id)``.

Offline first: a local folder never touches the network. A name that is not a local folder is a
Hub repository id, fetched through ``huggingface_hub`` (its cache, ``HF_HUB_OFFLINE``,
``local_files_only``); when it cannot be fetched the error says so and how to fix it.

Training checkpoints (optimizer, RNG, step; :mod:`diablogpt_pytorch.checkpoint`) keep their role:
they are for resuming; a model folder is for inference and sharing.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from diablogpt_pytorch._io import atomic_path

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

PathLike = Union[str, os.PathLike]


def _looks_like_path(name: str) -> bool:
    """A name that can only mean a local path (a repo id is ``name`` or ``owner/name``)."""
    return name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or Path(name).exists()


def _resolve_files(name_or_path: PathLike, *, revision: Optional[str], cache_dir: Optional[PathLike],
                   local_files_only: bool, token: Optional[Union[str, bool]]) -> tuple[Path, Path]:
    """(config.json, model.safetensors) of a local folder or a Hub repository."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        config, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
        missing = [p.name for p in (config, weights) if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"model folder {str(path)!r} has no {' or '.join(missing)}: it was not written by "
                "DIABLOGPT.save_pretrained (a training checkpoint .pt loads with "
                "diablogpt_pytorch.checkpoint.load_model)")
        return config, weights
    name = str(name_or_path)
    if _looks_like_path(name):
        raise FileNotFoundError(
            f"{name!r} is not a model folder (it does not exist or is a file): pass a folder "
            "written by DIABLOGPT.save_pretrained, or a Hub repository id 'owner/name'")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    files = []
    for filename in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            files.append(Path(hf_hub_download(
                name, filename, revision=revision, cache_dir=cache_dir,
                local_files_only=local_files_only, token=token)))
        except LocalEntryNotFoundError as err:
            raise OSError(
                f"{name!r} is not a local folder, and {filename} of the Hub repository {name!r} is "
                "not in the local Hugging Face cache while the Hub cannot be reached (offline: "
                "HF_HUB_OFFLINE=1 or local_files_only=True, or no network): pass a folder written "
                "by save_pretrained, or download the repository once online") from err
        except RepositoryNotFoundError as err:
            raise OSError(f"{name!r} is neither a local folder nor a Hub repository one can read "
                          "(check the name, or pass token= for a private one)") from err
        except EntryNotFoundError as err:
            raise OSError(f"the Hub repository {name!r} has no {filename}: it was not written by "
                          "DIABLOGPT.save_pretrained") from err
    return files[0], files[1]


def read_config(path: PathLike, cls) -> dict[str, Any]:
    """A ``config.json``'s keyword arguments, checked against ``cls``'s constructor."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not readable JSON ({err}): rewrite it with "
                         "save_pretrained") from err
    if not isinstance(config, dict):
        raise ValueError(f"{str(path)!r} holds a {type(config).__name__}, not a JSON object of "
                         f"{cls.__name__} arguments")
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise ValueError(
            f"{str(path)!r} has keys {unknown} that {cls.__name__} does not take (it takes "
            f"{sorted(accepted)}): the folder was written by another version or another model")
    return config


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` for a module whose ``config`` dict holds its
    constructor keyword arguments (see the module docstring for the folder layout)."""

    config: dict[str, Any]

    def save_pretrained(self, save_directory: PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``save_directory`` (created).

        Each file is written under a temporary name and renamed when complete. Returns the
        folder.
        """
        from safetensors.torch import save_model

        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / CONFIG_NAME) as tmp:
            tmp.write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        with atomic_path(folder / WEIGHTS_NAME) as tmp:
            # save_model de-duplicates shared tensors and makes each contiguous
            save_model(self, str(tmp), metadata={"format": "pt"})
        logger.info("saved %s to %s (%s, %s)", type(self).__name__, folder, CONFIG_NAME,
                    WEIGHTS_NAME)
        return folder

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: PathLike, *,
                        map_location: Union[str, torch.device] = "cpu",
                        revision: Optional[str] = None, cache_dir: Optional[PathLike] = None,
                        local_files_only: bool = False, token: Optional[Union[str, bool]] = None,
                        strict: bool = True, **config_overrides: Any):
        """The model saved in a folder by ``save_pretrained``, or in a Hub repository.

        Args:
            pretrained_model_name_or_path: a local folder (never any network access), else a
                Hub repository id ``owner/name`` fetched through huggingface_hub (offline it
                must be in the Hugging Face cache; otherwise a clear ``OSError``).
            map_location: device the weights are loaded to.
            revision, cache_dir, local_files_only, token: passed to ``hf_hub_download``.
            strict: every parameter must be in the file and nothing else (default).
            config_overrides: constructor arguments replacing the saved ones (e.g. dropout);
                ones that change a weight's shape make loading fail.

        Returns:
            the model in eval mode.
        """
        config_path, weights_path = _resolve_files(
            pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir,
            local_files_only=local_files_only, token=token)
        config = read_config(config_path, cls)
        bad = sorted(set(config_overrides) - (set(inspect.signature(cls.__init__).parameters)
                                               - {"self"}))
        if bad:
            raise TypeError(f"{cls.__name__}.from_pretrained got unknown config overrides {bad}")
        config.update(config_overrides)
        model = cls(**config)
        from safetensors.torch import load_model

        device = torch.device(map_location)
        try:
            missing, unexpected = load_model(model, str(weights_path), strict=strict,
                                             device=str(device))
        except RuntimeError as err:
            raise ValueError(f"{str(weights_path)!r} does not fit the model its config "
                             f"{str(config_path)!r} describes: {err}") from err
        if missing or unexpected:
            logger.warning("%s: missing %s, unexpected %s (strict=False)", weights_path,
                           sorted(missing), sorted(unexpected))
        return model.to(device).eval()
