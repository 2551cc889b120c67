"""DIABLOGPT model invariants, on tiny CPU configs."""

import math

import pytest
import torch

from diablogpt_pytorch.config import SEED
from diablogpt_pytorch.model import DIABLOGPT, deepnet_constants

C = 8  # chunk size of the tiny configs
K = 2
N = 4 * C  # sequence length: 4 chunks


def tiny(**overrides) -> DIABLOGPT:
    config = dict(num_tokens=97, max_seq_len=64, enc_dim=32, enc_depth=2, dec_dim=48, dec_depth=4,
                  dec_cross_attn_layers=(2, 4), heads=2, dim_head=16, chunk_size=C)
    config.update(overrides)
    # every residual branch random (not the zero default): structural tests need every path live
    config.setdefault("zero_init_residual", False)
    torch.manual_seed(0)
    return DIABLOGPT(**config).eval()


def batch(b=2, n=N, chunks=N // C, seed=1, pad_id=0):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, 97, (b, n), generator=g)
    retrieved = torch.randint(1, 97, (b, chunks, K, 2 * C), generator=g)
    return seq, retrieved


# -- item 1: causality ---------------------------------------------------------------------------


@pytest.mark.parametrize("use_retrieval", [True, False])
@pytest.mark.parametrize("p", [0, C - 1, C, 2 * C + 3, N - 1])
def test_logit_at_p_depends_only_on_tokens_up_to_p(use_retrieval, p):
    model = tiny()
    seq, retrieved = batch()
    retrieved = retrieved if use_retrieval else None
    before = model(seq, retrieved)
    seq2 = seq.clone()
    seq2[:, p] = (seq2[:, p] % 96) + 1 + (seq2[:, p] % 96 == 0)  # a different non-pad token
    after = model(seq2, retrieved)
    torch.testing.assert_close(after[:, :p], before[:, :p], rtol=0, atol=1e-5)
    assert (after[:, p:] - before[:, p:]).abs().amax(dim=-1).min() > 1e-4  # every later position moves


# -- item 2: retrieval causality ------------------------------------------------------------------


@pytest.mark.parametrize("u", [0, 1, 3])
def test_neighbours_of_chunk_u_reach_only_positions_from_its_last_token(u):
    model = tiny()
    seq, retrieved = batch()
    before = model(seq, retrieved)
    other = retrieved.clone()
    other[:, u] = torch.randint(1, 97, other[:, u].shape, generator=torch.Generator().manual_seed(9))
    after = model(seq, other)
    boundary = (u + 1) * C - 1
    torch.testing.assert_close(after[:, :boundary], before[:, :boundary], rtol=0, atol=1e-5)
    assert (after[:, boundary] - before[:, boundary]).abs().max() > 1e-4


def test_first_c_minus_1_positions_never_see_retrieval():
    model = tiny()
    seq, retrieved = batch()
    with_retrieval = model(seq, retrieved)
    without = model(seq, None)
    torch.testing.assert_close(with_retrieval[:, : C - 1], without[:, : C - 1], rtol=0, atol=1e-5)
    assert (with_retrieval[:, C - 1] - without[:, C - 1]).abs().max() > 1e-4


def test_window_u_sees_chunk_u_neighbours_up_to_last_token_of_window():
    """Window u = last token of chunk u + first C-1 tokens of chunk u+1: chunk u's neighbours reach
    all of it, and chunk u+1's neighbours only from position (u+2)C-1."""
    model = tiny()
    seq, retrieved = batch()
    base = model(seq, retrieved)
    for u in range(N // C - 1):
        other = retrieved.clone()
        other[:, u + 1] = (other[:, u + 1] % 96) + 1
        moved = (model(seq, other) - base).abs().amax(dim=(0, 2)) > 1e-5
        assert not moved[: (u + 2) * C - 1].any()
        assert moved[(u + 2) * C - 1]


# -- item 3: chunked cross-attention details --------------------------------------------------------


def test_all_padding_neighbours_give_finite_output_and_gradients():
    model = tiny().train()
    seq, retrieved = batch()
    retrieved = torch.zeros_like(retrieved)  # every neighbour is padding
    loss = model(torch.cat((seq, seq[:, :1]), dim=1), retrieved, return_loss=True)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_padding_tokens_in_neighbours_are_masked():
    """Changing tokens hidden behind pad positions changes nothing: a neighbour of all padding is
    the same as another neighbour of all padding, whatever the other neighbour holds."""
    model = tiny()
    seq, retrieved = batch()
    retrieved[:, :, 1] = 0  # second neighbour entirely padding
    a = model(seq, retrieved)
    # the null key/value makes the output finite; CCA with one real + one padded neighbour must
    # equal CCA over the real neighbour alone (K=1)
    b = model(seq, retrieved[:, :, :1])
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_one_softmax_over_all_neighbours():
    """Swapping the order of the K neighbours of a chunk does not change the output (they share one
    softmax, positions are relative within each neighbour)."""
    model = tiny()
    seq, retrieved = batch()
    a = model(seq, retrieved)
    b = model(seq, retrieved.flip(2))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_extra_trailing_chunk_of_neighbours_is_ignored_but_too_few_is_an_error():
    model = tiny()
    seq, retrieved = batch(n=N - 3, chunks=N // C)  # partial last chunk: only 3 chunks complete
    a = model(seq, retrieved)
    b = model(seq, retrieved[:, :3])
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="needs"):
        model(seq, retrieved[:, :2])
    with pytest.raises(ValueError, match="2\\*chunk_size"):
        model(seq, retrieved[..., :C])


# -- item 4: every constructor argument takes effect ---------------------------------------------


def param_count(model):
    return sum(p.numel() for p in model.parameters())


def test_heads_and_dim_head_change_the_model():
    base = tiny()
    assert param_count(tiny(heads=4)) != param_count(base)
    small_heads = tiny(dim_head=16, heads=4)
    assert small_heads.layers[0][0].fn.heads == 4
    seq, retrieved = batch()
    assert small_heads(seq, retrieved).shape == (2, N, 97)
    # heads with the same inner width still changes the computation
    a = tiny(heads=2, dim_head=16)
    b = tiny(heads=4, dim_head=8)
    state = {name: t.reshape(b.state_dict()[name].shape) for name, t in a.state_dict().items()}
    b.load_state_dict(state)  # same weights, split into 4 heads of 8 instead of 2 heads of 16
    assert not torch.allclose(a(seq, retrieved), b(seq, retrieved))


def test_dropouts_take_effect_only_in_train_mode():
    seq, retrieved = batch()
    for arg in ("dec_attn_dropout", "dec_ff_dropout", "enc_attn_dropout", "enc_ff_dropout"):
        model = tiny(**{arg: 0.5})
        eval_out = model(seq, retrieved)
        torch.testing.assert_close(eval_out, model(seq, retrieved))
        model.train()
        torch.manual_seed(1)
        first = model(seq, retrieved)
        torch.manual_seed(2)
        assert not torch.allclose(first, model(seq, retrieved)), arg
    model = tiny().train()  # no dropout: train == eval
    torch.testing.assert_close(model(seq, retrieved), model.eval()(seq, retrieved))


def test_layer_arguments_place_the_modules():
    model = tiny(dec_depth=5, dec_cross_attn_layers=(1, 5), enc_depth=3, enc_cross_attn_layers=(2,))
    assert len(model.layers) == 5
    assert [layer[1] is not None for layer in model.layers] == [True, False, False, False, True]
    assert len(model.encoder.layers) == 3
    assert [layer[1] is not None for layer in model.encoder.layers] == [False, True, False]
    with pytest.raises(ValueError, match="dec_cross_attn_layers"):
        tiny(dec_cross_attn_layers=(0, 2))
    with pytest.raises(ValueError, match="enc_cross_attn_layers"):
        tiny(enc_cross_attn_layers=(3,))


def test_dims_num_tokens_chunk_size_and_max_seq_len():
    model = tiny(enc_dim=24, dec_dim=40, num_tokens=50, chunk_size=4, max_seq_len=16)
    seq = torch.randint(1, 50, (1, 16))
    retrieved = torch.randint(1, 50, (1, 4, 2, 8))
    assert model(seq, retrieved).shape == (1, 16, 50)
    assert model.token_emb.weight.shape == (50, 40)
    assert model.encoder.final_norm.gamma.shape == (24,)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.randint(1, 50, (1, 17)))


def test_pad_id_is_ignored_in_the_loss():
    model = tiny(pad_id=5)
    seq, retrieved = batch(n=N + 1)
    padded = seq.clone()
    padded[:, -4:] = 5
    loss_padded = model(padded, retrieved, return_loss=True)
    logits = model(padded[:, :-1], retrieved)
    expected = torch.nn.functional.cross_entropy(logits[:, :-4].reshape(-1, 97), padded[:, 1:-4].reshape(-1))
    torch.testing.assert_close(loss_padded, expected, rtol=1e-5, atol=1e-5)


def test_gated_rmsnorm_adds_gates_that_change_output():
    seq, retrieved = batch()
    plain, gated = tiny(), tiny(gated_rmsnorm=True)
    assert any("gate" in n for n, _ in gated.named_parameters())
    assert not any("gate" in n for n, _ in plain.named_parameters())
    assert not torch.allclose(plain(seq, retrieved), gated(seq, retrieved))


def test_deepnet_constants_and_post_norm():
    consts = deepnet_constants(enc_depth=3, dec_depth=12)
    assert math.isclose(consts["enc_alpha"], 0.81 * (3 ** 4 * 12) ** (1 / 16))
    assert math.isclose(consts["enc_beta"], 0.87 * (3 ** 4 * 12) ** (-1 / 16))
    assert math.isclose(consts["dec_alpha"], (3 * 12) ** 0.25)
    assert math.isclose(consts["dec_beta"], (12 * 12) ** -0.25)
    model = tiny(use_deepnet=True)
    assert model.layers[0][0].alpha == pytest.approx(deepnet_constants(2, 4)["dec_alpha"])
    assert model.encoder.layers[0][0].alpha == pytest.approx(deepnet_constants(2, 4)["enc_alpha"])
    # beta-scaled init: value/out/feed-forward weights are smaller than the plain init's
    v_std = model.layers[0][0].fn.to_out.weight.std()
    assert v_std < tiny().layers[0][0].fn.to_out.weight.std()
    seq, retrieved = batch()
    out = model(seq, retrieved)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, tiny()(seq, retrieved))
    # retrieval causality holds with post-norm too
    torch.testing.assert_close(out[:, : C - 1], model(seq, None)[:, : C - 1], rtol=0, atol=1e-5)


def test_default_init_zeroes_the_decoder_residual_branches_but_not_retrieval():
    torch.manual_seed(0)
    model = DIABLOGPT(num_tokens=97, max_seq_len=64, enc_dim=32, enc_depth=2, dec_dim=48, dec_depth=4,
                      dec_cross_attn_layers=(2, 4), heads=2, dim_head=16, chunk_size=C)
    seq, retrieved = batch()
    # without retrieval every block starts as the identity: the logits are the head of the norm
    # of the token embedding, whatever the context
    expected = model.to_logits(model.final_norm(model.token_emb(seq)))
    torch.testing.assert_close(model(seq, None), expected, rtol=0, atol=1e-5)
    # the cross-attention is live from the first step: with neighbours the logits of the later
    # chunks change, and the encoder and CCA projections all receive gradients
    assert not torch.allclose(model(seq, retrieved)[:, C:], expected[:, C:])
    model(torch.cat([seq, seq[:, :1]], 1), retrieved, return_loss=True).backward()
    for name, p in model.named_parameters():
        if name.startswith("encoder.") or ".1.fn." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the switch restores the random (torch default) initialisation of those projections
    torch.manual_seed(0)
    plain = DIABLOGPT(**dict(model.config, zero_init_residual=False))
    assert plain.layers[0][0].fn.to_out.weight.abs().sum() > 0
    assert not torch.allclose(plain(seq, None), plain.to_logits(plain.final_norm(plain.token_emb(seq))))


def test_token_embedding_starts_at_the_requested_scale():
    """Unit scale by default (so the random chunked cross-attention output, about 0.3 RMS, does
    not drown the tokens); the argument sets it, and a non-positive one is refused."""
    torch.manual_seed(0)
    kw = dict(num_tokens=4000, max_seq_len=64, enc_dim=32, enc_depth=1, dec_dim=64, dec_depth=2,
              dec_cross_attn_layers=(2,), heads=2, dim_head=16, chunk_size=C)
    assert abs(DIABLOGPT(**kw).token_emb.weight.std().item() - 1.0) < 0.02
    assert abs(DIABLOGPT(**kw, token_emb_init_std=0.02).token_emb.weight.std().item() - 0.02) < 0.001
    with pytest.raises(ValueError, match="token_emb_init_std"):
        DIABLOGPT(**kw, token_emb_init_std=0.0)


def test_config_rebuilds_the_same_architecture():
    model = tiny(gated_rmsnorm=True, enc_cross_attn_layers=(1,))
    clone = DIABLOGPT(**model.config)
    assert [n for n, _ in clone.named_parameters()] == [n for n, _ in model.named_parameters()]


# -- item 5: the loss in every mode ------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("use_retrieval", [True, False])
def test_loss_in_train_and_eval_mode_with_and_without_retrieval(train, use_retrieval):
    model = tiny(dec_attn_dropout=0.1).train(train)
    seq, retrieved = batch(n=N + 1)
    loss = model(seq, retrieved if use_retrieval else None, return_loss=True)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert 3.0 < loss.item() < 7.0  # ~ln(97) = 4.57 at init


def test_gradients_reach_every_parameter():
    model = tiny(gated_rmsnorm=True).train()
    seq, retrieved = batch(n=N + 1)
    model(seq, retrieved, return_loss=True).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_bf16_autocast_on_cpu_forward_and_backward_are_finite():
    model = tiny().train()
    seq, retrieved = batch(n=N + 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(seq, retrieved, return_loss=True)
    loss.backward()
    assert torch.isfinite(loss)
    fp32_loss = model(seq, retrieved, return_loss=True)
    assert abs(loss.item() - fp32_loss.item()) / fp32_loss.item() < 0.02
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_no_weight_decay_names_cover_norms_and_null_kv():
    names = tiny().no_weight_decay_parameter_names()
    assert any(n.endswith("null_k") for n in names) and any(n.endswith("gamma") for n in names)
    assert all(not n.endswith("to_qkv.weight") for n in names)


def test_seed_readme_config_builds_with_plausible_parameter_count():
    with torch.device("meta"):
        model = DIABLOGPT(**SEED.model_kwargs())
    count = param_count(model)
    # 12 decoder layers of 4 * 768 * 512 (attention, 512-wide inner) + 8 * 768^2 (feed-forward),
    # 4 CCA layers, a 3-layer 896-wide encoder, and two 30522 x 768 vocabulary matrices: 159.9M
    assert 150e6 < count < 170e6, count


def test_loss_over_slices_equals_the_full_cross_entropy_and_its_gradients():
    seq, retrieved = batch(n=N + 1)
    grads = []
    for loss_chunk in (1000, 7):
        model = tiny().train()
        model.loss_chunk = loss_chunk
        loss = model(seq, retrieved, return_loss=True)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    logits = tiny()(seq[:, :-1], retrieved)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), seq[:, 1:].reshape(-1))
    torch.testing.assert_close(grads[0][0], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1][0], expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
