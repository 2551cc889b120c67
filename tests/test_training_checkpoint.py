"""Checkpoints and the optimizer: exact round trip, exact resume, safe loading, clear refusals,
and deterministic AdamW parameter groups. Tiny random models only (no database needed)."""

import io
import json
import pickle

import pytest
import torch

from diablogpt_pytorch import DIABLOGPT
from diablogpt_pytorch.checkpoint import load_checkpoint, load_model, read_checkpoint, save_checkpoint
from diablogpt_pytorch.training import get_optimizer

C, N, K = 4, 16, 2
TINY = dict(num_tokens=64, max_seq_len=N, enc_dim=16, enc_depth=1, dec_dim=16, dec_depth=2,
            dec_cross_attn_layers=(2,), heads=2, dim_head=8, chunk_size=C)


def _batch(seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, 64, (b, N + 1), generator=g)
    retrieved = torch.randint(0, 64, (b, N // C, K, 2 * C), generator=g)
    return seq, retrieved


def _step(model, optim, seq, retrieved):
    loss = model(seq, retrieved, return_loss=True)
    loss.backward()
    optim.step()
    optim.zero_grad()
    return loss.item()


def test_round_trip_gives_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = DIABLOGPT(**TINY).eval()
    seq, retrieved = _batch()
    path = save_checkpoint(tmp_path / "model.pt", model, step=7)
    loaded = load_model(path)  # from the file alone: no documents, no optimizer
    assert not loaded.training
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(model(seq[:, :-1], retrieved), loaded(seq[:, :-1], retrieved))
        assert torch.equal(model(seq[:, :-1]), loaded(seq[:, :-1]))
    assert read_checkpoint(path)["step"] == 7


def test_resume_gives_the_same_next_losses(tmp_path):
    """With dropout on, the next losses depend on weights, Adam moments and the RNG state."""
    config = dict(TINY, dec_attn_dropout=0.1, dec_ff_dropout=0.1, enc_ff_dropout=0.1)
    torch.manual_seed(0)
    model = DIABLOGPT(**config).train()
    optim = get_optimizer(model, lr=1e-2, wd=0.1)
    batches = [_batch(seed) for seed in range(6)]
    for seq, retrieved in batches[:3]:
        _step(model, optim, seq, retrieved)
    path = save_checkpoint(tmp_path / "ckpt.pt", model, optim, step=3)
    expected = [_step(model, optim, *batch) for batch in batches[3:]]

    torch.manual_seed(123)  # a different state, which the checkpoint must overwrite
    resumed = DIABLOGPT(**config).train()
    resumed_optim = get_optimizer(resumed, lr=1e-2, wd=0.1)
    payload = load_checkpoint(path, resumed, resumed_optim)
    assert payload["step"] == 3
    got = [_step(resumed, resumed_optim, *batch) for batch in batches[payload["step"]:]]
    assert got == expected


def test_checkpoint_loads_without_unpickling(tmp_path):
    torch.manual_seed(0)
    model = DIABLOGPT(**TINY)
    path = save_checkpoint(tmp_path / "ckpt.pt", model, get_optimizer(model), step=1,
                           extra={"note": "x"})
    payload = torch.load(path, weights_only=True)  # plain data only
    assert json.loads(payload["config_json"]) == model.config
    assert read_checkpoint(path)["extra"] == {"note": "x"}
    # a file that needs arbitrary unpickling is refused
    evil = tmp_path / "evil.pt"
    torch.save({"format": "diablogpt-checkpoint", "obj": io.StringIO("x")}, evil)
    with pytest.raises(pickle.UnpicklingError):
        read_checkpoint(evil)


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    torch.manual_seed(0)
    model = DIABLOGPT(**TINY)
    save_checkpoint(tmp_path / "ckpt.pt", model)
    save_checkpoint(tmp_path / "ckpt.pt", model, step=2)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    assert read_checkpoint(tmp_path / "ckpt.pt")["step"] == 2


def test_mismatched_checkpoints_are_refused(tmp_path):
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "ckpt.pt", DIABLOGPT(**TINY))
    other = DIABLOGPT(**dict(TINY, dec_depth=3))
    with pytest.raises(ValueError, match=r"different config.*dec_depth"):
        load_checkpoint(path, other)
    with pytest.raises(ValueError, match="no optimizer state"):
        model = DIABLOGPT(**TINY)
        load_checkpoint(path, model, get_optimizer(model))
    not_ours = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, not_ours)
    with pytest.raises(ValueError, match="not a diablogpt checkpoint"):
        read_checkpoint(not_ours)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_model(tmp_path / "missing.pt")


def test_optimizer_groups_are_deterministic_and_skip_decay_on_norms_biases_null_kv():
    torch.manual_seed(0)
    model = DIABLOGPT(**TINY)
    optim = get_optimizer(model, lr=1e-3, wd=0.05)
    decay, plain = optim.param_groups
    assert decay["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    order = [n for n, _ in model.named_parameters()]
    for group in (decay, plain):  # named_parameters order, names aligned with params
        assert group["names"] == [n for n in order if n in set(group["names"])]
        params = dict(model.named_parameters())
        assert all(p is params[n] for n, p in zip(group["names"], group["params"]))
    assert set(decay["names"]) | set(plain["names"]) == set(order)
    assert set(plain["names"]) == model.no_weight_decay_parameter_names()
    assert any("null" in n for n in plain["names"])
    assert all(params[n].ndim >= 2 for n in decay["names"])
    # the same model built twice gives the same groups
    again = get_optimizer(DIABLOGPT(**TINY), lr=1e-3, wd=0.05)
    assert [g["names"] for g in again.param_groups] == [decay["names"], plain["names"]]


def test_step_batch_sampler_resumes_at_the_same_batch():
    from itertools import islice

    from diablogpt_pytorch.training import StepBatchSampler

    full = list(islice(iter(StepBatchSampler(10, 3, seed=1)), 8))  # 3 batches per epoch
    assert all(len(b) == 3 for b in full)
    assert sorted(sum(full[:3], [])) == sorted(set(sum(full[:3], [])))  # no repeats in an epoch
    assert full[:3] != full[3:6]  # epochs are reshuffled
    for start in (1, 3, 5):
        assert list(islice(iter(StepBatchSampler(10, 3, seed=1, start_step=start)), 8 - start)) \
            == full[start:]


def test_rng_state_loads_on_the_cpu_whatever_map_location(tmp_path):
    """Issue 19 item 1: resuming onto an accelerator mapped the RNG state there too, and
    torch.set_rng_state / numpy refuse a non-CPU tensor. The meta device stands in for CUDA."""
    import random

    import numpy as np

    torch.manual_seed(0)
    model = DIABLOGPT(**TINY)
    optim = get_optimizer(model)
    _step(model, optim, *_batch())
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    path = save_checkpoint(tmp_path / "ckpt.pt", model, optim, step=1)
    expected = (torch.rand(3), np.random.rand(3), random.random())

    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    with torch.device("meta"):
        on_device = DIABLOGPT(**TINY)
    payload = load_checkpoint(path, on_device, map_location="meta")
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1]) and got[2] == expected[2]
    # the weights and optimizer state went where they were asked to, the RNG state stayed on CPU
    assert all(t.device.type == "meta" for t in payload["model"].values())
    moments = [s["exp_avg"] for s in payload["optimizer"]["state"].values()]
    assert moments and all(t.device.type == "meta" for t in moments)
    assert payload["rng"]["torch"].device.type == "cpu"
