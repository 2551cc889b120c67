"""DIABLOGPT: the RETRO decoder with chunked cross-attention (Borgeaud et al. 2022, arXiv 2112.04426).

Shapes (C = chunk_size, K = neighbours per chunk, m = number of chunks):

- tokens ``seq``: int64 (b, n); with ``return_loss`` (b, n+1), split into input [:, :-1] and
  labels [:, 1:].
- ``retrieved``: int64 (b, m, K, 2C): for each chunk u of the input, K neighbours, each a chunk
  plus its continuation; ``pad_id`` marks padding. Only the first n // C chunks matter: the
  neighbours of chunk u influence positions >= (u+1)C - 1 only.

The forward pass is the paper's Algorithm 1: token embedding; then per decoder :class:`Block`
causal self-attention with rotary positions, at the first CCA layer the neighbour encoder
(:class:`~diablogpt_pytorch.model.encoder.Encoder`: each neighbour gets bidirectional
self-attention and cross-attends to the decoder hidden states of the chunk it was retrieved for),
chunked cross-attention at ``dec_cross_attn_layers`` (1-based;
:class:`~diablogpt_pytorch.model.cca.ChunkedCrossAttention`), and a feed-forward block; then the
final norm and the output head (or the loss, :func:`diablogpt_pytorch.kernels.lm_head_loss`,
without the full logits). Layers are pre-norm, or DeepNet post-norm.

The same code path serves training (no cache) and incremental decoding (:class:`DecodeCache`):
self-attention keys/values are cached per layer, and the CCA keys/values of each completed chunk's
encoded neighbours are computed once and cached (see :meth:`DIABLOGPT.decode`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from diablogpt_pytorch.hub import PretrainedMixin
from diablogpt_pytorch.kernels import lm_head_loss
from diablogpt_pytorch.model.attention import CrossAttention, SelfAttention
from diablogpt_pytorch.model.block import Block, Residual, deepnet_constants
from diablogpt_pytorch.model.cache import DecodeCache
from diablogpt_pytorch.model.cca import (CCAMemory, ChunkedCrossAttention, completed_chunks, neighbour_mask, recall,
                                         remember)
from diablogpt_pytorch.model.encoder import Encoder
from diablogpt_pytorch.model.feed_forward import FeedForward
from diablogpt_pytorch.model.norm import RMSNorm
from diablogpt_pytorch.model.rotary import Rotary


class DIABLOGPT(PretrainedMixin, nn.Module):
    """RETRO: a decoder-only language model with chunked cross-attention to retrieved neighbours.

    Args:
        num_tokens: vocabulary size (default 30522, the default tokenizer's: uncased BERT vocab).
        max_seq_len: longest input sequence (positions are rotary; this bounds caches and checks).
        enc_dim, enc_depth: neighbour encoder width and number of layers.
        dec_dim, dec_depth: decoder width and number of layers.
        dec_cross_attn_layers: 1-based decoder layers with chunked cross-attention.
        heads, dim_head: attention heads and width per head (decoder and encoder).
        chunk_size: retrieval chunk length C (64 in the paper).
        pad_id: padding token id (ignored in the loss; masked in neighbours).
        dec_attn_dropout, dec_ff_dropout, enc_attn_dropout, enc_ff_dropout: dropout rates.
        enc_cross_attn_layers: 1-based encoder layers that cross-attend to the decoder chunk
            (default: all).
        use_deepnet: DeepNet post-norm residuals with alpha scaling and beta-scaled init.
        gated_rmsnorm: gated RMSNorm everywhere.
        zero_init_residual: start the decoder's self-attention and feed-forward output
            projections at zero, so that every decoder block begins as the identity plus its
            chunked cross-attention (the zero-initialised residual branches of Fixup, Zhang et al.
            2019, and ReZero, Bachlechner et al. 2020). The cross-attention output keeps its
            random initialisation, so retrieval receives gradients from the first step. Measured
            by ``benchmarks/end_to_end/retrieval_gain.py``: the language model and its use of neighbours both
            learn faster. Ignored with ``use_deepnet`` (DeepNet has its own initialisation).
        token_emb_init_std: standard deviation of the token embedding at initialisation (1.0:
            unit scale, as in T5, Raffel et al. 2020). With the residual branches at zero, the
            embedding is all the decoder's stream holds at the start besides the chunked
            cross-attention's output (root-mean-square about 0.3 at random init); at GPT-2's 0.02
            that output drowns the tokens fifteen-fold. Measured by
            ``benchmarks/end_to_end/retrieval_ablation.py`` (same init seed and data order, 400 steps): 0.02
            / 0.3 / 1.0 gave held-out loss with retrieval on the natural corpus 0.5% worse / 0.7%
            worse / 0.5% better than the same model trained without retrieval, and on the
            near-duplicate corpus 39.7% / 44.5% / 44.6% below the same weights without retrieval.

    ``save_pretrained(dir)`` writes ``config.json`` + ``model.safetensors``;
    ``DIABLOGPT.from_pretrained(dir_or_repo_id)`` loads them (see :mod:`diablogpt_pytorch.hub`).
    """

    def __init__(
        self,
        *,
        num_tokens: int = 30522,
        max_seq_len: int = 2048,
        enc_dim: int = 896,
        enc_depth: int = 2,
        dec_dim: int = 768,
        dec_depth: int = 12,
        dec_cross_attn_layers: Sequence[int] = (1, 3, 6, 9),
        heads: int = 8,
        dim_head: int = 64,
        chunk_size: int = 64,
        pad_id: int = 0,
        dec_attn_dropout: float = 0.0,
        dec_ff_dropout: float = 0.0,
        enc_attn_dropout: float = 0.0,
        enc_ff_dropout: float = 0.0,
        enc_cross_attn_layers: Optional[Sequence[int]] = None,
        use_deepnet: bool = False,
        gated_rmsnorm: bool = False,
        zero_init_residual: bool = True,
        token_emb_init_std: float = 1.0,
    ):
        super().__init__()
        dec_cross_attn_layers = tuple(int(i) for i in dec_cross_attn_layers)
        enc_cross_attn_layers = (tuple(range(1, enc_depth + 1)) if enc_cross_attn_layers is None
                                 else tuple(int(i) for i in enc_cross_attn_layers))
        for name, layers, depth in (("dec_cross_attn_layers", dec_cross_attn_layers, dec_depth),
                                    ("enc_cross_attn_layers", enc_cross_attn_layers, enc_depth)):
            bad = [i for i in layers if not 1 <= i <= depth]
            if bad:
                raise ValueError(f"{name} are 1-based layer numbers in [1, {depth}]; got {bad}")
        if not dec_cross_attn_layers:
            raise ValueError("dec_cross_attn_layers is empty: RETRO needs at least one CCA layer")
        if dim_head % 2:
            raise ValueError(f"dim_head must be even for rotary embeddings; got {dim_head}")
        if max_seq_len < chunk_size:
            raise ValueError(f"max_seq_len ({max_seq_len}) must be at least chunk_size ({chunk_size})")

        self.config = dict(
            num_tokens=num_tokens, max_seq_len=max_seq_len, enc_dim=enc_dim, enc_depth=enc_depth,
            dec_dim=dec_dim, dec_depth=dec_depth, dec_cross_attn_layers=list(dec_cross_attn_layers),
            heads=heads, dim_head=dim_head, chunk_size=chunk_size, pad_id=pad_id,
            dec_attn_dropout=dec_attn_dropout, dec_ff_dropout=dec_ff_dropout,
            enc_attn_dropout=enc_attn_dropout, enc_ff_dropout=enc_ff_dropout,
            enc_cross_attn_layers=list(enc_cross_attn_layers), use_deepnet=use_deepnet,
            gated_rmsnorm=gated_rmsnorm, zero_init_residual=zero_init_residual,
            token_emb_init_std=token_emb_init_std,
        )
        self.num_tokens, self.max_seq_len, self.chunk_size, self.pad_id = num_tokens, max_seq_len, chunk_size, pad_id
        self.heads, self.dim_head = heads, dim_head
        self.deepnet = deepnet_constants(enc_depth, dec_depth) if use_deepnet else None
        dec_alpha = self.deepnet["dec_alpha"] if self.deepnet else None

        self.token_emb = nn.Embedding(num_tokens, dec_dim)
        self.to_enc = nn.Linear(dec_dim, enc_dim, bias=False) if enc_dim != dec_dim else nn.Identity()
        self.encoder = Encoder(enc_dim, enc_depth, dec_dim, heads, dim_head, enc_attn_dropout,
                               enc_ff_dropout, enc_cross_attn_layers, gated_rmsnorm, self.deepnet)
        self.rotary = Rotary(dim_head)
        self.layers = nn.ModuleList()
        self.cca_layer_ids: list[int] = []
        for layer_num in range(1, dec_depth + 1):
            attn = Residual(dec_dim, SelfAttention(dec_dim, heads, dim_head, dec_attn_dropout, causal=True),
                            gated_rmsnorm, dec_alpha)
            cca = None
            if layer_num in dec_cross_attn_layers:
                cca = Residual(dec_dim, ChunkedCrossAttention(dec_dim, enc_dim, heads, dim_head, dec_attn_dropout,
                                                              chunk_size), gated_rmsnorm, dec_alpha)
                self.cca_layer_ids.append(layer_num - 1)
            ff = Residual(dec_dim, FeedForward(dec_dim, dropout=dec_ff_dropout), gated_rmsnorm, dec_alpha)
            self.layers.append(Block(attn, cca, ff))
        self.final_norm = nn.Identity() if use_deepnet else RMSNorm(dec_dim, gated=gated_rmsnorm)
        self.to_logits = nn.Linear(dec_dim, num_tokens, bias=False)
        self.loss_chunk = 512  # rows of logits made at a time by the loss (see forward)
        self.zero_init_residual = zero_init_residual
        if not token_emb_init_std > 0:
            raise ValueError(f"token_emb_init_std must be positive; got {token_emb_init_std}")
        self.token_emb_init_std = float(token_emb_init_std)
        self._init_weights()

    # -- init ----------------------------------------------------------------------------------

    def _init_weights(self) -> None:
        nn.init.normal_(self.token_emb.weight, std=self.token_emb_init_std)
        nn.init.normal_(self.to_logits.weight, std=self.to_logits.in_features ** -0.5)
        if self.deepnet is None:
            if self.zero_init_residual:
                for block in self.layers:
                    nn.init.zeros_(block.attn.fn.to_out.weight)
                    nn.init.zeros_(block.ff.fn.proj_out.weight)
                    nn.init.zeros_(block.ff.fn.proj_out.bias)
            return
        # DeepNet init: xavier-normal with gain beta on feed-forward, value and output projections
        # (keys/queries gain 1), separately for encoder (enc_beta) and decoder (dec_beta)
        for part, beta in ((self.encoder, self.deepnet["enc_beta"]), (self.layers, self.deepnet["dec_beta"])):
            for module in part.modules():
                if isinstance(module, FeedForward):
                    for lin in (module.proj_in, module.proj_out):
                        nn.init.xavier_normal_(lin.weight, gain=beta)
                elif isinstance(module, SelfAttention):
                    inner = module.heads * module.dim_head
                    q, k, v = module.to_qkv.weight.data.split(inner, dim=0)
                    for w, gain in ((q, 1.0), (k, 1.0), (v, beta)):
                        nn.init.xavier_normal_(w, gain=gain)
                    nn.init.xavier_normal_(module.to_out.weight, gain=beta)
                elif isinstance(module, CrossAttention):
                    inner = module.heads * module.dim_head
                    nn.init.xavier_normal_(module.to_q.weight, gain=1.0)
                    k, v = module.to_kv.weight.data.split(inner, dim=0)
                    nn.init.xavier_normal_(k, gain=1.0)
                    nn.init.xavier_normal_(v, gain=beta)
                    nn.init.xavier_normal_(module.to_out.weight, gain=beta)

    def no_weight_decay_parameter_names(self) -> set[str]:
        """Names of parameters that take no weight decay: norm gains/gates, biases, null key/values."""
        return {name for name, p in self.named_parameters() if p.ndim < 2 or "null_" in name}

    # -- public forward ------------------------------------------------------------------------

    def forward(self, seq: Tensor, retrieved: Optional[Tensor] = None, return_loss: bool = False) -> Tensor:
        """Logits (b, n, num_tokens) for ``seq`` (b, n), or with ``return_loss`` the mean
        cross-entropy of ``seq[:, 1:]`` given ``seq[:, :-1]`` over labels that are not ``pad_id``.

        ``retrieved`` (b, >= n // C, K, 2C) enables chunked cross-attention; None runs the same
        weights without retrieval (CCA layers are skipped).
        """
        if not return_loss:
            return self.to_logits(self._run(seq, retrieved, cache=None))
        seq, labels = seq[:, :-1], seq[:, 1:]
        hidden = self._run(seq, retrieved, cache=None)
        return lm_head_loss(hidden, self.to_logits.weight, labels, self.pad_id, self.loss_chunk)

    @torch.no_grad()
    def init_cache(self, batch_size: int, retrieval: bool = True, device=None,
                   dtype: Optional[torch.dtype] = None) -> DecodeCache:
        """An empty :class:`DecodeCache` for ``batch_size`` rows (buffers of max_seq_len positions)."""
        param = next(self.parameters())
        device = device if device is not None else param.device
        dtype = dtype if dtype is not None else param.dtype
        shape = (batch_size, self.heads, self.max_seq_len, self.dim_head)
        self_kv = [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
                   for _ in self.layers]
        return DecodeCache(length=0, self_kv=self_kv, retrieval=retrieval)

    def decode(self, tokens: Tensor, cache: DecodeCache, retrieved: Optional[Tensor] = None) -> Tensor:
        """Incremental forward: logits (b, t, num_tokens) for ``tokens`` (b, t) at positions
        cache.length .. cache.length + t - 1; the cache advances by t.

        With ``cache.retrieval``, ``retrieved`` must hold (b, c, K, 2C) neighbours for exactly the
        c chunks that complete inside this call (chunk u completes at position (u+1)C - 1), in
        order; their encodings and CCA keys/values are computed once and cached. The logits equal
        those of a full forward over the whole prefix with the same neighbours.
        """
        with torch.no_grad():
            return self.to_logits(self._run(tokens, retrieved, cache))

    # -- the shared path -----------------------------------------------------------------------

    def _run(self, tokens: Tensor, retrieved: Optional[Tensor], cache: Optional[DecodeCache]) -> Tensor:
        """Final hidden states (b, n, dec_dim) of ``tokens`` (b, n), with or without a cache: the
        paper's Algorithm 1, one layer at a time (self-attention; at the first CCA layer, the
        neighbour encoder; CCA; feed-forward)."""
        start, end, new_chunks, use_retrieval, retrieved = self._plan_call(tokens, retrieved, cache)
        encode = use_retrieval and new_chunks > 0
        x, neighbour_emb = self._embed(tokens, retrieved if encode else None)
        rot = self.rotary(torch.arange(start, end, device=tokens.device))
        memory = None  # the CCA keys/values of all chunks so far (set at the first CCA layer)
        for layer_id, block in enumerate(self.layers):
            x = block.attn(x, rot, kv_cache=cache.self_kv[layer_id] if cache is not None else None, start=start)
            if block.cca is not None and not use_retrieval:
                x = block.cca.skip(x)  # retrieval off: CCA contributes nothing
            elif block.cca is not None:
                if layer_id == self.cca_layer_ids[0]:
                    memory = self._encode_new_chunks(x, retrieved, new_chunks, cache, neighbour_emb)
                x = block.cca(x, start, memory, self.cca_layer_ids.index(layer_id))
            x = block.ff(x)
        if cache is not None:
            cache.length = end
        return self.final_norm(x)

    def _embed(self, tokens: Tensor, retrieved: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """Token embeddings (b, n, dec_dim) and, when training the embedding with neighbours to
        encode, the neighbours' (b, m, K, 2C, dec_dim) from the same lookup (one embedding
        gradient, a vocabulary-sized buffer, in backward instead of two and their sum)."""
        if retrieved is not None and torch.is_grad_enabled() and self.token_emb.weight.requires_grad:
            b, n = tokens.shape
            both = self.token_emb(torch.cat((tokens.reshape(-1), retrieved.reshape(-1))))
            x, neighbour_emb = both[: tokens.numel()].view(b, n, -1), both[tokens.numel():]
            return x, neighbour_emb.view(*retrieved.shape, -1)
        return self.token_emb(tokens), None

    def _plan_call(self, tokens: Tensor, retrieved: Optional[Tensor], cache: Optional[DecodeCache]) -> tuple:
        """(start, end, new_chunks, use_retrieval, retrieved) of a call over ``tokens`` (b, n): the
        positions [start, end) it covers, how many chunks complete inside it, whether CCA runs,
        and the neighbours of exactly those chunks (checked against the cache and the shapes)."""
        b, n = tokens.shape
        C = self.chunk_size
        start = cache.length if cache is not None else 0
        end = start + n
        if end > self.max_seq_len:
            raise ValueError(f"sequence of {end} tokens exceeds max_seq_len={self.max_seq_len}")
        new_chunks = end // C - start // C
        use_retrieval = cache.retrieval if cache is not None else retrieved is not None
        if use_retrieval and new_chunks > 0:
            retrieved = self._check_retrieved(retrieved, b, new_chunks, exact=cache is not None)
        elif cache is not None and retrieved is not None and retrieved.shape[1] != 0:
            raise ValueError(
                f"retrieved was given for {retrieved.shape[1]} chunk(s) but "
                + ("this cache decodes without retrieval" if not cache.retrieval
                   else f"no chunk completes in positions [{start}, {end})")
            )
        return start, end, new_chunks, use_retrieval, retrieved

    def _cca(self, layer_id: int) -> Residual:
        """The chunked cross-attention sub-layer of decoder layer ``layer_id`` (0-based)."""
        return self.layers[layer_id].cca

    def _check_retrieved(self, retrieved: Optional[Tensor], b: int, chunks: int, exact: bool) -> Tensor:
        C = self.chunk_size
        if retrieved is None:
            raise ValueError(f"retrieved neighbours are needed for {chunks} completed chunk(s) of this call")
        if retrieved.ndim != 4 or retrieved.shape[0] != b or retrieved.shape[-1] != 2 * C:
            raise ValueError(
                f"retrieved must be (batch={b}, chunks, K, 2*chunk_size={2 * C}); got {tuple(retrieved.shape)}"
            )
        if (exact and retrieved.shape[1] != chunks) or retrieved.shape[1] < chunks:
            raise ValueError(
                f"retrieved covers {retrieved.shape[1]} chunk(s); this call needs "
                f"{'exactly ' if exact else 'at least '}{chunks} (one per completed chunk of {C} tokens)"
            )
        return retrieved[:, :chunks]

    def _encode_new_chunks(self, h: Tensor, retrieved: Optional[Tensor], new_chunks: int,
                           cache: Optional[DecodeCache], neighbour_emb: Optional[Tensor] = None) -> CCAMemory:
        """Encode the neighbours of the chunks completing in this call (context: the decoder hidden
        states ``h`` at the first CCA layer) and compute every CCA layer's keys/values.

        Returns the :class:`~diablogpt_pytorch.model.cca.CCAMemory` of all chunks so far; with a
        cache, the new chunks are appended to it."""
        context = completed_chunks(h, new_chunks, self.chunk_size, cache)
        if context is None:
            return recall(cache)
        pad_mask = retrieved == self.pad_id
        if neighbour_emb is None:
            neighbour_emb = self.token_emb(retrieved)
        encoded = self.encoder(self.to_enc(neighbour_emb), pad_mask, context)  # (b, m, K*2C, enc_dim)
        keys, values = [], []
        for layer_id in self.cca_layer_ids:
            k, v = self._cca(layer_id).fn.neighbour_keys_values(encoded, retrieved.shape[-1])
            keys.append(k)
            values.append(v)
        return remember(cache, keys, values, neighbour_mask(pad_mask))
