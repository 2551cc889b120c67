"""Incremental database updates (diablogpt_pytorch.update): add and remove documents without a
rebuild. Real text, the real offline embedder in float32, exact index: the updated database must
equal a full build over the same documents in the same order."""

import os
import shutil

import numpy as np
import pytest
import torch

from diablogpt_pytorch import DIABLOGPT, TrainingWrapper, add_documents, remove_documents
from diablogpt_pytorch import embedder as emb
from diablogpt_pytorch import retrieval, update
from diablogpt_pytorch._io import trusted_meta
from diablogpt_pytorch.corpus import default_corpus_documents
from diablogpt_pytorch.database import MANIFEST_NAME, Database

C, N, K = 16, 64, 2
TINY = dict(max_seq_len=N, enc_dim=32, enc_depth=1, dec_dim=64, dec_depth=2,
            dec_cross_attn_layers=(2,), heads=2, dim_head=16, chunk_size=C)
FILES = ("chunks", "seqs", "doc_ids", "knn", "embeddings", "index")


def _build(folder, db, valid_fraction=0.0, **kwargs):
    torch.manual_seed(0)
    wrapper = TrainingWrapper(
        diablogpt=DIABLOGPT(**TINY), knn=K, chunk_size=C, documents_path=folder, glob="*.txt",
        chunks_memmap_path=db / "train.chunks.dat", seqs_memmap_path=db / "train.seq.dat",
        doc_ids_memmap_path=db / "train.doc_ids.dat", knn_extra_neighbors=8,
        valid_fraction=valid_fraction, embed_dtype="float32", **kwargs)
    return wrapper


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Folders A (12 documents), B (6 others), A+B, A without its 4th document; a database
    of each."""
    root = tmp_path_factory.mktemp("update")
    docs = list(default_corpus_documents().items())[::4][:18]
    texts = {f"a_{i:02d}.txt": t[:1200] for i, (_, t) in enumerate(docs[:12])}
    texts.update({f"b_{i:02d}.txt": t[:1200] for i, (_, t) in enumerate(docs[12:])})
    folders = {"A": [n for n in texts if n.startswith("a_")],
               "B": [n for n in texts if n.startswith("b_")],
               "AB": list(texts),
               "A-3": [n for n in texts if n.startswith("a_") and n != "a_03.txt"]}
    for name, members in folders.items():
        (root / name).mkdir()
        for n in members:
            (root / name / n).write_text(texts[n], encoding="utf-8")
    for name in ("A", "AB", "A-3"):
        _build(root / name, root / f"db_{name}")
    return root


def _copy(corpus, name, tmp_path):
    shutil.copytree(corpus / f"db_{name}", tmp_path / "db")  # copy2 keeps the files' times
    return tmp_path / "db"


def _arrays(folder):
    db = Database.open(folder)
    n = db.num_chunks
    return {"chunks": np.array(retrieval.open_chunks(db.path("chunks"), n, C)),
            "doc_ids": np.fromfile(db.path("doc_ids"), dtype=np.int32),
            "seqs": np.fromfile(db.path("seqs"), dtype=np.int32),
            "knn": np.fromfile(db.path("knn"), dtype=np.int32).reshape(n, K),
            "embeddings": np.load(db.path("embeddings"))}


def _assert_same_neighbours(got, want, embeddings, queries=None):
    """Equal, or where they differ, equally close (a tie or a float-rounding near tie)."""
    queries = embeddings if queries is None else queries
    differ = np.argwhere(got != want)
    for row, slot in differ:
        assert got[row, slot] >= 0 and want[row, slot] >= 0, (row, got[row], want[row])
        score = lambda j: float(queries[row] @ embeddings[j])  # noqa: E731
        assert abs(score(got[row, slot]) - score(want[row, slot])) < 1e-4, (row, got[row],
                                                                            want[row])
    assert len(differ) <= max(2, got.size // 50)


def _assert_same_database(got, want, knn_rows=slice(None)):
    assert np.array_equal(got["chunks"], want["chunks"])
    assert np.array_equal(got["doc_ids"], want["doc_ids"])
    assert np.array_equal(got["seqs"], want["seqs"])
    np.testing.assert_allclose(got["embeddings"], want["embeddings"], atol=2e-5)
    _assert_same_neighbours(got["knn"][knn_rows], want["knn"][knn_rows], want["embeddings"],
                            want["embeddings"][knn_rows])


def _rebuild_neighbours(folder):
    """The library's own build call over the updated files (True: it reused everything)."""
    db = Database.open(folder)
    paths = {name: db.path(name) for name in FILES}
    before = {name: os.stat(p).st_mtime_ns for name, p in paths.items()}
    retrieval.chunks_to_precalculated_knn_(
        K, db.num_chunks, C, paths["chunks"], paths["doc_ids"], num_extra_neighbors=8,
        chunks_to_embeddings_batch_size=128, embedder=db.embedder, dtype="float32",
        seqs_memmap_path=paths["seqs"], num_seqs=db.counts()["seqs"], seq_len=N,
        tokenizer=db.tokenizer())
    return before == {name: os.stat(p).st_mtime_ns for name, p in paths.items()}


def test_add_with_refresh_equals_a_full_rebuild(corpus, tmp_path):
    folder = _copy(corpus, "A", tmp_path)
    got = add_documents(folder, corpus / "B", glob="*.txt", refresh_neighbours=True)
    want = _arrays(corpus / "db_AB")
    assert got["documents_added"] == 6 and got["chunks"] == len(want["chunks"])
    assert got["neighbours_searched"] == got["chunks"]
    _assert_same_database(_arrays(folder), want)
    # the sidecars describe the updated files: a normal build call reuses every file
    assert _rebuild_neighbours(folder)
    db = Database.open(folder)
    assert db.counts() == Database.open(corpus / "db_AB").counts()
    assert db.manifest["updates"][0]["added"] == 6
    retriever = db.retriever()
    assert retriever.num_chunks == retriever.index.ntotal == len(want["chunks"])
    # a new document's chunk retrieves its own text from the database, found by its tokens
    new_chunk = torch.from_numpy(want["chunks"][-3:-2, :C].astype(np.int64))
    ids, _ = retriever.search(new_chunk, 1)
    assert ids.item() == len(want["chunks"]) - 3
    # no temporary file is left behind: every file in the folder is listed
    listed = {e["path"] for s in db.manifest["splits"].values() for e in s["files"].values()}
    assert {p.name for p in folder.iterdir() if not p.name.endswith(".meta.json")
            and p.name != MANIFEST_NAME} == listed


def test_add_without_refresh_searches_the_new_chunks_only(corpus, tmp_path):
    folder = _copy(corpus, "A", tmp_path)
    old = _arrays(folder)
    n_old = len(old["chunks"])
    got = add_documents(folder, sorted((corpus / "B").glob("*.txt")))
    assert got["neighbours_searched"] == got["chunks_added"] == got["chunks"] - n_old
    new, want = _arrays(folder), _arrays(corpus / "db_AB")
    _assert_same_database(new, want, knn_rows=slice(n_old, None))  # new chunks: as the rebuild
    assert np.array_equal(new["knn"][:n_old], old["knn"])           # old ones: kept
    assert _rebuild_neighbours(folder)


def test_remove_equals_a_build_without_the_documents(corpus, tmp_path):
    folder = _copy(corpus, "AB", tmp_path)
    got = remove_documents(folder, sorted((corpus / "B").glob("*.txt")))  # found by their tokens
    assert got["documents_removed"] == 6
    _assert_same_database(_arrays(folder), _arrays(corpus / "db_A"))
    assert _rebuild_neighbours(folder)
    # a document in the middle, by id: later chunks move to other training sequences
    folder = _copy(corpus, "A", tmp_path / "middle")
    remove_documents(folder, [3])
    _assert_same_database(_arrays(folder), _arrays(corpus / "db_A-3"))
    assert Database.open(folder).counts()["docs"] == 11


def test_bad_input_and_duplicates(corpus, tmp_path):
    folder = _copy(corpus, "A", tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ValueError, match="a_02.txt is already in the database.*duplicates='skip'"):
        add_documents(folder, [corpus / "A" / "a_02.txt"])
    got = add_documents(folder, [corpus / "A" / "a_02.txt"], duplicates="skip")
    assert got["documents_added"] == 0 and got["duplicates_skipped"] == 1
    with pytest.raises(ValueError, match="matches no document"):
        remove_documents(folder, [corpus / "B" / "b_00.txt"])
    with pytest.raises(ValueError, match="document id 99 is not in the database"):
        remove_documents(folder, [99])
    with pytest.raises(FileNotFoundError, match="no retrieval database"):
        add_documents(tmp_path / "nowhere", corpus / "B")
    assert before == {p.name: p.read_bytes() for p in folder.iterdir()}  # nothing changed


def test_a_crash_leaves_the_old_database_or_one_detected_as_stale(corpus, tmp_path, monkeypatch):
    folder = _copy(corpus, "A", tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def fail(*args, **kwargs):
        raise RuntimeError("simulated crash")

    # while the new files are computed: the old database is untouched, no temporary file left
    monkeypatch.setattr(update, "_write_index", fail)
    with pytest.raises(RuntimeError, match="simulated crash"):
        add_documents(folder, corpus / "B", glob="*.txt")
    assert before == {p.name: p.read_bytes() for p in folder.iterdir()}
    assert _rebuild_neighbours(folder)
    monkeypatch.undo()

    # while the files are renamed into place: the manifest refuses to open, the caches rebuild
    calls = []
    real = update._install

    def install_then_fail(tmp, final):
        calls.append(final)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        real(tmp, final)

    monkeypatch.setattr(update, "_install", install_then_fail)
    with pytest.raises(RuntimeError, match="simulated crash"):
        add_documents(folder, corpus / "B", glob="*.txt")
    with pytest.raises(ValueError, match="interrupted"):
        Database.open(folder)
    meta, why = trusted_meta(folder / "train.chunks.dat")
    assert meta is None and "replaced after its sidecar" in why
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name]


def test_the_held_out_neighbours_follow_the_update(corpus, tmp_path):
    db_folder = tmp_path / "db"
    wrapper = _build(corpus / "A", db_folder, valid_fraction=0.25)
    add_documents(db_folder, corpus / "B", glob="*.txt")
    db = Database.open(db_folder)
    n_valid = db.counts("valid")["chunks"]
    got = np.fromfile(db.path("knn", "valid"), dtype=np.int32).reshape(n_valid, K)
    assert got.max() >= wrapper.train_stats["chunks"]  # some held-out chunk finds a new one
    # what the library's own query step gives over the updated index, and it reuses our file
    fresh = retrieval.query_chunks_to_knn_(
        K, n_valid, C, db.path("chunks", "valid"), db.path("chunks"), knn_path=tmp_path / "q.dat",
        embedder=db.embedder, tokenizer=db.tokenizer())
    want = np.fromfile(fresh, dtype=np.int32).reshape(n_valid, K)
    chunks = retrieval.open_chunks(db.path("chunks", "valid"), n_valid, C)
    queries = emb.embed_chunks(torch.from_numpy(np.array(chunks[:, :C])), db.embedder,
                               dtype="float32", normalize=True, tokenizer=db.tokenizer())
    _assert_same_neighbours(got, want, np.load(db.path("embeddings")), queries.numpy())
    mtime = db.path("knn", "valid").stat().st_mtime_ns
    retrieval.query_chunks_to_knn_(K, n_valid, C, db.path("chunks", "valid"), db.path("chunks"),
                                   embedder=db.embedder, tokenizer=db.tokenizer())
    assert db.path("knn", "valid").stat().st_mtime_ns == mtime
    # removing the documents again: the held-out neighbours point into the old chunks only
    remove_documents(db_folder, sorted((corpus / "B").glob("*.txt")))
    db = Database.open(db_folder)
    got = np.fromfile(db.path("knn", "valid"), dtype=np.int32)
    assert got.max() < wrapper.train_stats["chunks"]
    assert db.dataset("valid")[0][1].shape[-2] == K


def test_approximate_indexes_take_new_vectors_with_their_training(tmp_path):
    import faiss

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((600, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ivf = faiss.index_factory(16, "IVF8,Flat", faiss.METRIC_INNER_PRODUCT)
    ivf.train(vectors[:400])
    ivf.add(vectors[:400])
    ivf.nprobe = 8  # every list: exact within the index, so the check below is deterministic
    path = tmp_path / "x.index"
    grown = update._index_for(path, ivf, vectors[400:], reset=False)
    assert grown.ntotal == 600
    assert grown.search(vectors[450:452], 1)[1][:, 0].tolist() == [450, 451]
    # removal keeps the trained quantizer and re-adds the kept vectors, renumbered
    kept = np.concatenate([vectors[:100], vectors[300:]])
    shrunk = update._index_for(path, grown, kept, reset=True)
    assert shrunk.ntotal == 400 and grown.ntotal == 600 and shrunk.is_trained
    assert shrunk.search(vectors[300:302], 1)[1][:, 0].tolist() == [100, 101]
    with pytest.raises(ValueError, match="x.index is not trained: rebuild"):
        update._index_for(path, faiss.index_factory(16, "IVF8,Flat"), vectors, reset=False)
    with pytest.raises(ValueError, match="IndexIDMap index .*x.index cannot be added to"):
        update._index_for(path, faiss.IndexIDMap(faiss.IndexFlatIP(16)), vectors, reset=False)


def test_an_ivf_pq_database_is_updated_and_searched_with_rescoring(corpus, tmp_path):
    """A database on a rescored IVF-PQ index: adding documents keeps the factor and points its
    record at the updated embeddings; the neighbours searched through it (all refreshed) are the
    exact full rebuild's for nearly every slot, none from the chunk's own document; the
    database's Retriever rescores too."""
    from diablogpt_pytorch.database import index as idx

    db_dir = tmp_path / "db"
    _build(corpus / "A", db_dir, index="IVF4,PQ32x4np")
    add_documents(db_dir, corpus / "B", glob="*.txt", refresh_neighbours=True)
    db = Database.open(db_dir)
    record = idx.index_record(db.path("index"))
    assert record["factory"] == "IVF4,PQ32x4np" and record["rescore"] >= idx.DEFAULT_RESCORE
    assert record["embedding_files"] == [db.path("embeddings").name]
    got, want = _arrays(db_dir), _arrays(corpus / "db_AB")
    assert np.array_equal(got["doc_ids"], want["doc_ids"])
    assert not (got["doc_ids"][got["knn"]] == got["doc_ids"][:, None]).any()
    e = want["embeddings"]
    close = np.abs(np.einsum("nd,nkd->nk", e, e[got["knn"]]) -
                   np.einsum("nd,nkd->nk", e, e[want["knn"]])) < 1e-4  # equal, or a tie
    assert close.mean() >= 0.9
    retriever = db.retriever()
    assert isinstance(retriever.index, idx.RescoredIndex)
    assert retriever.index.factor == record["rescore"]
    assert retriever.index.ntotal == len(want["chunks"])


@pytest.mark.parametrize("rescore", [0, 3])
def test_training_wrapper_passes_rescore_to_the_index(corpus, tmp_path, rescore):
    """TrainingWrapper(rescore=) reaches the index build: the factor given (0: the plain
    compressed search) is the one recorded and the one the database's Retriever applies."""
    from diablogpt_pytorch.database import index as idx

    db_dir = tmp_path / "db"
    _build(corpus / "A", db_dir, index="IVF4,PQ32x4np", rescore=rescore)
    db = Database.open(db_dir)
    assert idx.index_record(db.path("index"))["rescore"] == rescore
    retriever = db.retriever()
    if rescore:
        assert isinstance(retriever.index, idx.RescoredIndex) and retriever.index.factor == rescore
    else:
        assert not isinstance(retriever.index, idx.RescoredIndex)
