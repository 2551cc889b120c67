"""TrainingWrapper: a folder of text documents -> the retrieval database -> batches for DIABLOGPT.

A facade over the parts that do the work: :mod:`diablogpt_pytorch.build` splits the documents
(train / held out), builds or reuses the database files and opens them as datasets;
:mod:`diablogpt_pytorch.data` serves the batches (``DIABLOGPTDataset``, ``StepBatchSampler``);
:mod:`diablogpt_pytorch.optim` makes the optimizer; :mod:`diablogpt_pytorch.distributed` wraps
the model under ``torchrun``; :mod:`diablogpt_pytorch.evaluation`,
:mod:`diablogpt_pytorch.checkpoint` and :mod:`diablogpt_pytorch.generation` evaluate, save and
sample. ``get_optimizer``, ``lr_schedule``, ``StepBatchSampler``, ``split_documents`` and
``held_out_path`` are importable from here as before.

faiss/autofaiss/transformers are imported only inside the methods that build or query the
database, so importing this module stays light.
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch.utils.data import DataLoader

from diablogpt_pytorch import build
from diablogpt_pytorch import checkpoint as ckpt
from diablogpt_pytorch import distributed
# moved to build/optim/data; re-exported so that imports from this module keep working
from diablogpt_pytorch.build import held_out_path, split_documents
from diablogpt_pytorch.data import StepBatchSampler
from diablogpt_pytorch.evaluation import autocast_context, evaluate
from diablogpt_pytorch.optim import get_optimizer, lr_schedule

__all__ = ["TrainingWrapper", "get_optimizer", "lr_schedule", "StepBatchSampler",
           "split_documents", "held_out_path"]

logger = logging.getLogger(__name__)


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
        index: the faiss index: ``"auto"`` (exact when it fits the budget, else approximate),
            ``"exact"``, ``"autofaiss"`` or a faiss factory string (see ``index.build_index``).
        rescore: float32 rescoring of a compressed (PQ/SQ) index's candidates: ``None`` (default)
            on for compressed indexes with a tuned factor, 0 off, n: n x K candidates re-ranked
            with the embeddings (see ``index.build_index``).

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
    itself when the script has not yet): rank 0 chunks the documents, every rank embeds and
    searches its share of the training chunks (``build.build_split_files``; the files equal the
    single-process build's), rank 0 builds the held-out split while the others wait, then every
    rank opens the files read-only;
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
        index: str = "auto",
        rescore: Optional[int] = None,
    ):
        from diablogpt_pytorch.database import embedder as emb
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
        self.index_spec = index
        self.rescore = rescore
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
                        "(distributed.init_distributed) so that the ranks build the database together")
            distributed.init_distributed(device=self.device)

        self.paths = {
            "chunks": Path(chunks_memmap_path),
            "seqs": Path(seqs_memmap_path),
            "doc_ids": Path(doc_ids_memmap_path),
        }
        self.valid_paths = {name: held_out_path(p) for name, p in self.paths.items()}
        self.train_documents, self.valid_documents = split_documents(
            build.list_documents(self.documents_path, self.glob), self.documents_path,
            self.valid_fraction
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
        self.build_settings = build.BuildSettings(
            chunk_size=self.chunk_size, seq_len=self.seq_len, knn=self.knn,
            embedder=self.embedder, tokenizer=self.tokenizer, max_chunks=self.max_chunks,
            max_seqs=self.max_seqs, knn_extra_neighbors=self.knn_extra_neighbors,
            max_index_memory_usage=self.max_index_memory_usage,
            current_memory_available=self.current_memory_available,
            embed_device=self.embed_device, embed_batch_size=self.embed_batch_size,
            index_batch_size=self.index_batch_size, embed_dtype=self.embed_dtype,
            index=self.index_spec, rescore=self.rescore)
        # the training split: every rank takes part (under torchrun each embeds and searches its
        # share); the held-out split: rank 0 builds or validates it (the others wait); then every
        # rank opens the files
        settings = self.build_settings
        built = {"train": build.build_split_files(settings, self.train_documents, self.paths,
                                                  train=True)}
        with distributed.main_process_first("building the held-out split") as main:
            if main:
                if self.valid_documents:
                    built["valid"] = build.build_split_files(
                        settings, self.valid_documents, self.valid_paths, train=False,
                        db_paths=self.paths)
                from diablogpt_pytorch.database import write_manifest

                write_manifest(self, built)  # database.json: what each file is, counts, embedder
        built = distributed.broadcast_object(built, what="sharing the database layout")
        self.train_stats = built["train"][0]
        self.train_ds = build.open_split(settings, self.paths, built["train"])
        logger.info("training split: %s", self.train_stats)
        self.valid_ds, self.valid_stats, self.valid_num_bytes = None, None, None
        if self.valid_documents:
            self.valid_stats = built["valid"][0]
            self.valid_ds = build.open_split(settings, self.valid_paths, built["valid"],
                                             db_paths=self.paths,
                                             db_num_chunks=self.train_stats["chunks"])
            logger.info("held-out split: %s", self.valid_stats)
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
        """UTF-8 bytes a split's token ids decode to (``build.decoded_num_bytes``)."""
        return build.decoded_num_bytes(self.tokenizer, paths, stats["chunks"], self.chunk_size)

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
        return build.database_info(self.build_settings, self.paths, self.train_stats["chunks"])

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
            from diablogpt_pytorch.database.retriever import Retriever

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
