"""The model package keeps the contract of the single-module model it replaced: a model folder
written by revision 7df77d6 (before ``diablogpt_pytorch/model.py`` became a package) loads with
every parameter name unchanged and gives the same logits and loss."""

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from diablogpt_pytorch import DIABLOGPT
from diablogpt_pytorch.model import Block, ChunkedCrossAttention, EncoderBlock

OLD = Path(__file__).parent / "data" / "diablogpt_7df77d6"


def test_a_model_folder_of_the_single_module_model_loads_and_computes_the_same():
    model = DIABLOGPT.from_pretrained(OLD)  # strict: a renamed parameter would fail here
    with safe_open(OLD / "model.safetensors", "pt") as f:
        saved_names = list(f.keys())
    assert sorted(saved_names) == sorted(model.state_dict())
    assert any(name.startswith("layers.0.1.fn.") for name in saved_names)  # the CCA of layer 1
    expected = load_file(OLD / "expected.safetensors")
    with torch.no_grad():
        logits = model(expected["seq"][:, :-1], expected["retrieved"])
        loss = model(expected["seq"], expected["retrieved"], return_loss=True)
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss.reshape(1), expected["loss"], rtol=1e-6, atol=1e-6)


def test_blocks_name_their_sublayers_over_the_saved_layout():
    model = DIABLOGPT.from_pretrained(OLD)
    assert [type(block) for block in model.layers] == [Block] * 3
    for i, block in enumerate(model.layers):
        assert (block.attn, block.cca, block.ff) == tuple(block)
        assert (block.cca is not None) == (i in model.cca_layer_ids)
    assert isinstance(model.layers[0].cca.fn, ChunkedCrossAttention)
    assert model._cca(2) is model.layers[2].cca
    assert [type(block) for block in model.encoder.layers] == [EncoderBlock] * 2
    assert [block.cross is not None for block in model.encoder.layers] == [False, True]
    # the parameter order (which optimizer states are saved in) follows the same layout
    names = [name for name, _ in model.named_parameters()]
    first = [n for n in names if n.startswith("layers.0.")]
    assert first[0].startswith("layers.0.0.fn.") and first[-1].startswith("layers.0.2.norm.")
