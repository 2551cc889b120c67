"""Generation: cached decoding is exact, retrieval happens when a chunk
completes, lengths, per-row EOS, filters. Model-level tests use a deterministic table retriever
(neighbours are a fixed function of the chunk's tokens); the end-to-end test uses the real
faiss-backed Retriever on a small real-text database."""


import numpy as np
import pytest
import torch

from diablogpt_pytorch.generation import generate, sample_next, top_k, top_p
from diablogpt_pytorch.model import DIABLOGPT

C, K, V = 8, 2, 61


def tiny(max_seq_len=48, **overrides) -> DIABLOGPT:
    torch.manual_seed(0)
    config = dict(num_tokens=V, max_seq_len=max_seq_len, enc_dim=32, enc_depth=2, dec_dim=48,
                  dec_depth=3, dec_cross_attn_layers=(2, 3), heads=2, dim_head=16, chunk_size=C)
    config.update(overrides)
    # every residual branch random (not the zero default): structural tests need every path live
    config.setdefault("zero_init_residual", False)
    return DIABLOGPT(**config).eval()


class TableRetriever:
    """Neighbours as a deterministic function of the chunk's tokens; records every call."""

    def __init__(self):
        self.calls = []

    def retrieve(self, chunks, k, exclude_doc_ids=None):
        self.calls.append(chunks.clone())
        out = []
        for row in chunks.reshape(-1, chunks.shape[-1]):
            g = torch.Generator().manual_seed(int(sum((i + 1) * int(t) for i, t in enumerate(row))))
            neighbours = torch.randint(1, V, (k, 2 * chunks.shape[-1]), generator=g)
            neighbours[1, -3:] = 0  # some padding, as at document ends
            out.append(neighbours)
        return torch.stack(out).reshape(*chunks.shape[:-1], k, 2 * chunks.shape[-1])


def neighbours_for(retriever, seq):
    """(b, n // C, K, 2C) neighbours of every complete chunk of seq (b, n)."""
    b, n = seq.shape
    chunks = seq[:, : (n // C) * C].reshape(b, n // C, C)
    return retriever.retrieve(chunks, K)


def test_cached_logits_equal_full_forward_at_every_step():
    model = tiny()
    retriever = TableRetriever()
    seq = torch.randint(1, V, (2, 47))
    retrieved = neighbours_for(retriever, seq)
    full = model(seq, retrieved)
    cache = model.init_cache(2)
    steps = []
    for p in range(seq.shape[1]):
        completes = (p + 1) % C == 0
        steps.append(model.decode(seq[:, p:p + 1], cache, retrieved[:, p // C:p // C + 1] if completes else None))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


def test_prefill_of_any_length_then_steps_equal_full_forward():
    model = tiny()
    retriever = TableRetriever()
    seq = torch.randint(1, V, (1, 40))
    retrieved = neighbours_for(retriever, seq)
    full = model(seq, retrieved)
    for split in (1, C - 1, C, 13, 2 * C + 5):
        cache = model.init_cache(1)
        first = model.decode(seq[:, :split], cache, retrieved[:, : split // C])
        rest = model.decode(seq[:, split:], cache, retrieved[:, split // C: 40 // C])
        torch.testing.assert_close(torch.cat((first, rest), dim=1), full, rtol=1e-4, atol=1e-4)


def test_decode_refuses_missing_or_extra_neighbours():
    model = tiny()
    cache = model.init_cache(1)
    with pytest.raises(ValueError, match="needed"):
        model.decode(torch.randint(1, V, (1, C)), cache, None)
    cache = model.init_cache(1)
    with pytest.raises(ValueError, match="no chunk completes"):
        model.decode(torch.randint(1, V, (1, 3)), cache, torch.zeros(1, 1, K, 2 * C, dtype=torch.long))


def naive_greedy(model, retriever, prompt, steps):
    """The reference's algorithm: a full forward over the whole sequence for every new token."""
    seq = prompt
    for _ in range(steps):
        retrieved = neighbours_for(retriever, seq) if seq.shape[1] >= C else None
        logits = model(seq, retrieved)[:, -1]
        seq = torch.cat((seq, logits.argmax(-1, keepdim=True)), dim=1)
    return seq


@pytest.mark.parametrize("prompt_len", [1, 5, C, 2 * C + 3])
def test_greedy_output_is_identical_to_the_naive_full_recompute_loop(prompt_len):
    model = tiny(max_seq_len=32)
    prompt = torch.randint(1, V, (2, prompt_len))
    out = generate(model, TableRetriever(), prompt, temperature=0.0, num_neighbors=K)
    expected = naive_greedy(model, TableRetriever(), prompt, model.max_seq_len - prompt_len)
    assert torch.equal(out, expected)


def test_retrieval_happens_exactly_when_a_chunk_completes():
    model = tiny(max_seq_len=45)
    retriever = TableRetriever()
    seen = []
    prompt = torch.randint(1, V, (1, 11))
    out = generate(model, retriever, prompt, temperature=0.0, num_neighbors=K,
                   on_retrieve=lambda u, chunk, nb: seen.append((u, chunk.clone())))
    assert out.shape[1] == 45
    # positions 0..43 are fed to the model (the last sampled token is not): chunks 0..4 complete
    assert [u for u, _ in seen] == [0, 1, 2, 3, 4]
    for u, chunk in seen:
        assert torch.equal(chunk, out[:, u * C:(u + 1) * C])
    # the prompt's one complete chunk is retrieved in one batch, then one call per chunk
    assert [c.shape for c in retriever.calls] == [(1, 1, C)] + [(1, 1, C)] * 4


def test_without_retrieval_matches_the_model_without_neighbours():
    model = tiny()
    prompt = torch.randint(1, V, (1, 3))
    out = generate(model, None, prompt, temperature=0.0, use_retrieval=False, max_new_tokens=20)
    seq = prompt
    for _ in range(20):
        seq = torch.cat((seq, model(seq)[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(out, seq)


def test_lengths_never_exceed_max_seq_len_and_respect_max_new_tokens():
    model = tiny(max_seq_len=32)
    prompt = torch.randint(1, V, (3, 6))
    assert generate(model, TableRetriever(), prompt, num_neighbors=K).shape == (3, 32)
    assert generate(model, TableRetriever(), prompt, num_neighbors=K, max_new_tokens=5).shape == (3, 11)
    unconditional = generate(model, TableRetriever(), None, eos_id=1, batch_size=2, num_neighbors=K)
    assert unconditional.shape[0] == 2 and 2 <= unconditional.shape[1] <= 32
    assert (unconditional[:, 0] == 1).all()  # starts from the document separator
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, TableRetriever(), torch.randint(1, V, (1, 32)))


def test_zero_new_tokens_and_neighbours_only_for_the_chunks_fed():
    """Issue 19 item 6: max_new_tokens=0 returns the prompt; a chunk that completes exactly at the
    length limit is never fed, so `retrieved` need not hold its neighbours."""
    model = tiny(max_seq_len=32)
    prompt = torch.randint(1, V, (2, 5), generator=torch.Generator().manual_seed(4))
    assert torch.equal(generate(model, None, prompt, max_new_tokens=0), prompt)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, None, prompt, max_new_tokens=-1)
    full = generate(model, TableRetriever(), prompt, temperature=0.0, num_neighbors=K,
                    max_new_tokens=2 * C + 3)  # ends at 24 = 3C: chunk 2 completes at the limit
    assert full.shape == (2, 3 * C)
    fed = neighbours_for(TableRetriever(), full)[:, :2]  # chunks 0 and 1 only
    out = generate(model, None, prompt, fed, temperature=0.0, num_neighbors=K,
                   max_new_tokens=2 * C + 3)
    assert torch.equal(out, full)
    with pytest.raises(ValueError, match="every chunk fed"):  # one chunk short
        generate(model, None, prompt, fed[:, :1], temperature=0.0, max_new_tokens=2 * C + 3)


def test_each_row_stops_at_its_own_eos_and_is_padded_after_it():
    model = tiny()
    prompt = torch.randint(1, V, (2, 4), generator=torch.Generator().manual_seed(3))
    free = generate(model, TableRetriever(), prompt, temperature=0.0, num_neighbors=K)
    new0, new1 = free[0, 4:].tolist(), free[1, 4:].tolist()
    # an eos token that row 0 emits before row 1 does (or row 1 never does)
    candidates = [t for t in new0 if t not in new1[: new0.index(t) + 1]]
    if not candidates:
        pytest.skip("random model emitted no suitable token")
    eos = candidates[0]
    stop0 = 4 + new0.index(eos)
    out = generate(model, TableRetriever(), prompt, temperature=0.0, num_neighbors=K, eos_id=eos)
    assert out[0, stop0] == eos and (out[0, stop0 + 1:] == model.pad_id).all()
    assert torch.equal(out[0, :stop0 + 1], free[0, :stop0 + 1])
    row1_stop = new1.index(eos) + 4 if eos in new1 else None
    limit = out.shape[1] if row1_stop is None else row1_stop + 1
    assert torch.equal(out[1, :limit], free[1, :limit])  # row 1 continues unaffected
    if row1_stop is None:
        assert out.shape[1] == model.max_seq_len


def test_top_p_keeps_the_smallest_set_reaching_the_threshold():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda thres: torch.isfinite(top_p(logits, thres))[0].tolist()
    assert kept(0.9) == [True, True, True, False]
    assert kept(0.8) == [True, True, False, False]
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.01) == [True, False, False, False]
    shuffled = logits[:, [2, 0, 3, 1]]
    assert torch.isfinite(top_p(shuffled, 0.9))[0].tolist() == [True, True, False, True]


def test_top_k_keeps_the_top_fraction():
    logits = torch.arange(20.0)[None]
    assert torch.isfinite(top_k(logits, 0.9)).sum() == 2  # ceil(0.1 * 20)
    assert torch.isfinite(top_k(logits, 0.0)).sum() == 20
    assert torch.isfinite(top_k(logits, k=3))[0, -3:].all()


def test_sampling_respects_the_filter_and_greedy_at_temperature_zero():
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    samples = sample_next(logits, 1.0, top_p, 0.9, generator=g)
    assert set(samples.tolist()) <= {1, 2} and len(set(samples.tolist())) == 2
    assert (sample_next(logits, 0.0) == 1).all()
    samples = sample_next(logits, 1.0, top_k, 0.75, generator=g)  # k = 1
    assert (samples == 1).all()


def test_sampling_with_a_generator_on_another_device():
    """Issue 19 item 3: a CPU generator with logits on CUDA made torch.multinomial refuse. The
    meta device stands in for CUDA: the uniforms come from the CPU generator, the sample stays on
    the logits' device."""
    g = torch.Generator().manual_seed(0)
    samples = sample_next(torch.zeros(3, 50, device="meta"), 1.0, top_k, 0.9, generator=g)
    assert samples.shape == (3,) and samples.device.type == "meta"
    assert g.get_state().ne(torch.Generator().manual_seed(0).get_state()).any()  # it drew from g
    # the inverse-CDF draw it uses follows the distribution and never picks a zero-probability token
    from diablogpt_pytorch.generation import inverse_cdf_sample

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]]).repeat(20000, 1)
    uniform = torch.rand(20000, generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(inverse_cdf_sample(probs, uniform), minlength=6) / 20000
    torch.testing.assert_close(counts, probs[0], atol=0.015, rtol=0)
    edge = inverse_cdf_sample(probs[:3], torch.tensor([0.0, 0.5, 1.0 - 2 ** -24]))
    assert edge.tolist() == [1, 3, 4]
    assert inverse_cdf_sample(probs[:1], torch.tensor([1.0])).tolist() == [4]  # rounding at the top


RAGGED = [3, C, 2 * C + 5, 1, C + 1]  # lengths off and on chunk boundaries, one of 1 token


def ragged_prompts(lengths=RAGGED, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, V, (n,), generator=g) for n in lengths]


def assert_rows_equal_alone(batched, alone, pad_id):
    """Row i of the batched output is generation i alone, padded after its end."""
    assert batched.shape == (len(alone), max(a.shape[1] for a in alone))
    for i, a in enumerate(alone):
        assert torch.equal(batched[i, : a.shape[1]], a[0]), f"row {i}"
        assert (batched[i, a.shape[1]:] == pad_id).all(), f"row {i} padding"


@pytest.mark.parametrize("use_retrieval", [True, False])
@pytest.mark.parametrize("max_new_tokens", [None, 2 * C - 1])
def test_ragged_batch_equals_one_prompt_at_a_time_greedy(use_retrieval, max_new_tokens):
    """Issue 19 item 9: prompts of different lengths in one call; each row (retrieving at its own
    chunk boundaries, through the KV cache) is exactly what generating it alone gives."""
    model = tiny(max_seq_len=40)
    prompts = ragged_prompts()
    prompts[1][3] = 1  # an eos inside a prompt does not stop the row
    kw = dict(temperature=0.0, num_neighbors=K, eos_id=1, use_retrieval=use_retrieval,
              max_new_tokens=max_new_tokens)
    seen = {}
    batched = generate(model, TableRetriever(), prompts,
                       on_retrieve=lambda u, chunk, nb: seen.__setitem__(u, (chunk.clone(), nb.clone())), **kw)
    alone = []
    for i, p in enumerate(prompts):
        mine = {}
        alone.append(generate(model, TableRetriever(), p, **kw,
                              on_retrieve=lambda u, chunk, nb: mine.__setitem__(u, (chunk, nb))))
        assert alone[-1].shape[1] > len(p)  # it generated past its prompt (and its eos)
        if max_new_tokens is not None:
            assert alone[-1].shape[1] <= len(p) + max_new_tokens
        # the batch retrieved this row's chunks with this row's tokens, as alone
        for u, (chunk, nb) in mine.items():
            assert torch.equal(seen[u][0][i], chunk[0]) and torch.equal(seen[u][1][i], nb[0])
    assert_rows_equal_alone(batched, alone, model.pad_id)
    assert bool(seen) == use_retrieval


def test_ragged_batch_equals_the_full_recompute_loop_per_row():
    """No eos, up to max_seq_len: every row equals the uncached full-forward loop on its prompt."""
    model = tiny(max_seq_len=32)
    prompts = ragged_prompts([5, 2 * C + 3, C])
    out = generate(model, TableRetriever(), prompts, temperature=0.0, num_neighbors=K)
    assert out.shape == (3, 32)
    for i, p in enumerate(prompts):
        expected = naive_greedy(model, TableRetriever(), p[None], model.max_seq_len - len(p))
        assert torch.equal(out[i:i + 1], expected)


def test_ragged_batch_with_given_neighbours_and_no_retriever():
    """`retrieved` (b, n, K, 2C) holds every row's chunks 0..n-1: the batch uses row i's own."""
    model = tiny(max_seq_len=32)
    prompts = ragged_prompts([2 * C + 1, 4, C])
    kw = dict(temperature=0.0, num_neighbors=K, max_new_tokens=C + 2)
    alone = [generate(model, TableRetriever(), p, **kw) for p in prompts]
    n = max((a.shape[1] - 1) // C for a in alone)  # every chunk fed in the batch
    retrieved = torch.zeros(3, n, K, 2 * C, dtype=torch.long)
    for i, a in enumerate(alone):
        own = neighbours_for(TableRetriever(), a)[0]
        retrieved[i, : len(own)] = own[:n]
    batched = generate(model, None, prompts, retrieved, **kw)
    assert_rows_equal_alone(batched, alone, model.pad_id)
    with pytest.raises(ValueError, match="n >= 2"):  # fewer than the longest prompt's 2 chunks
        generate(model, TableRetriever(), prompts, retrieved[:, :1], **kw)


@pytest.mark.parametrize("use_retrieval", [True, False])
def test_ragged_batch_with_a_generator_per_row_equals_sampling_each_alone(use_retrieval):
    """With one seeded generator per row, a row draws only when it samples (not while the batch
    feeds it its prompt), so seeded sampling is exact too."""
    model = tiny(max_seq_len=40)
    prompts = ragged_prompts()
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(len(prompts))]
    kw = dict(temperature=1.0, filter_fn=top_k, filter_thres=0.5, num_neighbors=K,
              use_retrieval=use_retrieval, max_new_tokens=20)
    batched = generate(model, TableRetriever(), prompts, generator=gens(), **kw)
    alone = [generate(model, TableRetriever(), p, generator=[g], **kw) for p, g in zip(prompts, gens())]
    assert_rows_equal_alone(batched, alone, model.pad_id)
    other = generate(model, TableRetriever(), prompts,
                     generator=[torch.Generator().manual_seed(7 + i) for i in range(5)], **kw)
    assert not torch.equal(other, batched)  # the seeds matter: it does sample
    with pytest.raises(ValueError, match="one per row"):
        generate(model, TableRetriever(), prompts, generator=gens()[:2], **kw)


def test_list_of_equal_prompts_equals_the_tensor_call():
    model = tiny(max_seq_len=32)
    prompt = torch.randint(1, V, (3, 6), generator=torch.Generator().manual_seed(2))
    kw = dict(temperature=0.0, num_neighbors=K, max_new_tokens=12)
    expected = generate(model, TableRetriever(), prompt, **kw)
    assert torch.equal(generate(model, TableRetriever(), list(prompt), **kw), expected)
    assert torch.equal(generate(model, TableRetriever(), prompt.tolist(), **kw), expected)
    assert torch.equal(generate(model, TableRetriever(), prompt[0].tolist(), **kw), expected[:1])
    ragged = [[5, 6, 7], [8]]
    assert torch.equal(generate(model, None, ragged, max_new_tokens=0),
                       torch.tensor([[5, 6, 7], [8, model.pad_id, model.pad_id]]))


def test_ragged_prompts_bad_input_is_refused_clearly():
    model = tiny(max_seq_len=32)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, TableRetriever(), [[3, 4], [], [5]])
    with pytest.raises(ValueError, match="prompt 2 has 32 tokens; max_seq_len=32"):
        generate(model, TableRetriever(), [[3], [4, 5], list(range(1, 33))])
    with pytest.raises(ValueError, match="empty list"):
        generate(model, TableRetriever(), [])
    with pytest.raises(ValueError, match="mixes"):
        generate(model, TableRetriever(), [[3, 4], 5])
    with pytest.raises(ValueError, match="flat sequence"):
        generate(model, TableRetriever(), [[3, 4], [[5, 6]]])


# -- end to end with the real faiss Retriever ---------------------------------------------------------


@pytest.fixture(scope="module")
def small_database(tmp_path_factory):
    """A real database over eight pydoc topics, built with the offline embedder."""
    import numpy as np
    import pydoc_data.topics

    from diablogpt_pytorch.retrieval import chunks_to_precalculated_knn_, text_folder_to_chunks_

    root = tmp_path_factory.mktemp("db")
    docs = root / "docs"
    docs.mkdir()
    for name in sorted(pydoc_data.topics.topics)[:8]:
        (docs / f"{name}.txt").write_text(pydoc_data.topics.topics[name][:1500])
    paths = {name: root / f"train.{name}.dat" for name in ("chunks", "seq", "doc_ids")}
    stats = text_folder_to_chunks_(docs, "*.txt", paths["chunks"], paths["seq"], paths["doc_ids"],
                                   chunk_size=C, seq_len=48)
    knn_path, _ = chunks_to_precalculated_knn_(K, stats["chunks"], C, paths["chunks"], paths["doc_ids"])
    chunks = np.memmap(paths["chunks"], dtype=np.int32, mode="r", shape=(stats["chunks"], C + 1))
    doc_ids = np.memmap(paths["doc_ids"], dtype=np.int32, mode="r", shape=(stats["chunks"],))
    knn = np.memmap(knn_path, dtype=np.int32, mode="r", shape=(stats["chunks"], K))
    return paths, chunks, doc_ids, knn


def test_generation_retrieves_exactly_as_training_neighbours_were_made(small_database):
    """Prompting with a database document's chunks (its own document excluded) retrieves, for each
    completed chunk, the same neighbour tokens the training data holds for that chunk."""
    from diablogpt_pytorch.neighbours import neighbour_tokens
    from diablogpt_pytorch.retrieval import Retriever

    paths, chunks, doc_ids, knn = small_database
    retriever = Retriever(paths["chunks"], paths["doc_ids"])
    doc = int(doc_ids[0])
    length = int((np.asarray(doc_ids) == doc).sum())
    prompt = torch.from_numpy(np.asarray(chunks[: min(length, 3), :C], dtype=np.int64).reshape(1, -1))
    seen = {}
    model = tiny(num_tokens=30522, max_seq_len=prompt.shape[1] + 1)
    generate(model, retriever, prompt, temperature=0.0, num_neighbors=K, exclude_doc_ids=[doc],
             on_retrieve=lambda u, chunk, nb: seen.__setitem__(u, nb[0]))
    assert sorted(seen) == list(range(prompt.shape[1] // C))
    for u, neighbours in seen.items():
        expected = neighbour_tokens(chunks, np.asarray(knn[u])[None], doc_ids=doc_ids, pad_id=0)[0]
        assert torch.equal(neighbours, torch.from_numpy(expected))


def test_ragged_prompts_with_the_real_retriever_equal_each_alone(small_database):
    """Database documents' chunks as prompts of different lengths, each row excluding its own
    document: the batch retrieves per row what each prompt alone retrieves, and generates it."""
    from diablogpt_pytorch.retrieval import Retriever

    paths, chunks, doc_ids, knn = small_database
    retriever = Retriever(paths["chunks"], paths["doc_ids"])
    ids = np.asarray(chunks[:, :C], dtype=np.int64).reshape(-1)
    starts = [0, 3 * C + 2, 7 * C + 1]
    prompts = [torch.from_numpy(ids[s:s + n]) for s, n in zip(starts, (2 * C + 3, 5, C))]
    exclude = [[int(doc_ids[s // C])] for s in starts]
    model = tiny(num_tokens=30522, max_seq_len=4 * C)
    kw = dict(temperature=0.0, num_neighbors=K)
    seen = {}
    out = generate(model, retriever, prompts, exclude_doc_ids=exclude, **kw,
                   on_retrieve=lambda u, chunk, nb: seen.__setitem__(u, nb.clone()))
    for i, prompt in enumerate(prompts):
        mine = {}
        alone = generate(model, retriever, prompt, exclude_doc_ids=exclude[i:i + 1], **kw,
                         on_retrieve=lambda u, chunk, nb: mine.__setitem__(u, nb[0]))
        assert torch.equal(out[i:i + 1], alone)
        assert sorted(mine) == list(range(3)) and all(torch.equal(seen[u][i], mine[u]) for u in mine)


def test_generation_needs_only_a_checkpoint_the_index_and_the_chunks(small_database, tmp_path):
    from diablogpt_pytorch.checkpoint import load_model, save_checkpoint
    from diablogpt_pytorch.generation import ids_to_text
    from diablogpt_pytorch.retrieval import Retriever

    paths, *_ = small_database
    model = tiny(num_tokens=30522)
    save_checkpoint(tmp_path / "model.pt", model)
    loaded = load_model(tmp_path / "model.pt")
    retriever = Retriever(paths["chunks"], paths["doc_ids"])  # files on disk only
    from diablogpt_pytorch.embedder import get_tokenizer

    ids = get_tokenizer()("the list is a mutable sequence of items", add_special_tokens=False).input_ids
    prompt = torch.tensor([ids])
    assert prompt.shape[1] >= C  # at least one complete chunk in the prompt
    a = generate(model, retriever, prompt, temperature=0.0, num_neighbors=K)
    b = generate(loaded, retriever, prompt, temperature=0.0, num_neighbors=K)
    assert torch.equal(a, b) and a.shape[1] == model.max_seq_len
    text = ids_to_text(a[0])
    assert text.startswith("the list is a mutable sequence of items")
