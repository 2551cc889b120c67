"""A lean, inference-only BERT encoder for chunk embeddings.

It computes exactly what ``transformers.BertModel(...).last_hidden_state`` computes for a standard
BERT checkpoint (absolute positions, erf GELU, post-LayerNorm; Devlin et al. 2019), from the same
``config.json`` and ``model.safetensors``, without importing transformers' modeling code (a
fixed start-up cost of every database build and retriever) and with one fused query/key/value
projection per layer. Anything else (other activations or position embeddings, weights only in another
format) is not handled here: :func:`load` returns None and the embedder falls back to
transformers. ``tests/test_embedder.py`` checks it against ``BertModel`` on the bundled model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

_PREFIXES = ("", "bert.")  # plain BertModel checkpoints, or BertFor* checkpoints with a "bert." prefix


class LeanBert:
    """Frozen BERT encoder: ``model(input_ids (b, L), attention_mask (b, L))`` -> last hidden states
    (b, L, hidden) in the weights' dtype. Token type 0 everywhere, positions 0..L-1."""

    def __init__(self, config: dict, weights: dict[str, Tensor]):
        self.config = config
        self.hidden_size = int(config["hidden_size"])
        self.heads = int(config["num_attention_heads"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        w = weights
        self.word = w["embeddings.word_embeddings.weight"]
        # position + token type 0, added to every sequence
        self.pos_type = (w["embeddings.position_embeddings.weight"]
                         + w["embeddings.token_type_embeddings.weight"][0])
        self.emb_norm = (w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        self.layers = []
        for i in range(int(config["num_hidden_layers"])):
            p = f"encoder.layer.{i}."
            qkv = [w[f"{p}attention.self.{n}.{t}"]
                   for t in ("weight", "bias") for n in ("query", "key", "value")]
            self.layers.append(dict(
                qkv_w=torch.cat(qkv[:3]), qkv_b=torch.cat(qkv[3:]),
                out_w=w[f"{p}attention.output.dense.weight"], out_b=w[f"{p}attention.output.dense.bias"],
                norm1=(w[f"{p}attention.output.LayerNorm.weight"], w[f"{p}attention.output.LayerNorm.bias"]),
                ff_in_w=w[f"{p}intermediate.dense.weight"], ff_in_b=w[f"{p}intermediate.dense.bias"],
                ff_out_w=w[f"{p}output.dense.weight"], ff_out_b=w[f"{p}output.dense.bias"],
                norm2=(w[f"{p}output.LayerNorm.weight"], w[f"{p}output.LayerNorm.bias"]),
            ))

    @property
    def dtype(self) -> torch.dtype:
        return self.word.dtype

    def __call__(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        length = input_ids.shape[1]
        h, heads = self.hidden_size, self.heads
        x = F.embedding(input_ids, self.word) + self.pos_type[:length]
        x = F.layer_norm(x, (h,), *self.emb_norm, self.eps)
        keep = attention_mask.bool()[:, None, None, :]  # keys a query may attend to
        for layer in self.layers:
            q, k, v = rearrange(F.linear(x, layer["qkv_w"], layer["qkv_b"]),
                                "b n (three h d) -> three b h n d", three=3, h=heads)
            attn = rearrange(F.scaled_dot_product_attention(q, k, v, attn_mask=keep), "b h n d -> b n (h d)")
            x = F.layer_norm(F.linear(attn, layer["out_w"], layer["out_b"]) + x, (h,), *layer["norm1"],
                             self.eps)
            ff = F.gelu(F.linear(x, layer["ff_in_w"], layer["ff_in_b"]))
            x = F.layer_norm(F.linear(ff, layer["ff_out_w"], layer["ff_out_b"]) + x, (h,), *layer["norm2"],
                             self.eps)
        return x


def supported(config: dict) -> bool:
    """Whether ``config`` (a BERT config.json) is the architecture :class:`LeanBert` computes."""
    return (config.get("model_type") == "bert" and config.get("hidden_act") == "gelu"
            and config.get("position_embedding_type", "absolute") == "absolute"
            and not config.get("is_decoder", False) and not config.get("add_cross_attention", False)
            and int(config.get("hidden_size", 0)) % max(int(config.get("num_attention_heads", 1)), 1) == 0)


def load(directory: str, device: torch.device | str = "cpu",
         dtype: torch.dtype = torch.float32) -> Optional[LeanBert]:
    """A :class:`LeanBert` from a directory with ``config.json`` and ``model.safetensors``, or None
    when the checkpoint is not one it computes (the caller then uses transformers)."""
    folder = Path(directory)
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    if not (config_path.is_file() and weights_path.is_file()):
        return None
    config = json.loads(config_path.read_text())
    if not supported(config):
        return None
    try:
        from safetensors.torch import load_file
    except ImportError:
        return None
    raw = load_file(str(weights_path))
    for prefix in _PREFIXES:
        weights = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
        if "embeddings.word_embeddings.weight" in weights:
            break
    else:
        return None
    weights = {k: v.to(device=device, dtype=dtype) for k, v in weights.items()
               if v.is_floating_point()}
    try:
        return LeanBert(config, weights)
    except KeyError:  # a tensor the standard layout has is missing: not a plain BERT
        return None
