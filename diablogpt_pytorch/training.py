"""TrainingWrapper: a folder of text documents -> the retrieval database -> batches for DIABLOGPT.

Pipeline: the documents matching ``glob`` under ``documents_path`` are split
deterministically into a training part and a held-out part (by a hash of each document's path
relative to the folder, so the split does not depend on listing order). Training documents become
the chunks/seqs/doc_ids memmaps, their embeddings, a faiss index and the knn memmap; held-out
documents become the same memmaps with ``.valid`` before the suffix (``train.chunks.dat`` ->
``train.chunks.valid.dat``), whose neighbours are searched in the *training* index (a held-out
chunk never retrieves itself or its own document, which is not in the index).

Every file is built by ``diablogpt_pytorch.retrieval``, which records what it was made from in a
``.meta.json`` sidecar and reuses a file only while that still matches; ``REPROCESS=1`` rebuilds.

faiss/autofaiss/transformers are imported only inside the methods that build or query the
database, so importing this module stays light.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch.utils.data import DataLoader

from diablogpt_pytorch import checkpoint as ckpt
from diablogpt_pytorch import distributed
from diablogpt_pytorch.data import DIABLOGPTDataset
from diablogpt_pytorch.evaluation import autocast_context, evaluate

logger = logging.getLogger(__name__)


def split_documents(
    paths: list[Path], root: Path, valid_fraction: float
) -> tuple[list[Path], list[Path]]:
    """Deterministic (train, valid) split of document ``paths``.

    Documents are ranked by the SHA-1 of their path relative to ``root``; the first
    ``round(valid_fraction * n)`` (at least 1 when ``valid_fraction > 0``, at most n - 1) are held
    out. Both lists come back in sorted path order. With fewer than 2 documents nothing is held
    out.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must lie in [0, 1); got {valid_fraction}")
    n = len(paths)
    if valid_fraction == 0.0 or n < 2:
        return sorted(paths), []
    n_valid = min(n - 1, max(1, round(valid_fraction * n)))
    ranked = sorted(
        paths, key=lambda p: hashlib.sha1(p.relative_to(root).as_posix().encode()).hexdigest()
    )
    return sorted(ranked[n_valid:]), sorted(ranked[:n_valid])


def held_out_path(path: Union[str, os.PathLike], tag: str = "valid") -> Path:
    """``train.chunks.dat`` -> ``train.chunks.valid.dat`` (the held-out split's file)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.{tag}{path.suffix}")


class TrainingWrapper:
    """Builds (or reuses) the retrieval database for a folder of text and serves DIABLOGPT training.

    Args (the seed's):
        diablogpt: the DIABLOGPT to train. Its ``chunk_size`` must equal ``chunk_size``, its
            ``max_seq_len`` is the training sequence length, and its ``num_tokens`` must cover the
            tokenizer's vocabulary.
        knn: neighbours per chunk (K).
        chunk_size: C, tokens per chunk.
        documents_path: folder of text documents; glob: which files in it (e.g. ``'**/*.txt'``).
        chunks_memmap_path, seqs_memmap_path, doc_ids_memmap_path: where the training memmaps go.
        max_chunks, max_seqs: caps on the training database (it stops there, with a warning
            naming how many files were left out).
        knn_extra_neighbors: extra candidates fetched per chunk so that same-document ones can be
            dropped.
        max_index_memory_usage, current_memory_available: faiss index budget (autofaiss style).

    Extras:
        valid_fraction: share of documents held out for ``evaluate`` (0 disables; default 0.1).
        embedder: embedder name or local directory (default: the offline default, or
            ``$DIABLOGPT_EMBEDDER``); its BERT embeds each chunk's text for retrieval.
        tokenizer: the language model's tokenizer (see ``diablogpt_pytorch.tokenizer``): None or
            ``"bert"`` (default): the embedder's WordPiece (30522 ids, uncased, not lossless);
            ``"train"``: a lossless byte-level BPE of ``tokenizer_vocab_size`` ids trained on the
            training documents, stored beside the database as ``<chunks stem>.tokenizer.json``
            (retrained when the documents or size change); a SentencePiece ``.model`` file, a
            ``tokenizer.json`` file, a local Hugging Face tokenizer directory, or an
            ``LMTokenizer``. ``wrapper.tokenizer`` is the loaded one (``encode``, ``decode``,
            ``pad_id``, ``eos_id``, ``vocab_size``); its fingerprint is recorded in the database's
            sidecars, so changing it rebuilds the files that depend on it.
        tokenizer_vocab_size: vocabulary size for ``tokenizer="train"``.
        device: where evaluation and generation run (default: the model's device).
        embed_device: where the embedder runs while building (default: ``device``).
        bf16: bfloat16 autocast in ``autocast()``, ``evaluate`` and ``generate``.
        embed_batch_size: chunks embedded and written per step (the embedder runs them
            embedder.forward_batch_size() rows at a time); index_batch_size: queries per faiss
            search; embed_dtype: embedder precision ('float32' or 'bfloat16'; default: the
            retrieval module's default).

    Under ``torchrun`` (the wrapper calls ``diablogpt_pytorch.distributed.init_distributed()``
    itself when the script has not yet): rank 0 builds or validates the database while the
    other ranks wait, then every rank opens it read-only;
    ``train_model`` is the model wrapped in DistributedDataParallel; ``get_dataloader`` shards the
    sequences with a DistributedSampler; ``evaluate`` splits the held-out set across ranks and
    sums the counts; ``save_checkpoint`` writes from rank 0 only (a single process loads it).
    """

    def __init__(
        self,
        *,
        diablogpt: torch.nn.Module,
        knn: int = 2,
        chunk_size: int = 64,
        documents_path: Union[str, os.PathLike] = "./text_folder",
        glob: str = "**/*.txt",
        chunks_memmap_path: Union[str, os.PathLike] = "./train.chunks.dat",
        seqs_memmap_path: Union[str, os.PathLike] = "./train.seq.dat",
        doc_ids_memmap_path: Union[str, os.PathLike] = "./train.doc_ids.dat",
        max_chunks: int = 1_000_000,
        max_seqs: int = 100_000,
        knn_extra_neighbors: int = 100,
        max_index_memory_usage: str = "100m",
        current_memory_available: str = "1G",
        valid_fraction: float = 0.1,
        embedder: Optional[str] = None,
        device: Optional[Union[str, torch.device]] = None,
        embed_device: Optional[Union[str, torch.device]] = None,
        bf16: bool = False,
        embed_batch_size: int = 128,
        index_batch_size: int = 4096,
        embed_dtype: Optional[str] = None,
        tokenizer: Any = None,
        tokenizer_vocab_size: Optional[int] = None,
    ):
        from diablogpt_pytorch import embedder as emb
        from diablogpt_pytorch import tokenizer as lm_tokenizer

        self.model = diablogpt
        self.knn = int(knn)
        self.chunk_size = int(chunk_size)
        self.seq_len = int(diablogpt.max_seq_len)
        self.documents_path = Path(documents_path)
        self.glob = glob
        self.max_chunks, self.max_seqs = int(max_chunks), int(max_seqs)
        self.knn_extra_neighbors = int(knn_extra_neighbors)
        self.max_index_memory_usage = max_index_memory_usage
        self.current_memory_available = current_memory_available
        self.valid_fraction = float(valid_fraction)
        self.embedder = emb.resolve_embedder(embedder)
        self.device = torch.device(device) if device is not None else next(diablogpt.parameters()).device
        self.embed_device = torch.device(embed_device) if embed_device is not None else self.device
        self.bf16 = bool(bf16)
        self.embed_batch_size = int(embed_batch_size)
        self.index_batch_size = int(index_batch_size)
        self.embed_dtype = embed_dtype

        if distributed.launched_distributed() and not distributed.is_distributed():
            # built under torchrun before the process group: join it now, or every rank would
            # build the database on the same paths at once
            logger.info("torchrun's environment is set but no process group is: joining it "
                        "(distributed.init_distributed) so that rank 0 alone builds the database")
            distributed.init_distributed(device=self.device)

        self.paths = {
            "chunks": Path(chunks_memmap_path),
            "seqs": Path(seqs_memmap_path),
            "doc_ids": Path(doc_ids_memmap_path),
        }
        self.valid_paths = {name: held_out_path(p) for name, p in self.paths.items()}
        self.train_documents, self.valid_documents = split_documents(
            self._documents(), self.documents_path, self.valid_fraction
        )
        self.tokenizer_path = self.paths["chunks"].with_name(
            f"{self.paths['chunks'].stem}.tokenizer.json")
        # rank 0 trains (or validates) a tokenizer first; the others then load it
        with distributed.main_process_first("preparing the tokenizer") as main:
            if isinstance(tokenizer, str) and tokenizer == "train" and not main:
                self.tokenizer = lm_tokenizer.TokenizersLMTokenizer(self.tokenizer_path)
            else:
                self.tokenizer = lm_tokenizer.load_tokenizer(
                    tokenizer, documents=self.train_documents, path=self.tokenizer_path,
                    vocab_size=tokenizer_vocab_size or lm_tokenizer.DEFAULT_VOCAB_SIZE,
                    embedder=self.embedder)
        logger.info("LM tokenizer: %s", self.tokenizer)
        self._check_model()
        # rank 0 builds or validates the files (the others wait); then every rank opens them
        built = None
        with distributed.main_process_first("building the retrieval database") as main:
            if main:
                built = {"train": self._build_files(self.train_documents, self.paths, train=True)}
                if self.valid_documents:
                    built["valid"] = self._build_files(self.valid_documents, self.valid_paths,
                                                       train=False)
                from diablogpt_pytorch.database import write_manifest

                write_manifest(self, built)  # database.json: what each file is, counts, embedder
        built = distributed.broadcast_object(built, what="sharing the database layout")
        self.train_ds, self.train_stats = self._build(self.train_documents, self.paths, train=True,
                                                      built=built["train"])
        self.valid_ds, self.valid_stats, self.valid_num_bytes = None, None, None
        if self.valid_documents:
            self.valid_ds, self.valid_stats = self._build(self.valid_documents, self.valid_paths,
                                                          train=False, built=built["valid"])
            self.valid_num_bytes = self._decoded_num_bytes(self.valid_paths, self.valid_stats)
        self._retriever = None
        # what the training loop calls: DistributedDataParallel(diablogpt) under torchrun
        self.train_model = distributed.wrap_model(self.model, self.device)

    # -- checks --------------------------------------------------------------------------------

    def _check_model(self) -> None:
        model, tok = self.model, self.tokenizer
        if model.chunk_size != self.chunk_size:
            raise ValueError(
                f"DIABLOGPT was built with chunk_size={model.chunk_size} but TrainingWrapper got "
                f"chunk_size={self.chunk_size}: pass the same chunk size to both"
            )
        if self.seq_len % self.chunk_size:
            raise ValueError(
                f"DIABLOGPT max_seq_len={self.seq_len} is not a multiple of chunk_size="
                f"{self.chunk_size}: training sequences are whole chunks"
            )
        if model.num_tokens < tok.vocab_size:
            raise ValueError(
                f"DIABLOGPT num_tokens={model.num_tokens} is smaller than the vocabulary of the "
                f"tokenizer {tok.name!r} ({tok.vocab_size} tokens): build DIABLOGPT with "
                f"num_tokens={tok.vocab_size} (or larger)"
            )
        if model.pad_id != tok.pad_id:
            raise ValueError(
                f"DIABLOGPT pad_id={model.pad_id} differs from the pad id {tok.pad_id} of the "
                f"tokenizer {tok.name!r}: build DIABLOGPT with pad_id={tok.pad_id}"
            )
        if self.knn < 1:
            raise ValueError(f"knn must be at least 1; got {self.knn}")

    def _decoded_num_bytes(self, paths: dict[str, Path], stats: dict[str, Any]) -> int:
        """UTF-8 bytes of the text a split's token ids decode to, document by document (pad and
        eos ids have none): the denominator of bits per byte, comparable across tokenizers."""
        import numpy as np

        from diablogpt_pytorch import retrieval

        n, C = stats["chunks"], self.chunk_size
        tokens = retrieval.open_chunks(paths["chunks"], n, C)[:, :C]
        doc_ids = np.asarray(retrieval.open_doc_ids(paths["doc_ids"], n))
        bounds = [0] + (1 + np.flatnonzero(doc_ids[1:] != doc_ids[:-1])).tolist() + [n]
        docs = [tokens[a:b].reshape(-1).tolist() for a, b in zip(bounds[:-1], bounds[1:])]
        return sum(len(text.encode("utf-8")) for text in self.tokenizer.decode_batch(docs))

    def _documents(self) -> list[Path]:
        folder = self.documents_path
        if not folder.is_dir():
            raise FileNotFoundError(
                f"documents_path {str(folder)!r} is not a folder: point it at a folder of text "
                "files (diablogpt_pytorch.corpus.write_default_corpus writes a default one)"
            )
        paths = sorted(p for p in folder.glob(self.glob) if p.is_file())
        if not paths:
            raise FileNotFoundError(
                f"no files in {str(folder)!r} match glob {self.glob!r}: add documents or fix the glob"
            )
        return paths

    # -- building ------------------------------------------------------------------------------

    def _build_files(self, documents: list[Path], paths: dict[str, Path], train: bool):
        """Build (or reuse) a split's memmaps and knn file; returns (stats, knn_path)."""
        from diablogpt_pytorch import retrieval

        what = "training" if train else "held-out"
        logger.info("%s split: %d documents", what, len(documents))
        stats = retrieval.text_folder_to_chunks_(
            chunks_memmap_path=paths["chunks"],
            seqs_memmap_path=paths["seqs"],
            doc_ids_memmap_path=paths["doc_ids"],
            chunk_size=self.chunk_size,
            seq_len=self.seq_len,
            max_chunks=self.max_chunks if train else 2**31 - 1,
            max_seqs=self.max_seqs if train else 2**31 - 1,
            paths=documents,
            embedder=self.embedder,
            tokenizer=self.tokenizer,
        )
        num_chunks = stats["chunks"]
        if train:
            knn_path, _ = retrieval.chunks_to_precalculated_knn_(
                num_nearest_neighbors=self.knn,
                num_chunks=num_chunks,
                chunk_size=self.chunk_size,
                chunk_memmap_path=paths["chunks"],
                doc_ids_memmap_path=paths["doc_ids"],
                num_extra_neighbors=self.knn_extra_neighbors,
                chunks_to_embeddings_batch_size=self.embed_batch_size,
                max_index_memory_usage=self.max_index_memory_usage,
                current_memory_available=self.current_memory_available,
                knn_batch_size=self.index_batch_size,
                embedder=self.embedder,
                device=self.embed_device,
                dtype=self.embed_dtype,
                # no neighbour from any document packed into the chunk's training sequence
                seqs_memmap_path=paths["seqs"],
                num_seqs=stats["seqs"],
                seq_len=self.seq_len,
                tokenizer=self.tokenizer,
            )
        else:
            if stats["docs"] + stats.get("empty_docs", 0) != len(documents) or stats.get("truncated"):
                raise ValueError(
                    f"the held-out split has {len(documents)} documents but only {stats['docs']} "
                    "were chunked whole; its bits per byte would be wrong"
                )
            knn_path = retrieval.query_chunks_to_knn_(
                num_nearest_neighbors=self.knn,
                num_chunks=num_chunks,
                chunk_size=self.chunk_size,
                chunk_memmap_path=paths["chunks"],
                db_chunk_memmap_path=self.paths["chunks"],
                batch_size=self.embed_batch_size,
                device=self.embed_device,
                embedder=self.embedder,
                tokenizer=self.tokenizer,
            )
        return stats, knn_path

    def _build(self, documents: list[Path], paths: dict[str, Path], train: bool,
               built: Optional[tuple[dict[str, Any], Path]] = None):
        """The split's dataset over its files: ``built`` = (stats, knn_path) from
        ``_build_files`` (run by rank 0), else they are built here."""
        what = "training" if train else "held-out"
        if built is None:
            built = self._build_files(documents, paths, train)
        stats, knn_path = built
        num_chunks = stats["chunks"]
        dataset = DIABLOGPTDataset(
            num_sequences=stats["seqs"],
            num_chunks=num_chunks,
            num_neighbors=self.knn,
            chunk_size=self.chunk_size,
            seq_len=self.seq_len,
            chunk_memmap_path=paths["chunks"],
            chunk_nn_memmap_path=knn_path,
            seq_memmap_path=paths["seqs"],
            doc_ids_memmap_path=paths["doc_ids"],
            eos_id=self.tokenizer.eos_id,
            pad_id=self.tokenizer.pad_id,
            # held-out neighbours are ids into the training database
            db_chunk_memmap_path=None if train else self.paths["chunks"],
            db_num_chunks=None if train else self.train_stats["chunks"],
            db_doc_ids_memmap_path=None if train else self.paths["doc_ids"],
        )
        logger.info("%s split: %s", what, stats)
        return dataset, stats

    # -- training ------------------------------------------------------------------------------

    def get_dataloader(self, **kwargs) -> DataLoader:
        """A ``DataLoader`` over the training sequences; kwargs go to ``DataLoader``.

        Batches are (seq (b, seq_len + 1), retrieved (b, seq_len / C, K, 2C)), int64, on CPU.

        Under torchrun, unless a ``sampler`` or ``batch_sampler`` is given, each rank reads its own
        shard of the sequences through a ``DistributedSampler`` (``shuffle`` and ``seed`` kwargs go
        to it; ``batch_size`` is per rank); call ``loader.sampler.set_epoch(epoch)`` at the start
        of every epoch so that the shuffle differs between epochs.
        """
        if (distributed.is_distributed() and "sampler" not in kwargs
                and "batch_sampler" not in kwargs):
            from torch.utils.data.distributed import DistributedSampler

            kwargs["sampler"] = DistributedSampler(
                self.train_ds, shuffle=kwargs.pop("shuffle", False), seed=kwargs.pop("seed", 0),
                drop_last=kwargs.get("drop_last", False))
        return DataLoader(self.train_ds, **kwargs)

    def get_optimizer(
        self,
        lr: float = 3e-4,
        wd: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        **kwargs,
    ) -> torch.optim.AdamW:
        """AdamW; weight decay ``wd`` on matrices only (not norms, biases, null key/values).

        Parameters are listed in ``named_parameters`` order (deterministic, so optimizer state
        dicts line up on resume). Extra kwargs go to ``torch.optim.AdamW``.
        """
        return get_optimizer(self.model, lr=lr, wd=wd, betas=betas, eps=eps, **kwargs)

    def autocast(self) -> AbstractContextManager:
        """bfloat16 autocast on ``device`` when the wrapper was built with ``bf16=True``."""
        return autocast_context(self.device, self.bf16)

    # -- evaluation ----------------------------------------------------------------------------

    def evaluate(
        self, batch_size: int = 4, max_batches: Optional[int] = None, progress: bool = True
    ) -> dict[str, dict[str, Any]]:
        """Held-out loss, perplexity and bits per byte with retrieval and without it
        (``retrieved=None``), for the same weights.

        Returns ``{'with_retrieval': metrics, 'without_retrieval': metrics}``; see
        ``diablogpt_pytorch.evaluation`` for exactly what is counted. Under torchrun each rank
        evaluates every world_size-th sequence (``max_batches`` is then per rank) and the nats,
        tokens and sequences are summed over ranks, so every rank gets the whole split's figures.
        """
        if self.valid_ds is None:
            raise ValueError(
                "there is no held-out split to evaluate on: build TrainingWrapper with "
                "valid_fraction > 0 over at least 2 documents"
            )
        if not distributed.is_distributed():
            return {
                f"{'with' if use else 'without'}_retrieval": evaluate(
                    self.model, self.valid_ds, use_retrieval=use, batch_size=batch_size,
                    device=self.device, bf16=self.bf16, num_bytes=self.valid_num_bytes,
                    max_batches=max_batches, progress=progress,
                )
                for use in (True, False)
            }
        rank, world = distributed.get_rank(), distributed.get_world_size()
        mine = torch.utils.data.Subset(self.valid_ds, range(rank, len(self.valid_ds), world))
        results = {}
        for use in (True, False):
            part = evaluate(self.model, mine, use_retrieval=use, batch_size=batch_size,
                            device=self.device, bf16=self.bf16, max_batches=max_batches,
                            progress=progress and distributed.is_main()) if len(mine) else dict(
                                nats=0.0, tokens=0, sequences=0)  # more ranks than sequences
            total = distributed.reduce_metrics(
                {k: part[k] for k in ("nats", "tokens", "sequences")},
                what="reducing evaluation metrics")
            loss = total["nats"] / total["tokens"]
            complete = int(total["sequences"]) == len(self.valid_ds)
            results[f"{'with' if use else 'without'}_retrieval"] = dict(
                loss=loss, perplexity=math.exp(loss),
                bits_per_byte=(total["nats"] / (math.log(2) * self.valid_num_bytes)
                               if self.valid_num_bytes and complete else None),
                nats=total["nats"], tokens=int(total["tokens"]),
                sequences=int(total["sequences"]), retrieval=use)
        return results

    # -- checkpoints ---------------------------------------------------------------------------

    def database_info(self) -> dict[str, Any]:
        """What a checkpoint records about the database the model was trained with."""
        return {
            "embedder": self.embedder,
            "tokenizer": self.tokenizer.identity(),
            "knn": self.knn,
            "chunk_size": self.chunk_size,
            "seq_len": self.seq_len,
            "chunks_memmap_path": str(self.paths["chunks"]),
            "doc_ids_memmap_path": str(self.paths["doc_ids"]),
            "num_chunks": int(self.train_stats["chunks"]),
        }

    def save_checkpoint(
        self,
        path: Union[str, os.PathLike],
        optimizer: Optional[torch.optim.Optimizer] = None,
        step: int = 0,
        extra: Optional[dict[str, Any]] = None,
    ) -> Path:
        """Save model config + weights (+ optimizer, step, RNG state) atomically to ``path``.

        Under torchrun only rank 0 writes (the plain model's weights, loadable by one process),
        with every rank's RNG state; every rank returns once the file is complete."""
        extra = dict(extra or {}, database=self.database_info())
        rng_states = ckpt.rank_rng_states()  # every rank's own stream, restored on resume
        with distributed.main_process_first(f"saving checkpoint {path}") as main:
            if main:
                path = ckpt.save_checkpoint(path, self.model, optimizer=optimizer, step=step,
                                            extra=extra, rng_states=rng_states)
        return Path(path)

    def load_checkpoint(
        self, path: Union[str, os.PathLike], optimizer: Optional[torch.optim.Optimizer] = None,
        restore_rng: bool = True,
    ) -> dict[str, Any]:
        """Restore weights (+ optimizer, RNG state) saved by ``save_checkpoint``; returns the
        payload (``payload['step']`` is the step to continue from). Under torchrun each rank
        restores its own RNG state (saved by as many ranks; else each is seeded afresh)."""
        return ckpt.load_checkpoint(path, self.model, optimizer=optimizer, restore_rng=restore_rng,
                                    map_location=self.device)

    # -- generation ----------------------------------------------------------------------------

    @property
    def retriever(self):
        """The generation-time retriever over the training database (built on first use)."""
        if self._retriever is None:
            from diablogpt_pytorch.retrieval import Retriever

            self._retriever = Retriever(
                self.paths["chunks"], self.paths["doc_ids"], embedder=self.embedder,
                device=self.embed_device, tokenizer=self.tokenizer,
            )
        return self._retriever

    def generate(
        self,
        start: Optional[torch.Tensor] = None,
        retrieved: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> torch.Tensor:
        """Sample from the model with retrieval from the training database at chunk boundaries.

        Delegates to ``diablogpt_pytorch.generation.generate(model, retriever, start, retrieved,
        **kwargs)`` (filter_fn, filter_thres, temperature, max_new_tokens, ...; see there), with
        this wrapper's retriever, eos/pad ids, ``num_neighbors=knn`` and, when built with
        ``bf16=True``, bfloat16 autocast as defaults. ``start``: a prompt (t,), a batch (b, t) or
        a list of prompts of different lengths. Returns LongTensor (b, L <= max_seq_len): each
        prompt followed by its sampled tokens, padded after its end.
        """
        from diablogpt_pytorch.generation import generate as _generate

        kwargs.setdefault("eos_id", self.tokenizer.eos_id)
        kwargs.setdefault("pad_id", self.tokenizer.pad_id)
        kwargs.setdefault("num_neighbors", self.knn)
        if self.bf16:
            kwargs.setdefault("autocast_dtype", torch.bfloat16)
        return _generate(self.model, self.retriever, start=start, retrieved=retrieved, **kwargs)

    def ids_to_text(self, ids, stop_at_eos: bool = False):
        """Token ids (L,) or (b, L) -> text with this wrapper's LM tokenizer (see
        ``diablogpt_pytorch.generation.ids_to_text``)."""
        from diablogpt_pytorch.generation import ids_to_text

        return ids_to_text(ids, stop_at_eos=stop_at_eos, tokenizer=self.tokenizer)


def lr_schedule(step: int, steps: int, peak: float, warmup: Optional[int] = None,
                floor: float = 0.1) -> float:
    """The main job's learning rate at ``step`` (0-based) of ``steps``: linear warm-up over
    ``warmup`` steps (default ``min(100, max(1, steps // 10))``), then cosine decay from ``peak``
    to ``floor * peak`` at the last step."""
    warmup = min(100, max(1, steps // 10)) if warmup is None else max(1, int(warmup))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


class StepBatchSampler(torch.utils.data.Sampler):
    """Endless shuffled batches whose order is a function of the step alone, for exact resume.

    Epoch e is ``torch.randperm(num_items)`` under seed ``seed + e``, cut into ``batch_size``
    batches (the last, smaller batch of an epoch is dropped unless it is the only one). Iterating
    from ``start_step`` yields the batches of steps ``start_step, start_step + 1, ...``, so a run
    resumed at step s sees exactly the batches the uninterrupted run saw. Use as
    ``wrapper.get_dataloader(batch_sampler=StepBatchSampler(len(wrapper.train_ds), b, seed, s))``.

    Under torchrun (``world_size`` > 1; by default the current rank and world size) each step's
    global batch of ``batch_size * world_size`` items is cut the same way on every rank (the
    epoch's permutation depends on the epoch alone, as ``DistributedSampler.set_epoch`` makes it)
    and rank r takes its r-th ``batch_size`` slice.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, start_step: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None):
        if num_items <= 0 or batch_size <= 0:
            raise ValueError(f"need num_items > 0 and batch_size > 0; got {num_items}, {batch_size}")
        self.rank = distributed.get_rank() if rank is None else int(rank)
        self.world_size = distributed.get_world_size() if world_size is None else int(world_size)
        if self.world_size > 1 and num_items < batch_size * self.world_size:
            raise ValueError(
                f"{num_items} training sequences cannot fill a global batch of {batch_size} per "
                f"rank x {self.world_size} ranks: use a smaller batch size, fewer ranks or more text")
        self.num_items, self.batch_size = int(num_items), int(batch_size)
        self.seed, self.start_step = int(seed), int(start_step)
        self.batches_per_epoch = max(1, self.num_items // (self.batch_size * self.world_size))

    def __iter__(self):
        step = self.start_step
        while True:
            epoch, position = divmod(step, self.batches_per_epoch)
            order = torch.randperm(self.num_items,
                                   generator=torch.Generator().manual_seed(self.seed + epoch))
            for pos in range(position, self.batches_per_epoch):
                first = (pos * self.world_size + self.rank) * self.batch_size
                yield order[first:first + self.batch_size].tolist()
                step += 1


def get_optimizer(
    model: torch.nn.Module,
    lr: float = 3e-4,
    wd: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    **kwargs,
) -> torch.optim.AdamW:
    """AdamW with two parameter groups: decayed matrices, and undecayed norms/biases/null kv.

    Uses ``model.no_weight_decay_parameter_names()`` when the model has it, else "ndim < 2".
    Both groups list parameters in ``model.named_parameters()`` order (never via sets). Frozen
    parameters are left out. Each group records its parameter names under ``'names'``. Uses the
    fused AdamW kernel where torch has one for the parameters' device (pass ``fused=False`` or
    ``foreach=...`` to choose).
    """
    if hasattr(model, "no_weight_decay_parameter_names"):
        no_decay = model.no_weight_decay_parameter_names()
    else:
        no_decay = {n for n, p in model.named_parameters() if p.ndim < 2}
    decay_names, decay, plain_names, plain = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name in no_decay:
            plain_names.append(name)
            plain.append(param)
        else:
            decay_names.append(name)
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": wd, "names": decay_names},
        {"params": plain, "weight_decay": 0.0, "names": plain_names},
    ]
    groups = [g for g in groups if g["params"]]
    if "fused" not in kwargs and "foreach" not in kwargs:
        # the fused kernel (CPU and CUDA) updates all parameters in one pass per step; without it
        # torch's CPU AdamW loops over parameters one at a time
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):  # older torch, or a device without the kernel
            pass
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kwargs)
