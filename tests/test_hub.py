"""Hub-style model folders: save_pretrained / from_pretrained (config.json + model.safetensors)."""

import json

import pytest
import torch

from diablogpt_pytorch import DIABLOGPT

C, K, V = 8, 2, 61


def tiny(**overrides) -> DIABLOGPT:
    torch.manual_seed(0)
    config = dict(num_tokens=V, max_seq_len=32, enc_dim=32, enc_depth=2, dec_dim=48, dec_depth=3,
                  dec_cross_attn_layers=(2, 3), heads=2, dim_head=16, chunk_size=C)
    config.update(overrides)
    return DIABLOGPT(**config)


def test_round_trip_gives_bit_identical_logits(tmp_path):
    model = tiny(enc_cross_attn_layers=(2,), gated_rmsnorm=True).eval()
    with torch.no_grad():  # weights that differ from any fresh init
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    folder = model.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((folder / "config.json").read_text()) == json.loads(json.dumps(model.config))

    loaded = DIABLOGPT.from_pretrained(folder)
    assert not loaded.training
    seq = torch.randint(1, V, (2, 32))
    retrieved = torch.randint(0, V, (2, 32 // C, K, 2 * C))
    with torch.no_grad():
        assert torch.equal(model(seq, retrieved), loaded(seq, retrieved))
        assert torch.equal(model(seq), loaded(seq))
    for (name, a), (name_b, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert name == name_b and torch.equal(a, b), name


def test_the_folder_holds_no_pickle_and_overrides_apply(tmp_path):
    from safetensors import safe_open

    model = tiny(dec_ff_dropout=0.25)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) <= set(model.state_dict())
        assert f.metadata() == {"format": "pt"}
    loaded = DIABLOGPT.from_pretrained(tmp_path, dec_ff_dropout=0.0)
    assert loaded.config["dec_ff_dropout"] == 0.0 and loaded.config["dec_dim"] == 48


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        DIABLOGPT.from_pretrained(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="has no config.json or model.safetensors"):
        DIABLOGPT.from_pretrained(tmp_path)

    tiny().save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "a" / "config.json").write_text(json.dumps(dict(config, colour="red")))
    with pytest.raises(ValueError, match=r"keys \['colour'\] that DIABLOGPT does not take"):
        DIABLOGPT.from_pretrained(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps(dict(config, dec_dim=64)))
    with pytest.raises(ValueError, match="does not fit the model"):
        DIABLOGPT.from_pretrained(tmp_path / "a")
    with pytest.raises(TypeError, match="unknown config overrides"):
        DIABLOGPT.from_pretrained(tmp_path / "a", colour="red")


def test_a_repo_id_offline_and_not_cached_fails_clearly(tmp_path, monkeypatch):
    # conftest sets HF_HUB_OFFLINE=1; local_files_only makes the test independent of it
    with pytest.raises(OSError, match="not in the local Hugging Face cache"):
        DIABLOGPT.from_pretrained("nobody-here/no-such-diablogpt", cache_dir=tmp_path,
                                  local_files_only=True)


def test_a_repo_id_loads_from_the_hugging_face_cache_offline(tmp_path):
    """A repository already in the cache (the layout huggingface_hub writes) loads offline."""
    model = tiny().eval()
    repo = tmp_path / "models--someone--tiny-diablogpt"
    commit = "0" * 40
    model.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded = DIABLOGPT.from_pretrained("someone/tiny-diablogpt", cache_dir=tmp_path,
                                       local_files_only=True)
    seq = torch.randint(1, V, (1, 32))
    with torch.no_grad():
        assert torch.equal(model(seq), loaded(seq))
