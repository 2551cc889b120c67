"""Retro-fitting a pretrained decoder (diablogpt_pytorch.retrofit): tiny randomly initialised GPT-2
and Llama models made with transformers and saved to a temporary folder (never downloaded).

Pinned here: the base model's logits exactly with retrieval off and at initialisation; causality
and retrieval causality; gradients and optimizer groups only for the new parameters when frozen;
cached decoding and generate equal the full forward; checkpoints hold only the new weights and
refuse a different base; a training step and held-out evaluation through TrainingWrapper."""

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from diablogpt_pytorch import TrainingWrapper  # noqa: E402
from diablogpt_pytorch.checkpoint import load_checkpoint, load_model, save_checkpoint  # noqa: E402
from diablogpt_pytorch.corpus import default_corpus_documents  # noqa: E402
from diablogpt_pytorch.generation import generate  # noqa: E402
from diablogpt_pytorch.retrofit import RetroFitted, retrofit, weights_sha256  # noqa: E402
from diablogpt_pytorch.training import get_optimizer  # noqa: E402

C, K, V, N = 8, 2, 101, 40
NEW = dict(dec_cross_attn_layers=(1, 3), enc_dim=24, enc_depth=1, heads=2, dim_head=8, chunk_size=C)
NEXT = dict(NEW, enc_depth=0, enc_next_token=True)  # no encoder layers, next-token input


def _save_base(folder: Path, family: str, vocab: int = V, seed: int = 0, positions: int = 64) -> Path:
    torch.manual_seed(seed)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=32, n_layer=3,
                                         n_head=4, pad_token_id=0, bos_token_id=1, eos_token_id=1)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=3, num_attention_heads=4,
                                          num_key_value_heads=2, max_position_embeddings=positions,
                                          pad_token_id=0, bos_token_id=1, eos_token_id=1)
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(params=["encoder", "next_token"])
def new_parts(request):
    """The new parts: a 1-layer encoder, or none (enc_depth=0) with each neighbour token's input
    holding the next token's embedding too (enc_next_token)."""
    return NEW if request.param == "encoder" else NEXT


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def base_path(request, tmp_path_factory):
    return _save_base(tmp_path_factory.mktemp(request.param) / "base", request.param)


def _load_base(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()


def _inputs(seed: int = 1, n: int = N):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(2, V, (2, n), generator=g)
    retrieved = torch.randint(2, V, (2, n // C, K, 2 * C), generator=g)
    retrieved[:, :, 1, -5:] = 0  # padding, as at a document's end
    return seq, retrieved


def _activate(model: RetroFitted, seed: int = 0) -> RetroFitted:
    """Give CCA a non-zero output (as after some training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.cca.values():
            weight = block.fn.to_out.weight
            weight.copy_(torch.randn(weight.shape, generator=g) * weight.shape[1] ** -0.5)
    return model


# -- exactness ----------------------------------------------------------------------------------


def test_logits_equal_the_base_without_retrieval_and_at_initialisation(base_path, new_parts):
    base = _load_base(base_path)
    model = retrofit(base_path, **new_parts).eval()
    seq, retrieved = _inputs()
    expected = base(seq).logits
    assert torch.equal(model(seq), expected)
    assert torch.equal(model(seq, retrieved), expected)  # zero-initialised CCA output
    loss = model(torch.cat((seq, seq[:, :1]), dim=1), retrieved, return_loss=True)
    labels = torch.cat((seq[:, 1:], seq[:, :1]), dim=1)
    torch.testing.assert_close(loss, F.cross_entropy(expected.reshape(-1, V), labels.reshape(-1)))

    _activate(model)
    assert torch.equal(model(seq), expected)  # retrieval off: always the base model
    with_retrieval = model(seq, retrieved)
    assert torch.equal(with_retrieval[:, : C - 1], expected[:, : C - 1])  # nothing retrieved yet
    assert not torch.allclose(with_retrieval[:, C - 1:], expected[:, C - 1:])


def test_causality_and_retrieval_causality(base_path, new_parts):
    model = _activate(retrofit(base_path, **new_parts)).eval()
    seq, retrieved = _inputs()
    logits = model(seq, retrieved)
    p = 19
    changed = seq.clone()
    changed[:, p] = (changed[:, p] + 1) % V
    delta = (model(changed, retrieved) - logits).abs().amax(dim=(0, 2))
    assert delta[:p].max() == 0 and delta[p:].min() > 0
    for u in (0, 2):
        other = retrieved.clone()
        other[:, u] = torch.randint(2, V, other[:, u].shape)
        delta = (model(seq, other) - logits).abs().amax(dim=(0, 2))
        first = (u + 1) * C - 1
        assert delta[:first].max() == 0 and delta[first:first + C].min() > 0


def test_configuration_checks(base_path):
    with pytest.raises(ValueError, match=r"1-based block numbers in \[1, 3\]"):
        retrofit(base_path, **dict(NEW, dec_cross_attn_layers=(4,)))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        retrofit(base_path, **NEW, max_seq_len=128)
    with pytest.raises(ValueError, match="cannot load a causal LM"):
        retrofit(base_path.parent / "missing", **NEW)
    model = retrofit(base_path, **NEW, max_seq_len=32)
    with pytest.raises(ValueError, match="exceeds max_seq_len=32"):
        model(torch.randint(2, V, (1, 33)))
    with pytest.raises(ValueError, match="at least 4"):
        model(torch.randint(2, V, (1, 32)), torch.zeros(1, 3, K, 2 * C, dtype=torch.long))


# -- freezing and the optimizer ------------------------------------------------------------------


def test_frozen_base_gets_no_gradient_and_no_optimizer_slot(base_path, new_parts):
    model = _activate(retrofit(base_path, **new_parts))
    model.train()
    assert not model.base.training  # frozen: the base model's dropout stays off
    seq, retrieved = _inputs(n=N + 1)
    model(seq, retrieved[:, : N // C], return_loss=True).backward()
    new = {name for name, _ in model.named_parameters() if not name.startswith("base.")}
    assert new and all(name.startswith(("cca.", "encoder.", "to_enc.")) for name in new)
    for name, param in model.named_parameters():
        if name in new:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert not param.requires_grad and param.grad is None, name
    optimizer = get_optimizer(model)
    assert {n for group in optimizer.param_groups for n in group["names"]} == new
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(new)

    trained_base = retrofit(base_path, **new_parts, freeze=False)
    trained_base.train()
    assert trained_base.base.training
    names = {n for group in get_optimizer(trained_base).param_groups for n in group["names"]}
    assert any(n.startswith("base.") for n in names) and new <= names


def test_bf16_autocast_loss_and_backward(base_path):
    model = _activate(retrofit(base_path, **NEW))
    seq, retrieved = _inputs(n=N + 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(seq, retrieved[:, : N // C], return_loss=True)
    loss.backward()
    assert torch.isfinite(loss) and model.cca["0"].fn.to_out.weight.grad.abs().sum() > 0


# -- cached decoding and generation -------------------------------------------------------------


def test_cached_decoding_equals_the_full_forward(base_path, new_parts):
    model = _activate(retrofit(base_path, **new_parts)).eval()
    seq, retrieved = _inputs()
    full = model(seq, retrieved)
    for split in (1, C - 1, C, 13):
        cache = model.init_cache(2)
        parts = [model.decode(seq[:, :split], cache, retrieved[:, : split // C])]
        for p in range(split, N):
            completes = (p + 1) % C == 0
            parts.append(model.decode(seq[:, p:p + 1], cache,
                                      retrieved[:, p // C:p // C + 1] if completes else None))
        torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)
    cache = model.init_cache(2, retrieval=False)
    steps = [model.decode(seq[:, p:p + 1], cache) for p in range(N)]
    torch.testing.assert_close(torch.cat(steps, dim=1), model(seq), rtol=1e-4, atol=1e-4)


def test_greedy_generate_equals_the_full_forward(base_path, new_parts):
    model = _activate(retrofit(base_path, **new_parts, max_seq_len=32)).eval()
    _, retrieved = _inputs(n=32)
    prompt = torch.randint(2, V, (2, 5))
    out = generate(model, start=prompt, retrieved=retrieved, temperature=0.0, num_neighbors=K)
    assert out.shape == (2, 32) and torch.equal(out[:, :5], prompt)
    full = model(out[:, :-1], retrieved)
    assert torch.equal(full[:, 4:].argmax(-1), out[:, 5:])


def test_ragged_prompts_generate_as_each_prompt_alone(base_path):
    """Issue 19 item 9 through the base's own KV cache: prompts of different lengths in one call."""
    model = _activate(retrofit(base_path, **NEW, max_seq_len=32)).eval()
    _, retrieved = _inputs(n=32)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, V, (n,), generator=g) for n in (3, C + 2)]
    out = generate(model, start=prompts, retrieved=retrieved, temperature=0.0, num_neighbors=K)
    for i, prompt in enumerate(prompts):
        alone = generate(model, start=prompt, retrieved=retrieved[i:i + 1], temperature=0.0,
                         num_neighbors=K)
        assert torch.equal(out[i:i + 1], alone)


# -- checkpoints ------------------------------------------------------------------------------------


def test_checkpoint_holds_only_new_weights_and_refuses_another_base(base_path, new_parts, tmp_path):
    folder = tmp_path / "base"
    shutil.copytree(base_path, folder)
    model = _activate(retrofit(folder, **new_parts))
    assert model.config["base_sha256"] == weights_sha256(_load_base(folder))
    path = save_checkpoint(tmp_path / "retro.pt", model, step=3)
    payload = torch.load(path, weights_only=True)
    assert payload["model_class"] == "RetroFitted"
    assert payload["model"] and not any(k.startswith("base.") for k in payload["model"])
    assert set(payload["model"]) == {k for k in model.state_dict()}

    seq, retrieved = _inputs()
    loaded = load_model(path)
    assert isinstance(loaded, RetroFitted)
    assert torch.equal(loaded(seq, retrieved), model.eval()(seq, retrieved))

    fresh = retrofit(folder, **new_parts)
    assert load_checkpoint(path, fresh)["step"] == 3
    assert torch.equal(fresh.eval()(seq, retrieved), model(seq, retrieved))

    family = "gpt2" if "gpt2" in str(base_path) else "llama"
    shutil.rmtree(folder)
    _save_base(folder, family, seed=1)  # another base model in the same place
    with pytest.raises(ValueError, match="sha256"):
        load_model(path)
    with pytest.raises(ValueError, match="retro-fitted onto a base model with weights sha256"):
        load_checkpoint(path, retrofit(folder, **new_parts))


def test_unfrozen_checkpoint_stores_the_trained_base(base_path, tmp_path):
    model = retrofit(base_path, **NEW, freeze=False)
    with torch.no_grad():
        model.base.get_input_embeddings().weight.mul_(2)  # as if trained
    path = model.save_pretrained(tmp_path / "retro.pt")
    assert any(k.startswith("base.") for k in torch.load(path, weights_only=True)["model"])
    seq, _ = _inputs()
    assert torch.equal(load_model(path)(seq), model.eval()(seq))


# -- TrainingWrapper ----------------------------------------------------------------------------


def test_training_step_and_evaluation_through_the_training_wrapper(tmp_path):
    """The wrapper tokenizes with the default embedder's vocabulary (30522 ids, pad 0), so the base
    model here is made with that vocabulary."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, (name, text) in enumerate(default_corpus_documents().items()):
        if i % 8 == 0:
            (docs / name).write_text(text[:3000], encoding="utf-8")
    base_path = _save_base(tmp_path / "base", "gpt2", vocab=30522)
    model = retrofit(base_path, dec_cross_attn_layers=(2,), enc_dim=24, enc_depth=1, heads=2,
                     dim_head=8, chunk_size=16, max_seq_len=64)
    wrapper = TrainingWrapper(
        diablogpt=model, knn=K, chunk_size=16, documents_path=docs, glob="*.txt",
        chunks_memmap_path=tmp_path / "db" / "train.chunks.dat",
        seqs_memmap_path=tmp_path / "db" / "train.seq.dat",
        doc_ids_memmap_path=tmp_path / "db" / "train.doc_ids.dat",
        max_chunks=10_000, max_seqs=1_000, knn_extra_neighbors=8, valid_fraction=0.2)
    before = wrapper.evaluate(batch_size=2, max_batches=2, progress=False)
    assert before["with_retrieval"]["loss"] == before["without_retrieval"]["loss"]  # zero-init CCA

    optimizer = wrapper.get_optimizer(lr=1e-2)
    base_weights = {k: v.clone() for k, v in model.base.state_dict().items()}
    new_weights = {k: v.clone() for k, v in model.state_dict().items()}
    loader = iter(wrapper.get_dataloader(batch_size=2, shuffle=True))
    for _ in range(3):
        seq, retrieved = next(loader)
        loss = wrapper.train_model(seq, retrieved, return_loss=True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(loss)
    assert all(torch.equal(v, base_weights[k]) for k, v in model.base.state_dict().items())
    assert any(not torch.equal(v, new_weights[k]) for k, v in model.state_dict().items())
    after = wrapper.evaluate(batch_size=2, max_batches=2, progress=False)
    assert after["with_retrieval"]["loss"] != after["without_retrieval"]["loss"]
    assert after["without_retrieval"]["loss"] == before["without_retrieval"]["loss"]  # base untouched

    path = wrapper.save_checkpoint(tmp_path / "retro.pt", optimizer, step=3)
    payload = wrapper.load_checkpoint(path, optimizer)
    assert payload["step"] == 3 and payload["extra"]["database"]["chunk_size"] == 16


# -- torchrun -------------------------------------------------------------------------------------


def test_ddp_steps_under_two_ranks_equal_one_process_steps(tmp_path):
    """Two gloo ranks (as torchrun starts them) each take two DistributedDataParallel steps on their
    own batches, with the 1-layer encoder and with none (next-token input: every new parameter
    must get a gradient, or DDP refuses the second step); the new weights equal one process's
    steps on the mean of the two ranks' losses."""
    from test_distributed import assert_ok, finish, launch

    base_path = _save_base(tmp_path / "base", "llama")
    assert_ok(finish(launch("ddp", tmp_path, script=__file__), timeout=180))
    for i, parts in enumerate(_DDP_PARTS):
        torch.manual_seed(0)
        model = _activate(retrofit(base_path, **parts))
        opt = torch.optim.SGD(list(model.new_parameters()), lr=0.5)
        for step in range(2):
            batches = [_inputs(seed=10 + 2 * step + rank, n=N + 1) for rank in range(2)]
            sum(model(s, r[:, : N // C], return_loss=True) for s, r in batches).div(2).backward()
            opt.step()
            opt.zero_grad()
        trained = torch.load(tmp_path / f"rank0_{i}.pt", weights_only=True)
        assert set(trained) == set(model.state_dict())
        for name, value in model.state_dict().items():
            torch.testing.assert_close(trained[name], value, rtol=0, atol=4e-6)


_DDP_PARTS = (NEW, NEXT)


def _scenario_ddp(out: Path, info):
    from diablogpt_pytorch import distributed as D

    for i, parts in enumerate(_DDP_PARTS):
        torch.manual_seed(0)
        model = _activate(retrofit(out / "base", **parts))
        ddp = D.wrap_model(model)
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        opt = torch.optim.SGD(list(model.new_parameters()), lr=0.5)
        for step in range(2):
            seq, retrieved = _inputs(seed=10 + 2 * step + info.rank, n=N + 1)
            ddp(seq, retrieved[:, : N // C], return_loss=True).backward()
            opt.step()
            opt.zero_grad()
        if D.is_main():
            torch.save(model.state_dict(), out / f"rank0_{i}.pt")


if __name__ == "__main__":
    import sys

    from diablogpt_pytorch import distributed as D

    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    info = D.init_distributed(device="cpu")
    globals()[f"_scenario_{scenario}"](out_dir, info)
    D.cleanup()


def test_neighbour_tokens_enter_the_encoder_at_unit_scale(base_path):
    # the base's embeddings are small (0.02-std init); the encoder must see its neighbours at
    # unit RMS, as DIABLOGPT's unit-scale embeddings give, or its own branches drown them
    emb = _load_base(base_path).get_input_embeddings().weight.detach()
    assert emb.pow(2).mean().sqrt() < 0.1
    same_width = retrofit(base_path, **dict(NEW, enc_dim=None))
    out = same_width.to_enc(same_width.token_emb.weight)
    assert out.pow(2).mean().sqrt().item() == pytest.approx(1.0, rel=1e-4)
    assert not any(n.startswith("to_enc") for n in same_width.state_dict())
    narrower = retrofit(base_path, **dict(NEW, enc_dim=16))
    rms = narrower.to_enc(narrower.token_emb.weight).pow(2).mean().sqrt().item()
    assert 0.3 < rms < 1.5  # a default-initialised Linear of unit-RMS inputs


def test_next_token_input_pairs_each_neighbour_token_with_the_next(base_path):
    model = retrofit(base_path, **NEXT)
    assert model.config["enc_next_token"] and model.to_enc.in_features == 2 * model.token_emb.embedding_dim
    _, retrieved = _inputs()
    pairs = model._next_token_input(retrieved)
    emb, hidden = model.token_emb(retrieved), model.token_emb.embedding_dim
    real = (retrieved != 0).unsqueeze(-1)
    assert torch.equal(pairs[..., :hidden], emb * real)  # the token itself, padding at zero
    assert torch.equal(pairs[..., :-1, hidden:], (emb * real)[..., 1:, :])  # the next token
    assert not pairs[..., -1, hidden:].any()  # nothing after a neighbour's last token
    assert not model.encoder.layers and model.encoder.context_norm is None
    assert not any("context_norm" in name for name in model.state_dict())


def test_encoder_without_cross_attention_loads_a_state_with_its_old_context_norm():
    from diablogpt_pytorch.model.encoder import Encoder

    old = Encoder(16, 1, 24, 2, 8, 0.0, 0.0, [1], False, None).state_dict()
    new = Encoder(16, 1, 24, 2, 8, 0.0, 0.0, [], False, None)
    assert new.context_norm is None and "context_norm.gamma" in old
    state = {k: v for k, v in old.items() if ".1." not in k}  # without the cross-attention layer
    new.load_state_dict(state)  # strict: the stale context norm is dropped, nothing else missing
    x, context = torch.randn(1, 2, 2, 6, 16), torch.randn(1, 2, 3, 24)
    out = new(x, torch.zeros(1, 2, 2, 6, dtype=torch.bool), context)
    assert out.shape == (1, 2, 12, 16)
    assert torch.equal(out, new(x, torch.zeros(1, 2, 2, 6, dtype=torch.bool), torch.randn(1, 2, 3, 24)))
