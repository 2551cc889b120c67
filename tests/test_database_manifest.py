"""The database manifest: a model folder plus a database folder is all generation needs."""

import json
import shutil

import pytest
import torch

from diablogpt_pytorch import DIABLOGPT, TrainingWrapper
from diablogpt_pytorch.corpus import default_corpus_documents
from diablogpt_pytorch.database import MANIFEST_NAME, Database
from diablogpt_pytorch.generation import generate

C, N, K = 16, 64, 2
TINY = dict(max_seq_len=N, enc_dim=32, enc_depth=1, dec_dim=64, dec_depth=2,
            dec_cross_attn_layers=(2,), heads=2, dim_head=16, chunk_size=C)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest")
    (root / "docs").mkdir()
    for i, (name, text) in enumerate(default_corpus_documents().items()):
        if i % 10 == 0:
            (root / "docs" / name).write_text(text[:2000], encoding="utf-8")
    torch.manual_seed(0)
    model = DIABLOGPT(**TINY)
    wrapper = TrainingWrapper(
        diablogpt=model, knn=K, chunk_size=C, documents_path=root / "docs", glob="*.txt",
        chunks_memmap_path=root / "db" / "train.chunks.dat",
        seqs_memmap_path=root / "db" / "train.seq.dat",
        doc_ids_memmap_path=root / "db" / "train.doc_ids.dat",
        knn_extra_neighbors=8, valid_fraction=0.2)
    return root, model.eval(), wrapper


def test_the_manifest_lists_every_file_and_the_counts(built):
    root, model, wrapper = built
    manifest = json.loads((root / "db" / MANIFEST_NAME).read_text())
    assert manifest["embedder"] == wrapper.embedder and manifest["knn"] == K
    assert (manifest["chunk_size"], manifest["seq_len"]) == (C, N)
    train = manifest["splits"]["train"]
    assert train["counts"] == {k: wrapper.train_stats[k] for k in ("chunks", "docs", "seqs")}
    assert manifest["splits"]["valid"]["counts"]["docs"] == len(wrapper.valid_documents)
    assert {name: entry["path"] for name, entry in train["files"].items()} == {
        "chunks": "train.chunks.dat", "seqs": "train.seq.dat", "doc_ids": "train.doc_ids.dat",
        "knn": "train.chunks.knn.dat", "embeddings": "train.chunks.emb.npy",
        "index": "train.chunks.index"}
    for entry in train["files"].values():
        assert entry["what"] and entry["build"]
    # the index's provenance: what was built and how well it searches
    assert train["files"]["index"]["faiss"] == {"factory": "Flat", "search_params": {}, "rescore": 0,
                                                "recall_at_2": 1.0, "recall_queries": 0}
    # every file the database folder holds is listed (sidecars and the manifest aside)
    listed = {e["path"] for s in manifest["splits"].values() for e in s["files"].values()}
    on_disk = {p.name for p in (root / "db").iterdir()
               if not p.name.endswith(".meta.json") and p.name != MANIFEST_NAME}
    assert on_disk == listed


def test_a_model_folder_and_a_moved_database_folder_generate_as_the_wrapper(built, tmp_path):
    root, model, wrapper = built
    model.save_pretrained(tmp_path / "model")
    shutil.copytree(root / "db", tmp_path / "moved_db")  # the folder travels as a whole

    db = Database.open(tmp_path / "moved_db")
    loaded = DIABLOGPT.from_pretrained(tmp_path / "model")
    db.check_model(loaded)
    prompt = wrapper.valid_ds[0][0][None, : 2 * C]
    expected = wrapper.generate(prompt, temperature=0.0, max_new_tokens=24)
    got = generate(loaded, db.retriever(), prompt, temperature=0.0, max_new_tokens=24,
                   **db.generation_kwargs())
    assert torch.equal(got, expected)


def test_clear_errors(built, tmp_path):
    root, model, wrapper = built
    with pytest.raises(FileNotFoundError, match="no retrieval database.*build-db"):
        Database.open(tmp_path)
    shutil.copytree(root / "db", tmp_path / "db")
    db = Database.open(tmp_path / "db")
    with pytest.raises(ValueError, match="chunk_size 8 != the database's 16"):
        db.check_model(DIABLOGPT(**dict(TINY, chunk_size=8)))
    (tmp_path / "db" / "train.chunks.index").unlink()
    with pytest.raises(FileNotFoundError, match="train.chunks.index.*missing: rebuild"):
        Database.open(tmp_path / "db")
