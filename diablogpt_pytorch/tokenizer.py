"""The language model's tokenizer, apart from the retrieval embedder's.

The language model reads and writes ids of an :class:`LMTokenizer`; the frozen BERT that embeds
chunks for retrieval keeps its own WordPiece and embeds each chunk's *decoded text*
(:func:`diablogpt_pytorch.database.embedder.embed_chunks`), as in the RETRO paper (Borgeaud et al. 2022,
§2.3: a SentencePiece vocabulary for the model, BERT for the retrieval keys).

Every tokenizer exposes ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``encode_batch``,
``decode_batch``, ``pad_id``, ``eos_id``, ``vocab_size``, ``name``, ``kind`` and ``identity()``
(a JSON-able record with a content fingerprint, written into the database's provenance sidecars
so that files made with another tokenizer are rebuilt). ``decode`` drops pad and eos ids.

Implementations:

- :class:`BertLMTokenizer` (``"bert"``, the library default): the embedder's uncased WordPiece
  (30522 ids for the default embedder). Not lossless (lower case, no newlines or accents), but
  its ids are the embedder's own, so chunks are embedded without re-tokenisation.
- :class:`TokenizersLMTokenizer`: a ``tokenizers`` ``tokenizer.json``; what
  :func:`train_bpe_tokenizer` (``"train"``) writes: a byte-level BPE (Sennrich et al. 2016;
  Radford et al. 2019) trained on the documents, lossless for any text (every byte is a token, so
  case, whitespace, newlines and any Unicode round-trip exactly).
- :class:`SentencePieceLMTokenizer`: a SentencePiece ``.model`` file (Kudo & Richardson 2018).
- :class:`HFDirLMTokenizer`: a local Hugging Face tokenizer directory, loaded offline.

Where a tokenizer has no pad token, one id is appended after its vocabulary (``pad_id ==
vocab_size - 1``). Special-token strings that occur in a text (a literal ``"<eos>"``) are
tokenized as text, never as the special id.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

#: Special tokens of a trained tokenizer: ``<pad>`` is id 0 (DIABLOGPT's default ``pad_id``),
#: ``<eos>`` id 1.
PAD_TOKEN, EOS_TOKEN = "<pad>", "<eos>"
TRAINED_PAD_ID, TRAINED_EOS_ID = 0, 1
#: Default vocabulary of a trained tokenizer (README "Install and run the main job" says why).
DEFAULT_VOCAB_SIZE = 4096
TRAIN_FORMAT_VERSION = 1


def _sha256_files(paths: Iterable[Path], names: bool = True) -> str:
    """Digest of the files' contents (and names, for a folder's files), not of where they are."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        if names:
            h.update(p.name.encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()[:32]


class LMTokenizer:
    """Interface of the language model's tokenizer (see the module docstring)."""

    kind: str = "abstract"
    name: str
    vocab_size: int
    pad_id: int
    eos_id: int
    #: embedder name whose BERT ids these are (then chunks are embedded without re-tokenising)
    embedder_ids: Optional[str] = None

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_batch([ids])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        raise NotImplementedError

    def _strip(self, ids: Sequence[int]) -> list[int]:
        pad, eos = self.pad_id, self.eos_id
        return [int(i) for i in ids if int(i) != pad and int(i) != eos]

    def fingerprint(self) -> str:
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What provenance sidecars record: kind, name, content fingerprint, sizes and ids."""
        return {"kind": self.kind, "name": self.name, "fingerprint": self.fingerprint(),
                "vocab_size": int(self.vocab_size), "pad_id": int(self.pad_id),
                "eos_id": int(self.eos_id)}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, "
                f"pad_id={self.pad_id}, eos_id={self.eos_id})")


class BertLMTokenizer(LMTokenizer):
    """The embedder's own WordPiece as the LM vocabulary (pad = [PAD], eos = [SEP])."""

    kind = "bert"

    def __init__(self, embedder: Optional[str] = None):
        from diablogpt_pytorch.database import embedder as emb

        self.embedder = emb.resolve_embedder(embedder)
        self._tok = emb.get_tokenizer(self.embedder)
        info = emb.tokenizer_info(self.embedder)
        self.name = self.embedder
        self.vocab_size, self.pad_id, self.eos_id = info.vocab_size, info.pad_id, info.eos_id
        self.embedder_ids = self.embedder
        self._identity = emb.embedder_identity(self.embedder)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # split_special_tokens: a literal "[SEP]"/"[PAD]" in a text is text, not the eos/pad id
        return self._tok(list(texts), add_special_tokens=False, return_attention_mask=False,
                         return_token_type_ids=False, verbose=False,
                         split_special_tokens=True)["input_ids"]

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        return [self._tok.decode(self._strip(ids), skip_special_tokens=True) for ids in batch]

    def fingerprint(self) -> str:
        return self._identity


class TokenizersLMTokenizer(LMTokenizer):
    """A ``tokenizers`` ``tokenizer.json`` (what :func:`train_bpe_tokenizer` writes).

    pad = the ``<pad>`` token (else an id appended after the vocabulary), eos = ``<eos>`` (else
    ``</s>``, ``<|endoftext|>`` or ``[SEP]``)."""

    kind = "tokenizers"

    def __init__(self, path: PathLike):
        from tokenizers import Tokenizer

        self.path = Path(path)
        try:
            tok = Tokenizer.from_file(str(self.path))
        except Exception as err:  # tokenizers raises its own exception type
            raise ValueError(f"{self.path} is not a tokenizers tokenizer.json ({err}): pass a "
                             "file written by tokenizers' Tokenizer.save, or another tokenizer "
                             "spec") from err
        tok.encode_special_tokens = True  # "<eos>" written in a text is text
        self._tok = tok
        self.name = str(self.path)
        size = tok.get_vocab_size(with_added_tokens=True)
        eos = next((tok.token_to_id(t) for t in (EOS_TOKEN, "</s>", "<|endoftext|>", "[SEP]")
                    if tok.token_to_id(t) is not None), None)
        if eos is None:
            raise ValueError(f"{self.path} has no end-of-document token ({EOS_TOKEN}, </s>, "
                             "<|endoftext|> or [SEP]): add one as a special token")
        pad = tok.token_to_id(PAD_TOKEN)
        if pad is None:
            pad, size = size, size + 1
        self.vocab_size, self.pad_id, self.eos_id = size, pad, eos
        self._fingerprint = _sha256_files([self.path], names=False)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        return self._tok.decode_batch([self._strip(ids) for ids in batch],
                                      skip_special_tokens=False)

    def fingerprint(self) -> str:
        return self._fingerprint


class SentencePieceLMTokenizer(LMTokenizer):
    """A SentencePiece ``.model`` file. pad = its pad id (else an id appended after the
    vocabulary), eos = its eos id (required). Lossless only as far as the model's normaliser is."""

    kind = "sentencepiece"

    def __init__(self, path: PathLike):
        try:
            import sentencepiece as spm
        except ImportError as err:
            raise ImportError(f"loading {path} needs the sentencepiece package: pip install "
                              "sentencepiece") from err
        self.path = Path(path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except Exception as err:  # sentencepiece raises OSError/RuntimeError
            raise ValueError(f"{self.path} is not a SentencePiece model ({err}): pass a .model "
                             "file written by sentencepiece's trainer") from err
        size = self._sp.get_piece_size()
        if self._sp.eos_id() < 0:
            raise ValueError(f"SentencePiece model {self.path} has no eos id: train it with "
                             "eos_id >= 0")
        pad = self._sp.pad_id()
        if pad < 0:
            pad, size = size, size + 1
        self.name = str(self.path)
        self.vocab_size, self.pad_id, self.eos_id = size, pad, self._sp.eos_id()
        self._fingerprint = _sha256_files([self.path], names=False)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        return [self._sp.decode(self._strip(ids)) for ids in batch]

    def fingerprint(self) -> str:
        return self._fingerprint


class HFDirLMTokenizer(LMTokenizer):
    """A local Hugging Face tokenizer directory, loaded with ``AutoTokenizer`` offline
    (``local_files_only=True``). pad = its pad token (else an id appended after the vocabulary),
    eos = its eos token (else its sep token)."""

    kind = "hf"
    _WEIGHTS = (".safetensors", ".bin", ".pt", ".h5", ".msgpack", ".onnx")

    def __init__(self, path: PathLike):
        from transformers import AutoTokenizer

        self.path = Path(path).expanduser().resolve()
        try:
            tok = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        except Exception as err:  # transformers raises OSError/ValueError/...
            raise ValueError(f"could not load a Hugging Face tokenizer from {self.path} ({err}): "
                             "the folder needs tokenizer.json or the tokenizer's vocabulary files "
                             "(save one with tokenizer.save_pretrained)") from err
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        if eos is None:
            raise ValueError(f"the tokenizer in {self.path} has neither an eos nor a sep token: "
                             "set eos_token in its tokenizer_config.json")
        size, pad = len(tok), tok.pad_token_id
        if pad is None or pad == eos:
            pad, size = size, size + 1
        self._tok = tok
        self.name = str(self.path)
        self.vocab_size, self.pad_id, self.eos_id = size, pad, eos
        self._fingerprint = _sha256_files(
            p for p in self.path.iterdir() if p.is_file() and not p.name.endswith(self._WEIGHTS)
            and not p.name.endswith(".meta.json"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._tok(list(texts), add_special_tokens=False, return_attention_mask=False,
                         verbose=False, split_special_tokens=True)["input_ids"]

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        return [self._tok.decode(self._strip(ids), skip_special_tokens=False,
                                 clean_up_tokenization_spaces=False) for ids in batch]

    def fingerprint(self) -> str:
        return self._fingerprint


# ----------------------------------------------------------------------------- training


def _read_texts(documents: Iterable[Union[PathLike, str]]) -> Iterable[str]:
    for doc in documents:
        if isinstance(doc, Path):
            yield doc.read_bytes().decode("utf-8", errors="replace")
        else:
            yield str(doc)


def documents_digest(documents: Sequence[Union[PathLike, str]]) -> str:
    """A digest of the training documents: each file's name, size and mtime (texts: content)."""
    h = hashlib.sha256()
    for doc in documents:
        if isinstance(doc, Path):
            st = doc.stat()
            h.update(f"{doc.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        else:
            h.update(hashlib.sha256(str(doc).encode()).digest())
    return h.hexdigest()


def train_bpe_tokenizer(documents: Sequence[Union[Path, str]], path: PathLike,
                        vocab_size: int = DEFAULT_VOCAB_SIZE, min_frequency: int = 2,
                        force: bool = False) -> TokenizersLMTokenizer:
    """Train (or reuse) a byte-level BPE on ``documents`` and save it to ``path`` (tokenizer.json).

    Args:
        documents: ``Path`` objects (files, read as UTF-8, invalid bytes replaced) or texts.
        vocab_size: the vocabulary size, including ``<pad>`` (id 0), ``<eos>`` (id 1) and the 256
            byte tokens; fewer when the corpus runs out of pairs seen ``min_frequency`` times.

    Deterministic: the same documents in the same order give the same file. Offline. The file is
    written under a temporary name and renamed; its sidecar ``<path>.meta.json`` records the
    documents' digest and the settings, and a later call with the same inputs reuses the file
    (``force`` or ``REPROCESS=1`` retrain).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from diablogpt_pytorch._io import atomic_path, is_fresh, write_meta

    if vocab_size < 258 + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE: it needs the "
                         "256 bytes, <pad> and <eos> plus merges (use at least 512)")
    documents = list(documents)
    if not documents:
        raise ValueError("train_bpe_tokenizer got no documents: pass the training files")
    import tokenizers as _t

    path = Path(path)
    meta = {"inputs": {"kind": "bpe_tokenizer", "version": TRAIN_FORMAT_VERSION,
                       "tokenizers": _t.__version__, "vocab_size": int(vocab_size),
                       "min_frequency": int(min_frequency), "num_documents": len(documents),
                       "documents": documents_digest(documents)}}
    if not force and is_fresh(path, meta):
        logger.info("reusing tokenizer %s (same documents and settings)", path)
        return TokenizersLMTokenizer(path)
    logger.info("training a byte-level BPE of %d tokens on %d documents -> %s", vocab_size,
                len(documents), path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), min_frequency=int(min_frequency),
                                  special_tokens=[PAD_TOKEN, EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_read_texts(documents), trainer=trainer, length=len(documents))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tok.save(str(tmp))
    write_meta(path, meta)
    return TokenizersLMTokenizer(path)


# ----------------------------------------------------------------------------- loading


def load_tokenizer(spec: Union[None, str, PathLike, LMTokenizer] = None, *,
                   documents: Optional[Sequence[Union[Path, str]]] = None,
                   path: Optional[PathLike] = None, vocab_size: int = DEFAULT_VOCAB_SIZE,
                   embedder: Optional[str] = None) -> LMTokenizer:
    """The LM tokenizer named by ``spec``.

    - None or ``"bert"``: the WordPiece of ``embedder`` (:class:`BertLMTokenizer`);
    - ``"train"``: a byte-level BPE of ``vocab_size`` trained on ``documents`` and saved to
      ``path`` (reused while the documents and settings are unchanged; :func:`train_bpe_tokenizer`);
    - a ``.model`` file: SentencePiece; a ``.json`` file: a ``tokenizers`` tokenizer;
    - a directory: a Hugging Face tokenizer saved there (loaded offline);
    - an :class:`LMTokenizer`: returned as is.
    """
    if isinstance(spec, LMTokenizer):
        return spec
    if spec is None or spec == "bert":
        return BertLMTokenizer(embedder)
    if spec == "train":
        if documents is None or path is None:
            raise ValueError('tokenizer="train" needs documents= (the training files) and path= '
                             "(where to store the trained tokenizer)")
        return train_bpe_tokenizer(documents, path, vocab_size)
    p = Path(spec).expanduser()
    if p.is_dir():
        return HFDirLMTokenizer(p)
    if p.is_file():
        if p.suffix == ".model":
            return SentencePieceLMTokenizer(p)
        if p.suffix == ".json":
            return TokenizersLMTokenizer(p)
        raise ValueError(f"tokenizer file {p} is neither a SentencePiece .model nor a tokenizers "
                         ".json: rename it or pass its directory")
    raise ValueError(f"tokenizer {str(spec)!r} is not 'bert', 'train', an existing .model/.json "
                     "file or a tokenizer directory: fix the path or pick one of those")
