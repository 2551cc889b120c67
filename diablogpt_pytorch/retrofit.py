"""RETRO-fitting: retrieval added to a pretrained causal language model (Borgeaud et al. 2022,
arXiv 2112.04426, section 4.4).

:func:`retrofit` loads a local Hugging Face causal LM (GPT-2 and Llama families; offline) and adds
the RETRO pieces of :mod:`diablogpt_pytorch.model` to it: the neighbour encoder and, after each
listed decoder block, chunked cross-attention (CCA) over the encoded neighbours. Only those are
new; the base model's own blocks, embeddings and head are used as they are (frozen by default),
so training them takes a small share of the parameters of a RETRO model trained from scratch.

The result, :class:`RetroFitted`, keeps the :class:`~diablogpt_pytorch.DIABLOGPT` contract:

- ``forward(seq, retrieved=None, return_loss=False)`` with the same layouts: token ids (b, n)
  (``(b, n+1)`` with ``return_loss``), neighbours (b, >= n // C, K, 2C) in the base model's
  token ids, logits (b, n, vocab);
- the same causality and retrieval-causality rules (the neighbours of chunk u reach positions
  ``>= (u+1)C - 1`` only), since CCA, the encoder and their chunk alignment are DIABLOGPT's own
  code (its ``_plan_call`` and ``_encode_new_chunks``, and :class:`~diablogpt_pytorch.model.ChunkedCrossAttention`);
- ``init_cache``/``decode`` for :func:`diablogpt_pytorch.generation.generate` (the base model's
  own key/value cache plus DIABLOGPT's cache of the CCA keys/values of completed chunks), whose
  logits equal the full forward's;
- ``config`` and ``state_dict`` for :mod:`diablogpt_pytorch.checkpoint`, ``pad_id``,
  ``chunk_size``, ``max_seq_len`` and ``num_tokens`` for :class:`~diablogpt_pytorch.TrainingWrapper`
  and :func:`~diablogpt_pytorch.evaluation.evaluate`.

CCA's output projection starts at zero, so at initialisation the logits equal the base model's
exactly, with or without neighbours; with ``retrieved=None`` they always do (no new code runs).

Where CCA goes: after the whole block ``L`` (1-based) listed in ``dec_cross_attn_layers``,
``x <- x + CCA(rms_norm(x))``, and the encoder runs at the first of them, its context being that
block's output for the chunk the neighbours were retrieved for (in DIABLOGPT, CCA sits between a
layer's self-attention and its feed-forward block instead).

Frozen (``freeze=True``): the base model's parameters do not require gradients and it stays in
eval mode (its dropout off) even when the retro-fitted model trains; the optimizer of
:func:`diablogpt_pytorch.optim.get_optimizer` gets only the new parameters, and
``state_dict`` (hence every checkpoint) holds only them. The base model is recorded by its path
and a SHA-256 of its weights (:func:`weights_sha256`); rebuilding from a checkpoint loads the base
from that path and refuses it if the hash differs.

Token ids are the base model's own: text goes through its Hugging Face tokenizer (in its folder).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from diablogpt_pytorch.model import DIABLOGPT, ChunkedCrossAttention, DecodeCache, Encoder, Residual, lm_head_loss

logger = logging.getLogger(__name__)

__all__ = ["RetroFitted", "RetrofitCache", "retrofit", "weights_sha256"]


def weights_sha256(module: nn.Module) -> str:
    """SHA-256 (hex) of ``module``'s state dict: every entry's name, dtype, shape and bytes, in
    sorted name order. Two modules with the same weights (in the same dtypes) hash the same."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@dataclass
class RetrofitCache(DecodeCache):
    """:class:`~diablogpt_pytorch.model.DecodeCache` of a :class:`RetroFitted` model: the base
    model's own key/value cache (``base_cache``, a transformers ``Cache``) stands in for
    ``self_kv``; the CCA fields are DIABLOGPT's."""

    base_cache: Any = None


@dataclass
class _Call:
    """What the CCA hooks need during one forward or decode call."""

    start: int
    new_chunks: int
    use_retrieval: bool
    retrieved: Optional[Tensor]
    cache: Optional[RetrofitCache]
    cca_state: Optional[tuple] = None


class _Scale(nn.Module):
    """Multiplies by a constant fixed at construction (no parameters, nothing in the state dict)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = float(scale)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}"


class RetroFitted(nn.Module):
    """A pretrained Hugging Face causal LM with RETRO's neighbour encoder and chunked
    cross-attention added after some of its blocks. Build it with :func:`retrofit`.

    Args:
        base: local folder (or name in the local Hugging Face cache) of the causal LM; loaded
            offline with ``AutoModelForCausalLM.from_pretrained(base, local_files_only=True)``.
        dec_cross_attn_layers: 1-based numbers of the base model's blocks after which CCA runs;
            the encoder runs at the first of them.
        enc_dim: neighbour encoder width (default: the base model's hidden size).
        enc_depth: encoder layers; 0 leaves only the input projection (CCA then reads the
            projected neighbour token embeddings directly).
        enc_next_token: each neighbour token's encoder input also holds the embedding of the
            token after it in the neighbour (``[e(t_j), e(t_j+1)]`` projected to ``enc_dim``;
            zeros after the last token and for padding), so that a CCA key that matches token
            ``t_j`` can carry ``t_j+1``: copying a continuation from a neighbour then takes one
            attention step instead of an encoder layer learnt for it.
        enc_cross_attn_layers: 1-based encoder layers that cross-attend to the retrieving chunk's
            hidden states (default: all).
        heads, dim_head: attention heads and width per head of the encoder and CCA.
        chunk_size: retrieval chunk length C.
        max_seq_len: longest sequence (default: the base model's ``max_position_embeddings``).
        pad_id: padding id, ignored by the loss and masked in neighbours (default: the base
            config's ``pad_token_id``; required when that is unset).
        freeze: train only the new parameters (see the module docstring).
        cca_dropout, enc_attn_dropout, enc_ff_dropout: dropout of the new parts.
        dtype: dtype the base model is loaded in and the new parameters are made in
            (``"float32"``, ``"bfloat16"``, ...).
        base_sha256: expected :func:`weights_sha256` of the base model; a different base is
            refused (checkpoints pass it).
    """

    def __init__(
        self,
        base: Union[str, os.PathLike],
        *,
        dec_cross_attn_layers: Sequence[int],
        enc_dim: Optional[int] = None,
        enc_depth: int = 2,
        enc_next_token: bool = False,
        enc_cross_attn_layers: Optional[Sequence[int]] = None,
        heads: int = 8,
        dim_head: int = 64,
        chunk_size: int = 64,
        max_seq_len: Optional[int] = None,
        pad_id: Optional[int] = None,
        freeze: bool = True,
        cca_dropout: float = 0.0,
        enc_attn_dropout: float = 0.0,
        enc_ff_dropout: float = 0.0,
        dtype: str = "float32",
        base_sha256: Optional[str] = None,
    ):
        super().__init__()
        torch_dtype = getattr(torch, str(dtype), None)
        if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
            raise ValueError(f"dtype must name a torch floating-point dtype such as 'float32'; got {dtype!r}")
        self.base = _load_base(base, torch_dtype)
        config = self.base.config
        backbone = self.base.base_model
        blocks = getattr(backbone, "h", None)
        if not isinstance(blocks, nn.ModuleList):
            blocks = getattr(backbone, "layers", None)
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError(
                f"cannot find the decoder blocks of {type(self.base).__name__} from {str(base)!r}: "
                "retrofit supports causal LMs whose backbone keeps them in `.h` (GPT-2) or "
                "`.layers` (Llama, Mistral, Qwen2)")
        lm_head = self.base.get_output_embeddings()
        if not isinstance(lm_head, nn.Linear) or lm_head.bias is not None:
            raise ValueError(
                f"{type(self.base).__name__} from {str(base)!r} has no bias-free linear output "
                "head (get_output_embeddings()): retrofit supports GPT-2 and Llama-style heads")
        depth = len(blocks)
        layers = sorted({int(i) for i in dec_cross_attn_layers})
        if not layers:
            raise ValueError("dec_cross_attn_layers is empty: name at least one block to add CCA after")
        bad = [i for i in layers if not 1 <= i <= depth]
        if bad:
            raise ValueError(
                f"dec_cross_attn_layers are 1-based block numbers in [1, {depth}] (the base model "
                f"{str(base)!r} has {depth} blocks); got {bad}")
        if int(enc_depth) < 0:
            raise ValueError(f"enc_depth must be >= 0; got {enc_depth}")
        if dim_head % 2:
            raise ValueError(f"dim_head must be even for rotary embeddings; got {dim_head}")
        if pad_id is None:
            pad_id = getattr(config, "pad_token_id", None)
            if pad_id is None:
                raise ValueError(
                    f"the base model config in {str(base)!r} sets no pad_token_id: pass pad_id= "
                    "(a token id the text never uses; it is ignored by the loss and masked in "
                    "neighbours)")
        dim = int(config.hidden_size)
        enc_dim = dim if enc_dim is None else int(enc_dim)
        enc_cross_attn_layers = (list(range(1, enc_depth + 1)) if enc_cross_attn_layers is None
                                 else [int(i) for i in enc_cross_attn_layers])
        base_max = getattr(config, "max_position_embeddings", None)
        max_seq_len = int(base_max) if max_seq_len is None else int(max_seq_len)
        if base_max is not None and max_seq_len > base_max:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the base model's "
                             f"max_position_embeddings={base_max}")
        if max_seq_len < chunk_size:
            raise ValueError(f"max_seq_len ({max_seq_len}) must be at least chunk_size ({chunk_size})")

        actual_sha = weights_sha256(self.base)
        if base_sha256 is not None and base_sha256 != actual_sha:
            raise ValueError(
                f"the base model at {str(base)!r} has weights sha256 {actual_sha}, but this "
                f"retro-fitted model was made from a base with sha256 {base_sha256}: point `base` "
                "at the model it was retro-fitted onto")

        self.config = dict(
            base=str(base), base_sha256=actual_sha, dec_cross_attn_layers=layers, enc_dim=enc_dim,
            enc_depth=int(enc_depth), enc_next_token=bool(enc_next_token),
            enc_cross_attn_layers=enc_cross_attn_layers, heads=int(heads),
            dim_head=int(dim_head), chunk_size=int(chunk_size), max_seq_len=max_seq_len,
            pad_id=int(pad_id), freeze=bool(freeze), cca_dropout=float(cca_dropout),
            enc_attn_dropout=float(enc_attn_dropout), enc_ff_dropout=float(enc_ff_dropout),
            dtype=str(dtype),
        )
        self.num_tokens = int(lm_head.out_features)
        self.max_seq_len, self.chunk_size, self.pad_id = max_seq_len, int(chunk_size), int(pad_id)
        self.heads, self.dim_head = int(heads), int(dim_head)
        self.frozen = bool(freeze)
        self.cca_layer_ids = [i - 1 for i in layers]  # 0-based block indices
        self.loss_chunk = 512  # rows of logits made at a time by the loss (see lm_head_loss)

        # the new parts: DIABLOGPT's modules, at the base model's width
        # Neighbour tokens enter the encoder through the base's input embedding, whose scale is the
        # base's choice (GPT-2-style 0.02-std init: RMS ~0.04), next to which every encoder branch
        # output (RMS ~0.3) drowns the tokens. ``to_enc`` brings them to unit RMS (a Linear whose
        # initial weight is divided by that RMS, or a fixed scale when the widths match and there
        # is no next-token input); the CCA output stays zero, so the logits still equal the base's
        # at initialisation.
        emb_rms = float(self.base.get_input_embeddings().weight.detach().float().pow(2).mean().sqrt())
        emb_scale = 1.0 / emb_rms if emb_rms > 0 else 1.0
        self.enc_next_token = bool(enc_next_token)
        if enc_dim != dim or self.enc_next_token:
            self.to_enc = nn.Linear(dim * (2 if self.enc_next_token else 1), enc_dim, bias=False)
            with torch.no_grad():
                self.to_enc.weight.mul_(emb_scale)
        else:
            self.to_enc = _Scale(emb_scale)
        self.encoder = Encoder(enc_dim, enc_depth, dim, heads, dim_head, enc_attn_dropout,
                               enc_ff_dropout, enc_cross_attn_layers, False, None)
        self.cca = nn.ModuleDict({
            str(layer_id): Residual(dim, ChunkedCrossAttention(dim, enc_dim, heads, dim_head, cca_dropout,
                                                               int(chunk_size)), False, None)
            for layer_id in self.cca_layer_ids
        })
        for block in self.cca.values():  # zero output: the base model's logits at initialisation
            nn.init.zeros_(block.fn.to_out.weight)
        for param in self.new_parameters():  # parameters only: rotary frequencies stay float32
            param.data = param.data.to(torch_dtype)
        if self.frozen:
            self.base.requires_grad_(False)

        parameters = inspect.signature(backbone.forward).parameters
        self._cache_kwarg = "cache" if "cache" in parameters else "past_key_values"
        self._call: Optional[_Call] = None
        self._hooks = [blocks[i].register_forward_hook(self._make_hook(i)) for i in self.cca_layer_ids]
        self._check_logits_path(base)
        self.train()
        logger.info("retro-fitted %s (%s blocks, CCA after %s): %d new parameters, %d in the base "
                    "(%s)", base, depth, layers, sum(p.numel() for p in self.new_parameters()),
                    sum(p.numel() for p in self.base.parameters()), "frozen" if self.frozen else "trained")

    # DIABLOGPT's call planning and encoder call, used as they are (see the module doc)
    _plan_call = DIABLOGPT._plan_call
    _check_retrieved = DIABLOGPT._check_retrieved
    _encode_new_chunks = DIABLOGPT._encode_new_chunks

    def _cca(self, layer_id: int) -> Residual:
        """The CCA sub-layer after block ``layer_id`` (0-based)."""
        return self.cca[str(layer_id)]

    @property
    def token_emb(self) -> nn.Embedding:
        """The base model's input embedding (also embeds the neighbours for the encoder)."""
        return self.base.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Linear:
        return self.base.get_output_embeddings()

    # -- parameters and modes ----------------------------------------------------------------

    def new_parameters(self):
        """The parameters retro-fitting adds (encoder, ``to_enc`` and CCA), in order."""
        return (p for name, p in self.named_parameters() if not name.startswith("base."))

    def no_weight_decay_parameter_names(self) -> set[str]:
        """Names of parameters that take no weight decay: norm gains, biases, null key/values."""
        return {name for name, p in self.named_parameters() if p.ndim < 2 or "null_" in name}

    def train(self, mode: bool = True) -> "RetroFitted":
        """Set train/eval mode; a frozen base model always stays in eval mode (dropout off)."""
        super().train(mode)
        if self.frozen:
            self.base.eval()
        return self

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """As ``nn.Module.state_dict``, without the base model's entries when it is frozen (they
        are in its own folder, pinned by ``config['base_sha256']``)."""
        out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if self.frozen:
            for key in [k for k in out if k.startswith(prefix + "base.")]:
                del out[key]
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As ``nn.Module.load_state_dict``; when the base model is frozen, its entries may be
        missing (the base keeps its own weights)."""
        if self.frozen:
            state_dict = dict(state_dict)
            for key, value in self.base.state_dict(prefix="base.").items():
                state_dict.setdefault(key, value)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def save_pretrained(self, path: Union[str, os.PathLike]) -> Path:
        """Write the model to one checkpoint file (atomically): its config, which names the base
        model's folder and weights hash, and the new weights (the base's too when not frozen).
        ``diablogpt_pytorch.checkpoint.load_model(path)`` rebuilds it."""
        from diablogpt_pytorch.checkpoint import save_checkpoint

        return save_checkpoint(path, self)

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, seq: Tensor, retrieved: Optional[Tensor] = None, return_loss: bool = False) -> Tensor:
        """Logits (b, n, num_tokens) for ``seq`` (b, n), or with ``return_loss`` the mean
        cross-entropy of ``seq[:, 1:]`` given ``seq[:, :-1]`` over labels that are not ``pad_id``.

        ``retrieved`` (b, >= n // C, K, 2C) enables chunked cross-attention; None runs the base
        model alone (its logits exactly).
        """
        if not return_loss:
            return self.lm_head(self._run(seq, retrieved, cache=None))
        seq, labels = seq[:, :-1], seq[:, 1:]
        hidden = self._run(seq, retrieved, cache=None)
        return lm_head_loss(hidden, self.lm_head.weight, labels, self.pad_id, self.loss_chunk)

    @torch.no_grad()
    def init_cache(self, batch_size: int, retrieval: bool = True, device=None,
                   dtype: Optional[torch.dtype] = None) -> RetrofitCache:
        """An empty :class:`RetrofitCache` (``batch_size``, ``device`` and ``dtype`` are taken
        from the tokens and the computation: the base model's cache grows as it decodes)."""
        from transformers import DynamicCache

        try:
            base_cache = DynamicCache(config=self.base.config)
        except TypeError:  # transformers versions whose DynamicCache takes no config
            base_cache = DynamicCache()
        return RetrofitCache(length=0, self_kv=[], retrieval=retrieval, base_cache=base_cache)

    def decode(self, tokens: Tensor, cache: RetrofitCache, retrieved: Optional[Tensor] = None) -> Tensor:
        """Incremental forward, as :meth:`DIABLOGPT.decode`: logits (b, t, num_tokens) for
        ``tokens`` (b, t) at positions cache.length .. cache.length + t - 1; ``retrieved`` holds
        the neighbours (b, c, K, 2C) of exactly the c chunks that complete in this call."""
        if not isinstance(cache, RetrofitCache):
            raise TypeError("decode needs the cache made by this model's init_cache")
        with torch.no_grad():
            return self.lm_head(self._run(tokens, retrieved, cache))

    def _run(self, tokens: Tensor, retrieved: Optional[Tensor], cache: Optional[RetrofitCache]) -> Tensor:
        """Final hidden states (b, n, hidden) of ``tokens`` (b, n): the base model's backbone,
        with CCA added by the block hooks while this call runs."""
        start, end, new_chunks, use_retrieval, retrieved = self._plan_call(tokens, retrieved, cache)
        if self._call is not None:
            raise RuntimeError("RetroFitted calls cannot be nested")
        self._call = _Call(start, new_chunks, use_retrieval, retrieved, cache)
        kwargs = {self._cache_kwarg: cache.base_cache} if cache is not None else {}
        try:
            out = self.base.base_model(input_ids=tokens, use_cache=cache is not None, **kwargs)
        finally:
            self._call = None
        if cache is not None:
            cache.length = end
        return out.last_hidden_state

    def _next_token_input(self, retrieved: Tensor) -> Tensor:
        """``[e(t_j), e(t_j+1)]`` (..., 2C, 2 * hidden) for neighbour tokens ``retrieved``
        (..., 2C): each token's embedding beside the next one's, padding and the slot after the
        last token at zero."""
        emb = self.token_emb(retrieved) * (retrieved != self.pad_id).unsqueeze(-1).to(self.token_emb.weight.dtype)
        following = torch.cat([emb[..., 1:, :], torch.zeros_like(emb[..., :1, :])], dim=-2)
        return torch.cat([emb, following], dim=-1)

    def _make_hook(self, layer_id: int):
        cca_index = self.cca_layer_ids.index(layer_id)

        def after_block(module: nn.Module, args, output):
            call = self._call
            if call is None or not call.use_retrieval:
                return None  # the base model's own output
            x = output[0] if isinstance(output, tuple) else output
            if layer_id == self.cca_layer_ids[0]:
                emb = (self._next_token_input(call.retrieved)
                       if self.enc_next_token and call.retrieved is not None else None)
                call.cca_state = self._encode_new_chunks(x, call.retrieved, call.new_chunks, call.cache,
                                                         neighbour_emb=emb)
            x = self._cca(layer_id)(x, call.start, call.cca_state, cca_index)
            return (x, *output[1:]) if isinstance(output, tuple) else x

        return after_block

    @torch.no_grad()
    def _check_logits_path(self, base) -> None:
        """The logits this module makes (the backbone's last hidden state through the output
        head, which lets the loss skip the full logits) must be the base model's own."""
        was_training = self.base.training
        self.base.eval()
        try:
            probe = (torch.arange(1, 9, device=self.lm_head.weight.device) % self.num_tokens)[None]
            full = self.base(input_ids=probe, use_cache=False).logits
            ours = self.lm_head(self.base.base_model(input_ids=probe, use_cache=False).last_hidden_state)
        finally:
            self.base.train(was_training)
        if not torch.equal(full, ours):
            raise ValueError(
                f"{type(self.base).__name__} from {str(base)!r} does not make its logits as "
                "lm_head(backbone(ids).last_hidden_state) (a logit scale or soft-cap?): retrofit "
                "supports GPT-2 and Llama-style models")


def _load_base(base: Union[str, os.PathLike], dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as err:
        where = "folder" if Path(base).exists() else "name (not a local folder)"
        raise ValueError(
            f"cannot load a causal LM from {str(base)!r} ({where}) offline: {err}. Point `base` "
            "at a folder holding a Hugging Face causal LM (config.json and weights), e.g. one "
            "written by model.save_pretrained(folder)") from err


def retrofit(model_name_or_path: Union[str, os.PathLike], *, dec_cross_attn_layers: Sequence[int],
             **kwargs) -> RetroFitted:
    """Load the causal LM at ``model_name_or_path`` (offline) and add RETRO's neighbour encoder
    and chunked cross-attention after the 1-based blocks ``dec_cross_attn_layers``.

    Keyword arguments are :class:`RetroFitted`'s (``enc_dim``, ``enc_depth``,
    ``enc_next_token``, ``heads``, ``dim_head``, ``chunk_size=64``, ``max_seq_len``, ``pad_id``,
    ``freeze=True``, dropouts, ``dtype``). Returns the model in train mode; with retrieval off,
    and at initialisation, its logits are the base model's.
    """
    return RetroFitted(model_name_or_path, dec_cross_attn_layers=dec_cross_attn_layers, **kwargs)
