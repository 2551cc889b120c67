"""Model configurations: one dataclass whose fields are DIABLOGPT's constructor arguments, and the
presets the examples, benchmarks and tests share.

    from diablogpt_pytorch import DIABLOGPT
    from diablogpt_pytorch.config import CPU, SEED

    model = DIABLOGPT(**CPU.model_kwargs())                 # trains in minutes on 2 CPU cores
    model = DIABLOGPT(**SEED.replace(num_tokens=32000).model_kwargs())
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class DIABLOGPTConfig:
    """DIABLOGPT's constructor arguments (see :class:`diablogpt_pytorch.DIABLOGPT` for each)."""

    num_tokens: int = 30522
    max_seq_len: int = 2048
    enc_dim: int = 896
    enc_depth: int = 2
    dec_dim: int = 768
    dec_depth: int = 12
    dec_cross_attn_layers: tuple[int, ...] = (1, 3, 6, 9)
    heads: int = 8
    dim_head: int = 64
    chunk_size: int = 64
    pad_id: int = 0
    dec_attn_dropout: float = 0.0
    dec_ff_dropout: float = 0.0
    enc_attn_dropout: float = 0.0
    enc_ff_dropout: float = 0.0
    enc_cross_attn_layers: Optional[tuple[int, ...]] = None
    use_deepnet: bool = False
    gated_rmsnorm: bool = False
    zero_init_residual: bool = True
    token_emb_init_std: float = 1.0

    def model_kwargs(self) -> dict[str, Any]:
        """The keyword arguments for ``DIABLOGPT(**kwargs)``."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "DIABLOGPTConfig":
        """A copy with ``changes`` applied (unknown names raise TypeError)."""
        return dataclasses.replace(self, **changes)


#: The seed README's model: 768-wide 12-layer decoder, CCA at layers 1, 3, 6, 9, a 3-layer
#: 896-wide encoder, 2048-token sequences, dropout 0.25 (the main job's configuration on CUDA).
SEED = DIABLOGPTConfig(max_seq_len=2048, enc_dim=896, enc_depth=3, dec_dim=768, dec_depth=12,
                       dec_cross_attn_layers=(1, 3, 6, 9), heads=8, dim_head=64,
                       dec_attn_dropout=0.25, dec_ff_dropout=0.25)

#: A small model that trains in minutes on 2 CPU cores (the main job's configuration there):
#: 256-wide 4-layer decoder with CCA at layers 2 and 4, a 2-layer 128-wide encoder, 256 tokens.
CPU = DIABLOGPTConfig(max_seq_len=256, enc_dim=128, enc_depth=2, dec_dim=256, dec_depth=4,
                      dec_cross_attn_layers=(2, 4), heads=4, dim_head=64,
                      dec_attn_dropout=0.1, dec_ff_dropout=0.1)
