"""The lean BERT encoder (diablogpt_pytorch/_bert.py) against transformers' BertModel, on the
bundled offline all-MiniLM-L6-v2 (real weights, no network)."""

import json

import pytest
import torch
from transformers import BertConfig, BertModel

from diablogpt_pytorch import _bert
from diablogpt_pytorch import embedder as emb


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (6, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # right padding, as format_chunks makes it
    mask[4, 3:] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_bert_computes_what_transformers_bert_computes(dtype):
    path = emb._location(emb.DEFAULT_EMBEDDER, False)
    lean = _bert.load(path, "cpu", dtype)
    assert lean is not None and lean.hidden_size == 384 and lean.dtype == dtype
    hf = BertModel.from_pretrained(path).to(dtype).eval()
    ids, mask = batch()
    with torch.inference_mode():
        ours = lean(ids, mask).float()
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    real = mask.bool()  # padded positions are never pooled
    if dtype == torch.float32:
        torch.testing.assert_close(ours[real], ref[real], rtol=1e-4, atol=1e-4)
    else:
        cos = torch.nn.functional.cosine_similarity(ours[real], ref[real], dim=-1)
        assert cos.min() > 0.999, cos.min()


def test_embedder_uses_the_lean_bert_for_standard_checkpoints_and_transformers_otherwise(tmp_path):
    assert isinstance(emb._encoder(emb.DEFAULT_EMBEDDER, "cpu", torch.float32), _bert.LeanBert)
    # a BERT with another activation is not what LeanBert computes: transformers runs it
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, hidden_act="relu")
    torch.manual_seed(0)
    BertModel(config).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["hidden_act"] == "relu"
    assert _bert.load(str(tmp_path)) is None
    model = emb._encoder(str(tmp_path), "cpu", torch.float32)
    assert isinstance(model, BertModel)
    assert emb.hidden_size(str(tmp_path)) == 32
