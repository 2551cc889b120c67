"""The ``diablogpt`` command line: build-db, train, eval, generate, neighbours, add/remove-docs.

    diablogpt train                                  # the main job on the default corpus, runs/main
    diablogpt build-db --docs text_folder --db runs/main/db
    diablogpt train --config run.toml --steps 300
    torchrun --standalone --nproc_per_node 2 -m diablogpt_pytorch.cli train   # DDP
    diablogpt eval --model runs/main/model --db runs/main/db
    diablogpt generate --model runs/main/model --db runs/main/db --prompt "A list is"
    diablogpt neighbours --db runs/main/db --chunk 12
    diablogpt add-docs --db runs/main/db new1.txt new2.txt
    diablogpt remove-docs --db runs/main/db 3 new2.txt

Every command reads an optional config file (``--config``: TOML, or YAML when the name ends in
``.yaml``/``.yml`` and PyYAML is installed) whose sections mirror the Python API:
``[model]`` (``DIABLOGPT``'s arguments, plus ``preset``), ``[database]`` (``TrainingWrapper``'s
database arguments), ``[train]``, ``[eval]``, ``[generate]``, ``[neighbours]``, ``[update]``
(add-docs and remove-docs: ``diablogpt_pytorch.database.update``). A command-line flag
overrides the file, which overrides the defaults. ``diablogpt <command> --help`` lists the flags,
each with its config key. A key that no section takes is an error naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

logger = logging.getLogger("diablogpt_pytorch.cli")


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------- fields


@dataclass(frozen=True)
class Field:
    default: Any
    kind: str  # 'int', 'float', 'bool', 'str', 'path', 'ints', 'choice:a,b'
    help: str
    flag: Optional[str] = None  # default: --key-with-dashes


def _model_fields() -> dict[str, Field]:
    from diablogpt_pytorch.config import DIABLOGPTConfig

    fields = {"preset": Field("cpu", "choice:cpu,seed", "starting configuration: 'cpu' (small, "
                              "trains in minutes on CPU) or 'seed' (the 768-wide 12-layer model); "
                              "the other [model] keys override it")}
    for f in dataclasses.fields(DIABLOGPTConfig):
        kind = ("ints" if f.name.endswith("_layers") else
                {"int": "int", "float": "float", "bool": "bool"}.get(type(f.default).__name__, "str"))
        fields[f.name] = Field(None, kind, f"DIABLOGPT({f.name}=...) (default: the preset's)")
    return fields


DATABASE = {
    "folder": Field(None, "path", "folder of the retrieval database (memmaps, index, "
                    "database.json; default: <out>/db for train, runs/main/db for the other "
                    "commands)", flag="--db"),
    "documents": Field(None, "path", "folder of text documents (default: the default corpus, "
                       "written to <db>/../text_folder)", flag="--docs"),
    "glob": Field("**/*.txt", "str", "which files of the documents folder are documents"),
    "knn": Field(2, "int", "neighbours per chunk (K)"),
    "valid_fraction": Field(0.1, "float", "share of documents held out for evaluation"),
    "max_chunks": Field(1_000_000, "int", "cap on the training chunks"),
    "max_seqs": Field(100_000, "int", "cap on the training sequences"),
    "knn_extra_neighbors": Field(100, "int", "extra candidates per chunk for the exclusions"),
    "max_index_memory_usage": Field("100m", "str", "faiss index memory budget"),
    "current_memory_available": Field("1G", "str", "memory for building a compressed index"),
    "index": Field("auto", "str", "faiss index: auto (exact when it fits the budget), exact, "
                   "autofaiss, or a faiss factory string such as HNSW32 or IVF1024_HNSW32,PQ48np"),
    "rescore": Field(None, "int", "float32 rescoring of a compressed (PQ/SQ) index: candidates "
                     "per neighbour re-ranked with the embeddings (default: on for compressed "
                     "indexes, tuned; 0: off)"),
    "embedder": Field(None, "str", "embedder/tokenizer name or folder (default: the offline one)"),
    "embed_device": Field(None, "str", "where the embedder runs (default: the training device)"),
    "embed_batch_size": Field(128, "int", "chunks embedded per step"),
    "index_batch_size": Field(4096, "int", "queries per faiss search"),
    "embed_dtype": Field(None, "str", "embedder precision: float32 or bfloat16"),
    "tokenizer": Field("train", "str", "the LM tokenizer: 'train' (a byte-level BPE trained on "
                       "the training documents, stored in the database folder), 'bert' (the "
                       "embedder's WordPiece), a SentencePiece .model, a tokenizer.json or a "
                       "Hugging Face tokenizer folder; [model] num_tokens and pad_id follow it"),
    "tokenizer_vocab_size": Field(4096, "int", "vocabulary of a trained ('train') tokenizer",
                                  flag="--vocab-size"),
}

TRAIN = {
    "out": Field("runs/main", "path", "folder for checkpoint.pt, model/, loss.png, metrics.json "
                 "and metrics.jsonl (and, by default, the database db/ and the default corpus "
                 "text_folder/)"),
    "steps": Field(150, "int", "optimizer steps in all"),
    "batch_size": Field(4, "int", "sequences per micro-batch"),
    "grad_accum": Field(1, "int", "micro-batches per optimizer step"),
    "lr": Field(1e-3, "float", "peak learning rate (linear warm-up, cosine decay to 0.1 x)"),
    "warmup": Field(None, "int", "warm-up steps (default min(100, steps // 10))"),
    "wd": Field(0.01, "float", "AdamW weight decay (matrices only)"),
    "seed": Field(0, "int", "initialisation and batch-order seed"),
    "device": Field("auto", "str", "cpu, cuda, cuda:1, ... (auto: cuda when available)"),
    "bf16": Field(True, "bool", "bfloat16 autocast"),
    "log_every": Field(10, "int", "steps between loss / lr / tokens-per-second records"),
    "eval_every": Field(50, "int", "steps between held-out evaluations with and without "
                        "retrieval (0: only at the end)"),
    "evals": Field(None, "int", "held-out evaluations spread evenly over training, the last at "
                   "the end (overrides eval_every)"),
    "eval_batches": Field(None, "int", "batches per evaluation (default: the whole held-out split)"),
    "checkpoint_every": Field(50, "int", "steps between checkpoints (0: only at the end)"),
    "tensorboard": Field(None, "path", "also log the metrics as TensorBoard event files in this "
                         "folder (needs pip install tensorboard; without it a warning says so)",
                         flag="--tensorboard"),
    "resume": Field(False, "bool", "continue from <out>/checkpoint.pt"),
    "max_new_tokens": Field(128, "int", "tokens of the sample generated with retrieval and "
                            "printed at the end (0: no sample)"),
}

EVAL = {
    "model": Field("runs/main/model", "path", "model folder (save_pretrained) or checkpoint .pt"),
    "batch_size": Field(4, "int", "sequences per batch"),
    "max_batches": Field(None, "int", "evaluate only the first batches"),
    "device": Field("auto", "str", "cpu, cuda, ... (auto: cuda when available)"),
    "bf16": Field(False, "bool", "bfloat16 autocast"),
    "output": Field(None, "path", "also write the metrics to this JSON file"),
}

GENERATE = {
    "model": Field("runs/main/model", "path", "model folder (save_pretrained) or checkpoint .pt"),
    "prompt": Field("", "str", "text to continue (empty: start a new document)"),
    "max_new_tokens": Field(128, "int", "at most this many new tokens"),
    "temperature": Field(1.0, "float", "sampling temperature (0: greedy)"),
    "filter": Field("top_k", "choice:top_k,top_p,none", "logit filter"),
    "filter_thres": Field(0.9, "float", "filter threshold"),
    "use_retrieval": Field(True, "bool", "retrieve at chunk boundaries"),
    "seed": Field(0, "int", "sampling seed"),
    "device": Field("auto", "str", "cpu, cuda, ... (auto: cuda when available)"),
}

NEIGHBOURS = {
    "chunk": Field(None, "int", "a training chunk id: show its precomputed neighbours"),
    "text": Field(None, "str", "or a text: retrieve for its first chunk"),
    "k": Field(None, "int", "neighbours to show for --text (default: the database's K)"),
}

UPDATE = {
    "glob": Field("**/*.txt", "str", "add-docs: which files of a documents folder are documents"),
    "refresh_neighbours": Field(False, "bool", "add-docs: also search every old chunk's "
                                "neighbours again (a new document can be closer)"),
    "duplicates": Field("error", "choice:error,skip", "add-docs: a document equal to one already "
                        "there is an error, or skipped"),
    "device": Field("cpu", "str", "where the new or re-searched chunks are embedded"),
    "embed_batch_size": Field(256, "int", "chunks embedded per step"),
}

SECTIONS: dict[str, Callable[[], dict[str, Field]]] = {
    "model": _model_fields, "database": lambda: DATABASE, "train": lambda: TRAIN,
    "eval": lambda: EVAL, "generate": lambda: GENERATE, "neighbours": lambda: NEIGHBOURS,
    "update": lambda: UPDATE,
}

COMMANDS = {
    "build-db": (("model", "database"), "build (or reuse) the retrieval database and its "
                 "manifest; [model] gives chunk_size, max_seq_len and the vocabulary"),
    "train": (("model", "database", "train"), "the main job: build or reuse the database, train, "
              "evaluate with and without retrieval, checkpoint, save the model folder "
              "<out>/model, plot <out>/loss.png, write <out>/metrics.json and print a sample "
              "generated with retrieval (under torchrun: DDP, rank 0 writes)"),
    "eval": (("database", "eval"), "held-out loss, perplexity and bits per byte with and without "
             "retrieval"),
    "generate": (("database", "generate"), "sample a continuation with retrieval"),
    "neighbours": (("database", "neighbours"), "show a chunk's retrieved neighbours as text"),
    "add-docs": (("database", "update"), "add text files (or a folder of them) to a built "
                 "database without rebuilding it: only the new chunks are embedded and searched"),
    "remove-docs": (("database", "update"), "remove documents (ids, or the text files that were "
                    "added) from a built database without rebuilding it"),
}

#: the positional arguments of the update commands
POSITIONAL = {
    "add-docs": ("FILES", "text files to add, in this order, or one folder (its files matching "
                 "--glob, sorted)"),
    "remove-docs": ("IDS_OR_FILES", "document ids (a number: as in the doc_ids file) and/or the "
                    "text files of the documents to remove"),
}


def _command_fields(command: str, section: str) -> dict[str, Field]:
    """The keys of ``section`` that ``command`` reads: eval, generate, neighbours, add-docs and
    remove-docs read a built database, so of [database] only its folder (the file's other keys
    are for build-db/train)."""
    fields = SECTIONS[section]()
    if section == "database" and command in ("eval", "generate", "neighbours", "add-docs",
                                              "remove-docs"):
        return {"folder": fields["folder"]}
    return fields


def _flag(key: str, field: Field) -> str:
    return field.flag or "--" + key.replace("_", "-")


def _parse(kind: str, value: Any, where: str) -> Any:
    """A config or flag value checked and converted to ``kind``."""
    if value is None:
        return None
    try:
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind == "ints":
            if isinstance(value, str):
                value = [v for v in value.replace(" ", "").split(",") if v]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return [int(v) for v in value]
        if kind.startswith("choice:"):
            choices = kind.split(":", 1)[1].split(",")
            if value not in choices:
                raise CLIError(f"{where}: {value!r} is not one of {choices}")
            return value
        if not isinstance(value, (str, os.PathLike)):
            raise ValueError
        return str(value)
    except (TypeError, ValueError):
        raise CLIError(f"{where}: {value!r} is not a valid {kind.split(':')[0]} value") from None


def _load_toml(path: Path) -> Any:
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        try:
            import tomli as tomllib
        except ImportError:
            raise CLIError("reading a TOML config needs Python 3.11+ or pip install tomli") from None
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise CLIError(f"config file {str(path)!r} is not valid TOML: {err}") from None


def _load_yaml(path: Path) -> Any:
    try:
        import yaml
    except ImportError:
        raise CLIError(f"config file {str(path)!r} is YAML, which needs PyYAML: pip install pyyaml "
                       "(or pip install 'diablogpt-pytorch[yaml]'), or write it as TOML") from None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise CLIError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    return {} if data is None else data


def read_config(path: Optional[os.PathLike]) -> dict[str, dict[str, Any]]:
    """A config file as ``{section: {key: value}}``, every section and key checked: TOML, or
    YAML (``.yaml``/``.yml``, with PyYAML installed) with the same sections and keys."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"config file {str(path)!r} does not exist")
    yaml_file = path.suffix.lower() in (".yaml", ".yml")
    data = _load_yaml(path) if yaml_file else _load_toml(path)
    if not isinstance(data, dict):
        raise CLIError(f"config file {str(path)!r} must map section names to tables of keys")
    config = {}
    for section, values in data.items():
        if section not in SECTIONS:
            raise CLIError(f"config file {str(path)!r}: unknown section [{section}] (sections: "
                           f"{', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise CLIError(f"config file {str(path)!r}: {section} must be a [{section}] table")
        fields = SECTIONS[section]()
        for key, value in values.items():
            if key not in fields:
                raise CLIError(f"config file {str(path)!r}: [{section}] has no key {key!r} (keys: "
                               f"{', '.join(fields)})")
            config.setdefault(section, {})[key] = _parse(fields[key].kind, value,
                                                          f"{path} [{section}] {key}")
    return config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diablogpt", description="DIABLOGPT (RETRO) from the command line. Each command "
        "reads an optional --config file (TOML, or YAML) whose [sections] mirror the Python API; flags "
        "override it.")
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {__import__('diablogpt_pytorch').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    for command, (sections, description) in COMMANDS.items():
        p = sub.add_parser(command, help=description, description=description)
        p.add_argument("--config", type=Path, default=None,
                       help="config file: TOML, or YAML (.yaml/.yml, needs PyYAML)")
        p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
        if command in POSITIONAL:
            metavar, text = POSITIONAL[command]
            p.add_argument("documents", nargs="+", metavar=metavar, help=text)
        for section in sections:
            group = p.add_argument_group(f"[{section}]")
            for key, field in _command_fields(command, section).items():
                flag = _flag(key, field)
                default = f" (default {field.default})" if field.default not in (None, "") else ""
                if field.kind == "bool":
                    group.add_argument(flag, dest=f"{section}.{key}", default=None,
                                       action=argparse.BooleanOptionalAction,
                                       help=f"{field.help}{default}; config {section}.{key}")
                else:
                    choices = field.kind.split(":", 1)[1].split(",") if ":" in field.kind else None
                    group.add_argument(flag, dest=f"{section}.{key}", default=None,
                                       choices=choices, metavar=key.upper() if not choices else None,
                                       help=f"{field.help}{default}; config {section}.{key}")
    return parser


def resolve(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Defaults, then the config file, then the flags, for the command's sections."""
    sections, _ = COMMANDS[args.command]
    from_file = read_config(args.config)
    config = {}
    for section in sections:
        fields = _command_fields(args.command, section)
        values = {key: field.default for key, field in fields.items()}
        values.update({k: v for k, v in from_file.get(section, {}).items() if k in fields})
        for key, field in fields.items():
            flag_value = getattr(args, f"{section}.{key}", None)
            if flag_value is not None:
                values[key] = _parse(field.kind, flag_value, _flag(key, field))
        config[section] = values
    if args.command in POSITIONAL:
        config["update"]["documents"] = list(args.documents)
    if "database" in config and config["database"]["folder"] is None:
        config["database"]["folder"] = (str(Path(config["train"]["out"]) / "db")
                                        if "train" in config else "runs/main/db")
    return config


# ----------------------------------------------------------------------------- helpers


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"device {name!r} asked for but CUDA is not available: use --device cpu")
    return device


def model_config(section: dict[str, Any], tokenizer=None) -> dict[str, Any]:
    """DIABLOGPT's keyword arguments: the preset with the [model] keys that are set. The
    vocabulary (``num_tokens``, ``pad_id``), unless set, is ``tokenizer``'s (an LMTokenizer)."""
    from diablogpt_pytorch.config import CPU, SEED

    preset = {"cpu": CPU, "seed": SEED}[section["preset"]]
    changes = {k: (tuple(v) if isinstance(v, list) else v) for k, v in section.items()
               if k != "preset" and v is not None}
    if tokenizer is not None:
        changes.setdefault("num_tokens", tokenizer.vocab_size)
        changes.setdefault("pad_id", tokenizer.pad_id)
    return preset.replace(**changes).model_kwargs()


def _documents_folder(db: dict[str, Any]) -> Path:
    """The [database] documents folder; without one, the default corpus beside the database."""
    from diablogpt_pytorch.corpus import write_default_corpus

    if db["documents"]:
        return Path(db["documents"])
    docs = Path(db["folder"]).parent / "text_folder"
    write_default_corpus(docs)
    return docs


def lm_tokenizer(db: dict[str, Any]):
    """The LM tokenizer [database] names; ``'train'`` trains it on the training documents now
    (stored where ``TrainingWrapper`` reuses it), so the model is built with its exact
    vocabulary."""
    from diablogpt_pytorch.tokenizer import load_tokenizer
    from diablogpt_pytorch.build import split_documents

    spec, documents, path = db["tokenizer"], None, None
    if spec == "train":
        folder = _documents_folder(db)
        if not folder.is_dir():
            raise CLIError(f"--docs {str(folder)!r} is not a folder: point it at a folder of text "
                           "files (or leave it out for the default corpus)")
        files = sorted(p for p in folder.glob(db["glob"]) if p.is_file())
        if not files:
            raise CLIError(f"no files in {str(folder)!r} match --glob {db['glob']!r}: add "
                           "documents or fix the glob")
        documents, _ = split_documents(files, folder, db["valid_fraction"])
        path = Path(db["folder"]) / "train.chunks.tokenizer.json"
    try:
        return load_tokenizer(spec, documents=documents, path=path,
                              vocab_size=db["tokenizer_vocab_size"], embedder=db["embedder"])
    except (ValueError, OSError) as err:
        raise CLIError(f"--tokenizer {spec!r}: {err}") from err


def _wrapper(cfg: dict[str, Any], model, device, train: bool = True):
    from diablogpt_pytorch import TrainingWrapper

    db = cfg["database"]
    folder = Path(db["folder"])
    docs = _documents_folder(db)
    try:
        return TrainingWrapper(
            diablogpt=model, knn=db["knn"], chunk_size=model.chunk_size, documents_path=docs,
            glob=db["glob"], chunks_memmap_path=folder / "train.chunks.dat",
            seqs_memmap_path=folder / "train.seq.dat",
            doc_ids_memmap_path=folder / "train.doc_ids.dat", max_chunks=db["max_chunks"],
            max_seqs=db["max_seqs"], knn_extra_neighbors=db["knn_extra_neighbors"],
            max_index_memory_usage=db["max_index_memory_usage"],
            current_memory_available=db["current_memory_available"], index=db["index"],
            rescore=db["rescore"], valid_fraction=db["valid_fraction"], embedder=db["embedder"], device=device,
            embed_device=db["embed_device"], bf16=bool(cfg.get("train", {}).get("bf16")),
            embed_batch_size=db["embed_batch_size"], index_batch_size=db["index_batch_size"],
            embed_dtype=db["embed_dtype"], tokenizer=db["tokenizer"],
            tokenizer_vocab_size=db["tokenizer_vocab_size"])
    except FileNotFoundError as err:
        raise CLIError(str(err)) from err


def load_model(path: os.PathLike, device):
    """A model folder (``save_pretrained``) or a training checkpoint ``.pt``, in eval mode."""
    from diablogpt_pytorch import DIABLOGPT
    from diablogpt_pytorch.checkpoint import load_model as load_checkpoint_model

    path = Path(path)
    if path.is_file():
        return load_checkpoint_model(path, map_location=device)
    if not path.exists() and not path.is_absolute() and str(path).count("/") == 1 \
            and not str(path).startswith("."):
        return DIABLOGPT.from_pretrained(str(path), map_location=device)  # a Hub repo id
    if not path.is_dir():
        raise CLIError(f"model {str(path)!r} does not exist: pass --model a folder written by "
                       "`diablogpt train` (<out>/model) or a checkpoint .pt")
    return DIABLOGPT.from_pretrained(path, map_location=device)


def _open_database(folder):
    from diablogpt_pytorch.database import Database

    try:
        db = Database.open(folder)
        db.tokenizer()  # its LM tokenizer is there and unchanged
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from err
    return db


def _matched_model(cfg: dict[str, Any], section: str, device):
    db = _open_database(cfg["database"]["folder"])
    path = cfg[section]["model"]
    model = load_model(path, device)
    try:
        db.check_model(model, what=f"the model {str(path)!r}")
    except ValueError as err:
        raise CLIError(str(err)) from err
    return db, model


# ----------------------------------------------------------------------------- commands


def cmd_build_db(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    from diablogpt_pytorch import DIABLOGPT

    with torch.device("meta"):  # only its sizes are needed: no weights are allocated
        model = DIABLOGPT(**model_config(cfg["model"], lm_tokenizer(cfg["database"])))
    wrapper = _wrapper(cfg, model, device=torch.device("cpu"))
    result = {"database": str(Path(cfg["database"]["folder"]) / "database.json"),
              "train": wrapper.train_stats, "valid": wrapper.valid_stats,
              "train_documents": len(wrapper.train_documents),
              "valid_documents": len(wrapper.valid_documents)}
    print(json.dumps(result, indent=2))
    return result


def cmd_train(cfg: dict[str, Any]) -> dict[str, Any]:
    """Build or reuse the database, train (``train_loop``), evaluate with and without retrieval,
    checkpoint, save the model folder, plot ``loss.png``, write ``metrics.json`` and print the
    held-out figures and a sample generated with retrieval. Under torchrun every rank runs it and
    rank 0 alone writes, plots, samples and prints."""
    from diablogpt_pytorch import DIABLOGPT, distributed
    from diablogpt_pytorch.tracking import MetricsLogger
    from diablogpt_pytorch.train_loop import evaluation_steps, plot_losses, train_loop

    t = cfg["train"]
    if t["evals"] is not None and t["evals"] < 1:
        raise CLIError(f"--evals {t['evals']}: pass a positive number of evaluations (or leave "
                       "it out for one every --eval-every steps)")
    started = time.time()
    device = _device(t["device"])
    if distributed.launched_distributed():  # torchrun: one device per rank, the group joined
        device = distributed.init_distributed(
            device=None if t["device"] == "auto" else device).device
    main_rank = distributed.is_main()
    out = Path(t["out"])
    out.mkdir(parents=True, exist_ok=True)
    # each rank its own reproducible stream (rank 0's is the one-process run's); DDP copies
    # rank 0's initial weights to the others
    distributed.seed_everything(t["seed"])
    with distributed.main_process_first("preparing the tokenizer"):
        tokenizer = lm_tokenizer(cfg["database"])
    model = DIABLOGPT(**model_config(cfg["model"], tokenizer)).to(device)
    wrapper = _wrapper(cfg, model, device)
    database_seconds = time.time() - started
    optim = wrapper.get_optimizer(lr=t["lr"], wd=t["wd"])
    checkpoint = out / "checkpoint.pt"
    start_step, losses, curve = 0, [], []
    if t["resume"]:
        if not checkpoint.is_file():
            raise CLIError(f"--resume: there is no checkpoint {str(checkpoint)!r} (train without "
                           "--resume first, or point --out at the run to continue)")
        try:
            payload = wrapper.load_checkpoint(checkpoint, optim)
        except ValueError as err:
            raise CLIError(f"{err} (resume with the [model] config it was trained with, or "
                           "train without --resume)") from err
        start_step = int(payload["step"])
        losses = payload.get("extra", {}).get("losses", [])
        curve = payload.get("extra", {}).get("curve", [])
        logger.info("resumed from %s at step %d", checkpoint, start_step)
    steps, batch_size = t["steps"], t["batch_size"]
    tracker = MetricsLogger(out / "metrics.jsonl", t["tensorboard"], start_step,
                            enabled=main_rank)
    try:
        trained = train_loop(
            wrapper, optim, steps=steps, lr=t["lr"], batch_size=batch_size, warmup=t["warmup"],
            grad_accum=t["grad_accum"], seed=t["seed"], start_step=start_step, losses=losses,
            held_out=curve, eval_steps=evaluation_steps(steps, t["evals"], t["eval_every"]),
            eval_batches=t["eval_batches"], log_every=t["log_every"], checkpoint_path=checkpoint,
            checkpoint_every=t["checkpoint_every"], tracker=tracker)
    except FloatingPointError as err:
        raise CLIError(str(err)) from err
    finally:
        tracker.close()
    result = {"steps": steps, "resumed_from": start_step, "checkpoint": str(checkpoint),
              "model": str(out / "model"), "metrics": str(out / "metrics.jsonl"),
              "held_out": trained.held_out, "losses": trained.losses}
    if not main_rank:  # rank 0 alone saves the model folder, plots, samples and reports
        distributed.cleanup()
        return result
    model.save_pretrained(out / "model")
    plot = plot_losses(out / "loss.png", trained.losses, trained.held_out)
    result["loss_plot"] = None if plot is None else str(plot)
    prompt = sample = None
    if t["max_new_tokens"] > 0:
        # the first chunk of a held-out document (else a training one) as the prompt, retrieval
        # at chunk boundaries
        dataset = wrapper.valid_ds if wrapper.valid_ds is not None else wrapper.train_ds
        start = dataset[0][0][None, :model.chunk_size].to(device)
        sampled = wrapper.generate(start, filter_thres=0.9, temperature=1.0,
                                   max_new_tokens=t["max_new_tokens"])
        prompt = wrapper.ids_to_text(start[0])
        sample = wrapper.ids_to_text(sampled[0, start.shape[1]:])
    result["sample"] = sample
    final = trained.final
    gain = (1 - final["with_retrieval"]["loss"] / final["without_retrieval"]["loss"]
            if final else None)
    summary = dict(
        device=str(device), bf16=wrapper.bf16, config=model.config,
        tokenizer=wrapper.tokenizer.identity(), valid_bytes=wrapper.valid_num_bytes,
        steps=steps, batch_size=batch_size, grad_accum=t["grad_accum"],
        world_size=distributed.get_world_size(), train_documents=len(wrapper.train_documents),
        valid_documents=len(wrapper.valid_documents), train_stats=wrapper.train_stats,
        valid_stats=wrapper.valid_stats,
        final_train_loss=sum(trained.losses[-10:]) / max(1, len(trained.losses[-10:])),
        held_out=final, held_out_curve=trained.held_out, retrieval_gain=gain,
        tokens_per_second=trained.tokens_per_second, database_seconds=database_seconds,
        train_seconds=trained.train_seconds, wall_seconds=time.time() - started,
        prompt=prompt, sample=sample)
    from diablogpt_pytorch._io import atomic_path

    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    result["summary"] = str(out / "metrics.json")
    _print_train_report(summary, result)
    distributed.cleanup()
    return result


def _print_train_report(summary: dict[str, Any], result: dict[str, Any]) -> None:
    world, accum = summary["world_size"], summary["grad_accum"]
    print(f"\ndevice {summary['device']}, bf16 {summary['bf16']}, {summary['steps']} steps of "
          f"{summary['batch_size']} x {summary['config']['max_seq_len']} tokens"
          + (f" x {accum} micro-batches" if accum > 1 else "")
          + (f" x {world} ranks" if world > 1 else "")
          + f", {summary['tokens_per_second']:.0f} tokens/s; train docs "
          f"{summary['train_documents']}, held-out docs {summary['valid_documents']}")
    final = summary["held_out"]
    if final:
        print(f"{'held-out':<20}{'loss':>8}{'ppl':>10}{'bpb':>8}")
        for name, key in (("with retrieval", "with_retrieval"),
                          ("without retrieval", "without_retrieval")):
            m = final[key]
            bpb = "-" if m.get("bits_per_byte") is None else f"{m['bits_per_byte']:.3f}"
            print(f"{name:<20}{m['loss']:>8.3f}{m['perplexity']:>10.1f}{bpb:>8}")
        print(f"retrieval gain (loss without / with, same weights): "
              f"{summary['retrieval_gain']:.1%}; along training: "
              + ", ".join(f"step {c['step']} {1 - c['with_retrieval'] / c['without_retrieval']:.1%}"
                          for c in summary["held_out_curve"]))
    if summary["sample"] is not None:
        print(f"\nprompt: {summary['prompt']}")
        print(f"sample: {summary['sample']}")
    plot = result.get("loss_plot") or "not drawn (pip install matplotlib)"
    print(f"\ncheckpoint {result['checkpoint']}, model folder {result['model']}, loss curve "
          f"{plot}, metrics {result['summary']} and {result['metrics']}")
    print(f"wall time {summary['wall_seconds']:.0f}s (database {summary['database_seconds']:.0f}s, "
          f"training {summary['train_seconds']:.0f}s)")


def cmd_eval(cfg: dict[str, Any]) -> dict[str, Any]:
    from diablogpt_pytorch.evaluation import evaluate

    e = cfg["eval"]
    device = _device(e["device"])
    db, model = _matched_model(cfg, "eval", device)
    if model.max_seq_len < db.seq_len:
        raise CLIError(f"the model's max_seq_len {model.max_seq_len} is shorter than the "
                       f"database's sequences ({db.seq_len}): rebuild the database with its length")
    try:
        dataset = db.dataset("valid")
    except ValueError as err:
        raise CLIError(str(err)) from err
    result = {f"{'with' if use else 'without'}_retrieval": evaluate(
        model, dataset, use_retrieval=use, batch_size=e["batch_size"], device=device,
        bf16=e["bf16"], num_bytes=db.manifest["documents"].get("valid_bytes"),
        max_batches=e["max_batches"], progress=False) for use in (True, False)}
    result["retrieval_gain"] = 1 - (result["with_retrieval"]["loss"]
                                    / result["without_retrieval"]["loss"])
    if e["output"]:
        from diablogpt_pytorch._io import atomic_path

        with atomic_path(Path(e["output"])) as tmp:  # complete or absent
            tmp.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


def cmd_generate(cfg: dict[str, Any]) -> str:
    import torch

    from diablogpt_pytorch.generation import generate, ids_to_text, top_k, top_p

    g = cfg["generate"]
    device = _device(g["device"])
    db, model = _matched_model(cfg, "generate", device)
    tok = db.tokenizer()
    ids = tok.encode(g["prompt"])
    if len(ids) >= model.max_seq_len:
        raise CLIError(f"the prompt has {len(ids)} tokens; the model's max_seq_len "
                       f"{model.max_seq_len} leaves no room to generate: shorten it")
    start = torch.tensor([ids]) if ids else None
    sampled = generate(model, db.retriever(device=device) if g["use_retrieval"] else None, start,
                       filter_fn={"top_k": top_k, "top_p": top_p, "none": None}[g["filter"]],
                       filter_thres=g["filter_thres"], temperature=g["temperature"],
                       max_new_tokens=g["max_new_tokens"], use_retrieval=g["use_retrieval"],
                       generator=torch.Generator().manual_seed(g["seed"]),
                       **db.generation_kwargs())
    text = ids_to_text(sampled[0, len(ids):], tokenizer=tok)
    print(ids_to_text(sampled[0], tokenizer=tok))  # the prompt as the model read it, continued
    return text


def cmd_neighbours(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    import numpy as np
    import torch

    from diablogpt_pytorch.neighbours import neighbour_tokens
    from diablogpt_pytorch.database.chunks import open_chunks, open_doc_ids

    n = cfg["neighbours"]
    if (n["chunk"] is None) == (n["text"] is None):
        raise CLIError("pass either --chunk ID (a training chunk) or --text TEXT")
    db = _open_database(cfg["database"]["folder"])
    tok = db.tokenizer()
    C = db.chunk_size
    chunks = open_chunks(db.path("chunks"), db.num_chunks, C)
    doc_ids = open_doc_ids(db.path("doc_ids"), db.num_chunks)

    def text_of(ids):
        return tok.decode([int(i) for i in ids])  # pad and eos ids dropped

    if n["chunk"] is not None:
        chunk = n["chunk"]
        if not 0 <= chunk < db.num_chunks:
            raise CLIError(f"--chunk {chunk} is outside the database's chunks [0, {db.num_chunks})")
        knn = np.memmap(db.path("knn"), dtype=np.int32, mode="r", shape=(db.num_chunks, db.knn))
        ids, scores = np.asarray(knn[chunk], dtype=np.int64), [None] * db.knn
        query = chunks[chunk, :C]
        print(f"chunk {chunk} (document {int(doc_ids[chunk])}): {text_of(query)}")
    else:
        query = tok.encode(n["text"])[:C]
        if not query:
            raise CLIError("--text has no tokens")
        query = query + [db.pad_id] * (C - len(query))
        found, found_scores = db.retriever().search(torch.tensor([query]), n["k"] or db.knn)
        ids, scores = found[0].numpy(), found_scores[0].tolist()
        print(f"query: {text_of(query)}")
    tokens = neighbour_tokens(chunks, ids[None], doc_ids=doc_ids, pad_id=db.pad_id)[0]
    shown = []
    for rank, (i, score, row) in enumerate(zip(ids.tolist(), scores, tokens), 1):
        if i < 0:
            print(f"  {rank}. none")
            continue
        item = {"chunk": i, "document": int(doc_ids[i]), "score": score,
                "text": text_of(row[:C]), "continuation": text_of(row[C:])}
        shown.append(item)
        score_text = "" if score is None else f", score {score:.3f}"
        print(f"  {rank}. chunk {i} (document {item['document']}{score_text}): {item['text']}\n"
              f"     continuation: {item['continuation']}")
    return shown


def _update_database(cfg: dict[str, Any], action: str, documents) -> dict[str, Any]:
    from diablogpt_pytorch.database import update

    u = cfg["update"]
    folder = Path(cfg["database"]["folder"])
    _open_database(folder)  # a missing or unfinished database: one line naming it
    try:
        if action == "add":
            result = update.add_documents(
                folder, documents, glob=u["glob"], refresh_neighbours=u["refresh_neighbours"],
                duplicates=u["duplicates"], device=u["device"],
                embed_batch_size=u["embed_batch_size"])
        else:
            result = update.remove_documents(folder, documents, device=u["device"],
                                             embed_batch_size=u["embed_batch_size"])
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from err
    print(json.dumps(result, indent=2))
    return result


def cmd_add_docs(cfg: dict[str, Any]) -> dict[str, Any]:
    given = [Path(p) for p in cfg["update"]["documents"]]
    if len(given) == 1 and given[0].is_dir():
        documents = given[0]
    else:
        for path in given:
            if not path.is_file():
                raise CLIError(f"{str(path)!r} is not a file: pass text files to add, or one "
                               "folder of them")
        documents = given
    return _update_database(cfg, "add", documents)


def cmd_remove_docs(cfg: dict[str, Any]) -> dict[str, Any]:
    documents = [int(item) if item.isdigit() else Path(item)
                 for item in cfg["update"]["documents"]]
    return _update_database(cfg, "remove", documents)


HANDLERS = {"build-db": cmd_build_db, "train": cmd_train, "eval": cmd_eval,
            "generate": cmd_generate, "neighbours": cmd_neighbours,
            "add-docs": cmd_add_docs, "remove-docs": cmd_remove_docs}


def run(argv: Optional[Sequence[str]] = None):
    """Run one command line (``argv`` without the program name); returns the command's result.
    A user error is printed as one line and exits with status 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    other_rank = os.environ.get("RANK", "0") != "0"  # under torchrun rank 0 alone logs progress
    logging.basicConfig(level=logging.WARNING if args.quiet or other_rank else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return HANDLERS[args.command](resolve(args))
    except CLIError as err:
        print(f"diablogpt {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``diablogpt`` console script."""
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
