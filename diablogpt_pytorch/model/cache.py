"""The state of incremental decoding."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor


@dataclass
class DecodeCache:
    """State of incremental decoding for a batch; created by :meth:`DIABLOGPT.init_cache`.

    Attributes:
        length: number of positions processed so far.
        self_kv: per decoder layer, (k, v) buffers (b, heads, max_seq_len, dim_head).
        cca_k, cca_v: per CCA layer, (b, chunks_done, heads, 1 + K*2C, dim_head) keys/values of the
            encoded neighbours of every completed chunk (null key/value first).
        cca_mask: (b, chunks_done, 1 + K*2C) bool, False where a neighbour token is padding.
        partial_hidden: (b, length % C, dec_dim) decoder hidden states at the first CCA layer for
            the chunk in progress (the encoder's context once it completes).
        retrieval: whether CCA runs (False decodes the same weights without retrieval).
    """

    length: int
    self_kv: list
    retrieval: bool
    cca_k: list = field(default_factory=list)
    cca_v: list = field(default_factory=list)
    cca_mask: Optional[Tensor] = None
    partial_hidden: Optional[Tensor] = None

    @property
    def chunks_done(self) -> int:
        return 0 if self.cca_mask is None else self.cca_mask.shape[1]
