"""The retrieval database built by 2 ranks (gloo, CPU) equals the single-process build.

A small real-text corpus (Python's pydoc topics) is chunked once; the single-process
``chunks_to_precalculated_knn_`` and the 2-rank ``sharded_chunks_to_precalculated_knn_`` then run
on copies of the same chunk files with the real offline embedder, both excluding the documents of
each chunk's training sequence. Batch sizes are small so that both ranks hold several batches,
and differ so that the ranks' search ranges differ from their embedding ranges. This file is also
the per-rank script (``__main__`` below).
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diablogpt_pytorch import retrieval
from diablogpt_pytorch._io import read_meta

C, K = 32, 2
SEQ_LEN = 4 * C
EMBED_BATCH, KNN_BATCH = 8, 12
FILES = ("db.chunks.dat", "db.doc_ids.dat", "db.seq.dat")


def build_args(out: Path, stats: dict) -> dict:
    return dict(num_nearest_neighbors=K, num_chunks=stats["chunks"], chunk_size=C,
                chunk_memmap_path=out / "db.chunks.dat", doc_ids_memmap_path=out / "db.doc_ids.dat",
                num_extra_neighbors=1, chunks_to_embeddings_batch_size=EMBED_BATCH,
                knn_batch_size=KNN_BATCH, seqs_memmap_path=out / "db.seq.dat",
                num_seqs=stats["seqs"], seq_len=SEQ_LEN)


@pytest.fixture
def one_thread():
    """The ranks run 1 thread each; so does the reference: bf16 matmuls (the embedder's default
    precision where the CPU has native bf16) round differently with other thread counts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_two_rank_sharded_build_equals_single_process_build(tmp_path, one_thread):
    from pydoc_data.topics import topics

    from test_distributed import assert_ok, finish, launch

    docs = tmp_path / "docs"
    docs.mkdir()
    for i, name in enumerate(sorted(topics)[:8]):
        (docs / f"{i:02d}.txt").write_text(topics[name][:800])
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    stats = retrieval.text_folder_to_chunks_(
        docs, "*.txt", single / FILES[0], single / FILES[2], single / FILES[1], chunk_size=C,
        seq_len=SEQ_LEN)
    n = stats["chunks"]
    assert n > 4 * EMBED_BATCH  # both ranks get several batches
    sharded.mkdir()
    for name in FILES:
        shutil.copy2(single / name, sharded / name)
        shutil.copy2(single / f"{name}.meta.json", sharded / f"{name}.meta.json")

    knn_path, _ = retrieval.chunks_to_precalculated_knn_(**build_args(single, stats))
    (sharded / "stats.json").write_text(json.dumps(stats))
    assert_ok(finish(launch("sharded_build", sharded, script=__file__), timeout=240))

    # the same bytes: embeddings (shards in rank order) and neighbours
    shards = sorted((sharded / "db.chunks.emb.shards").glob("emb-*-of-00002.npy"))
    assert len(shards) == 2
    ranges = [read_meta(p)["inputs"] for p in shards]
    assert (ranges[0]["start"], ranges[0]["stop"], ranges[1]["stop"]) == (0, ranges[1]["start"], n)
    assert ranges[1]["start"] % EMBED_BATCH == 0 and 0 < ranges[1]["start"] < n
    together = np.concatenate([np.load(p) for p in shards])
    np.testing.assert_array_equal(together, np.load(single / "db.chunks.emb.npy"))
    got = (sharded / "db.chunks.knn.dat").read_bytes()
    assert got == knn_path.read_bytes()
    knn = np.frombuffer(got, dtype=np.int32).reshape(n, K)
    doc_ids = np.fromfile(single / "db.doc_ids.dat", dtype=np.int32)
    assert (knn >= 0).all() and (doc_ids[knn] != doc_ids[:, None]).all()
    # the sequence exclusion applied: no neighbour from a document of the chunk's sequence, and
    # it mattered (sequences hold several documents)
    seqs = np.fromfile(single / "db.seq.dat", dtype=np.int32)
    seq_docs = retrieval.sequence_documents(seqs, doc_ids, SEQ_LEN // C)
    assert (seq_docs >= 0).sum(axis=1).max() > 1
    assert not (doc_ids[knn][:, :, None] == seq_docs[:, None, :]).any()
    # the sidecars record the same inputs (the index fingerprints aside: different files)
    single_meta, sharded_meta = (read_meta(d / "db.chunks.knn.dat")["inputs"]
                                 for d in (single, sharded))
    assert single_meta.pop("index") != sharded_meta.pop("index")
    assert single_meta == sharded_meta and single_meta["sequences"]["seq_len"] == SEQ_LEN
    # no part files left; the knn sidecar records the build
    assert not (sharded / "db.chunks.knn.parts").exists()
    assert read_meta(sharded / "db.chunks.knn.dat")["stats"]["world_size"] == 2

    # the sharded index serves generation-time retrieval like the single-process one
    queries = torch.from_numpy(np.fromfile(single / "db.chunks.dat", dtype=np.int32)
                               .reshape(n, C + 1)[:6, :C].copy())
    expect = retrieval.Retriever(single / FILES[0], single / FILES[1]).search(queries, K)[0]
    found = retrieval.Retriever(sharded / FILES[0], sharded / FILES[1]).search(queries, K)[0]
    assert torch.equal(found, expect)

    # one process reuses the 2-rank build while it is current (nothing rewritten); rebuilt, the
    # shards of 2 ranks are replaced by one shard and the knn file comes out the same
    from diablogpt_pytorch.sharded import reusable_knn, sharded_chunks_to_precalculated_knn_

    before = {p: p.stat().st_mtime_ns for p in sharded.rglob("*")}
    assert reusable_knn(**build_args(sharded, stats)) is not None
    path, _ = sharded_chunks_to_precalculated_knn_(**build_args(sharded, stats))
    assert {p: p.stat().st_mtime_ns for p in sharded.rglob("*")} == before
    path, _ = sharded_chunks_to_precalculated_knn_(**build_args(sharded, stats),
                                                   force_reprocess=True)
    assert path.read_bytes() == knn_path.read_bytes()
    assert [p.name for p in sorted((sharded / "db.chunks.emb.shards").glob("*.npy"))] == [
        "emb-00000-of-00001.npy"]
    # and the single-process build is reusable as it is, by ranks too; not once its chunks change
    assert reusable_knn(**build_args(single, stats)) is not None
    assert reusable_knn(**build_args(single, {**stats, "chunks": n - 1})) is None
    assert reusable_knn(**{**build_args(single, stats), "num_extra_neighbors": 2}) is None


@pytest.mark.autofaiss
def test_autofaiss_index_reads_the_shard_folder_in_rank_order(tmp_path):
    """The approximate path: autofaiss builds from the folder of shards; ids follow rank order,
    and shards of another number of ranks are removed from the folder first."""
    import faiss

    from diablogpt_pytorch.sharded import _build_index_from_shards, _remove_other_layouts

    folder = tmp_path / "db.chunks.emb.shards"
    folder.mkdir()
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((600, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    shards = [folder / "emb-00000-of-00002.npy", folder / "emb-00001-of-00002.npy"]
    np.save(shards[0], vectors[:350])
    np.save(shards[1], vectors[350:])
    np.save(folder / "emb-00000-of-00003.npy", vectors[:10])  # stale: another layout
    _remove_other_layouts(folder, 2, "emb", ".npy")
    assert sorted(p.name for p in folder.iterdir()) == [p.name for p in shards]
    _build_index_from_shards(shards, folder, tmp_path / "db.index", 600, 16, index="autofaiss",
                             max_index_memory_usage="10k", current_memory_available="1G")
    index = faiss.read_index(str(tmp_path / "db.index"))
    assert index.ntotal == 600
    _, ids = index.search(vectors[[0, 349, 350, 599]], 1)
    assert ids[:, 0].tolist() == [0, 349, 350, 599]


if __name__ == "__main__":
    from diablogpt_pytorch import distributed as D
    from diablogpt_pytorch.sharded import sharded_chunks_to_precalculated_knn_

    out = Path(sys.argv[2])
    torch.set_num_threads(1)
    D.init_distributed(device="cpu")
    stats = json.loads((out / "stats.json").read_text())
    sharded_chunks_to_precalculated_knn_(**build_args(out, stats))
    D.cleanup()
