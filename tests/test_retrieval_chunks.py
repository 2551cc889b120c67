"""text_folder_to_chunks_: file format, caches and bad input.

Only the tokenizer is loaded here (no BERT forward), so these run in a few seconds.
"""

import logging
import os

import numpy as np
import pytest

from diablogpt_pytorch import embedder as emb
from diablogpt_pytorch import retrieval
from diablogpt_pytorch._io import read_meta

C = 8
SEQ_LEN = 32  # 4 chunks per sequence

DOCS = {
    "a.txt": "The quick brown fox jumps over the lazy dog. " * 3,
    "b.txt": "hello world",
    "sub/c.txt": "Retrieval enhanced transformers attend to neighbours of every chunk they read.",
}


def write_docs(folder, docs=DOCS):
    for name, text in docs.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return folder


def build(tmp_path, folder=None, **kwargs):
    out = tmp_path / "out"
    kwargs.setdefault("chunk_size", C)
    kwargs.setdefault("seq_len", SEQ_LEN)
    stats = retrieval.text_folder_to_chunks_(
        folder=folder if folder is not None else tmp_path / "docs",
        glob=kwargs.pop("glob", "**/*.txt"),
        chunks_memmap_path=out / "train.chunks.dat",
        seqs_memmap_path=out / "train.seq.dat",
        doc_ids_memmap_path=out / "train.doc_ids.dat",
        **kwargs,
    )
    n, width = stats["chunks"], kwargs["chunk_size"] + 1
    chunks = np.memmap(out / "train.chunks.dat", dtype=np.int32, mode="r", shape=(n, width))
    doc_ids = np.memmap(out / "train.doc_ids.dat", dtype=np.int32, mode="r", shape=(n,))
    seqs = np.memmap(out / "train.seq.dat", dtype=np.int32, mode="r", shape=(stats["seqs"],))
    return stats, chunks, doc_ids, seqs, out


@pytest.fixture
def docs(tmp_path):
    return write_docs(tmp_path / "docs")


def test_round_trip_documents_chunks_tokens(tmp_path, docs):
    info = emb.tokenizer_info()
    tok = emb.get_tokenizer()
    stats, chunks, doc_ids, seqs, _ = build(tmp_path)
    # sorted file order: a.txt, b.txt, sub/c.txt
    expected = [tok(DOCS[n], add_special_tokens=False).input_ids + [info.eos_id]
                for n in sorted(DOCS)]
    assert stats["docs"] == 3
    assert stats["chunks"] == sum(-(-len(e) // C) for e in expected)
    # each document's chunks, stripped of padding, give back its tokens followed by eos
    for d, ids in enumerate(expected):
        rows = np.flatnonzero(np.asarray(doc_ids) == d)
        assert np.all(np.diff(rows) == 1), "a document's chunks are contiguous"
        stream = np.asarray(chunks[rows, :C]).reshape(-1)
        assert list(stream[: len(ids)]) == ids
        assert np.all(stream[len(ids):] == info.pad_id), "right padded to a multiple of C"
        assert tok.decode(ids[:-1]) == tok.decode(tok(DOCS[sorted(DOCS)[d]]).input_ids[1:-1])
    # the +1 column is the first token of the next chunk in the global stream, pad at the end
    assert np.array_equal(chunks[:-1, C], chunks[1:, 0])
    assert chunks[-1, C] == info.pad_id
    assert list(np.unique(doc_ids)) == [0, 1, 2]


def test_documents_are_packed_into_sequences(tmp_path, docs):
    stats, chunks, doc_ids, seqs, _ = build(tmp_path)
    per_seq = SEQ_LEN // C
    assert list(seqs) == list(range(0, stats["chunks"], per_seq))
    assert stats["seqs"] == -(-stats["chunks"] // per_seq)
    assert len(np.unique(np.asarray(doc_ids[per_seq:2 * per_seq]))) > 1, "documents share sequences"

    # ten one-chunk documents fill three sequences, not ten mostly-padding ones
    short = write_docs(tmp_path / "short", {f"{i}.txt": f"note number {i}" for i in range(10)})
    stats, chunks, doc_ids, seqs, _ = build(tmp_path, folder=short)
    assert stats["docs"] == 10 and stats["chunks"] == 10 and stats["seqs"] == 3
    assert len(np.unique(np.asarray(doc_ids[seqs[0]:seqs[0] + per_seq]))) == per_seq


def test_paths_argument_keeps_the_given_order(tmp_path, docs):
    paths = [docs / "sub/c.txt", docs / "a.txt"]
    out = tmp_path / "out"
    stats = retrieval.text_folder_to_chunks_(
        chunks_memmap_path=out / "c.dat", seqs_memmap_path=out / "s.dat",
        doc_ids_memmap_path=out / "d.dat", chunk_size=C, seq_len=SEQ_LEN, paths=paths)
    tok = emb.get_tokenizer()
    chunks = np.memmap(out / "c.dat", dtype=np.int32, mode="r", shape=(stats["chunks"], C + 1))
    first = tok(DOCS["sub/c.txt"], add_special_tokens=False).input_ids
    assert stats["docs"] == 2
    assert list(chunks[0, :C]) == first[:C]


def test_cache_reused_then_rebuilt_when_a_document_changes(tmp_path, docs, caplog):
    caplog.set_level(logging.INFO, logger="diablogpt_pytorch.database")
    stats, *_, out = build(tmp_path)
    mtime = (out / "train.chunks.dat").stat().st_mtime_ns
    caplog.clear()
    assert build(tmp_path)[0] == stats
    assert "reusing chunks" in caplog.text
    assert (out / "train.chunks.dat").stat().st_mtime_ns == mtime

    (docs / "b.txt").write_text("hello world, now a longer document than it was before " * 2)
    caplog.clear()
    stats2, chunks, *_ = build(tmp_path)
    assert "rebuilding chunks" in caplog.text and "files_digest" in caplog.text
    assert stats2["chunks"] > stats["chunks"]

    caplog.clear()
    build(tmp_path, chunk_size=4, seq_len=SEQ_LEN)  # a changed setting rebuilds too
    assert "chunk_size" in caplog.text
    assert read_meta(out / "train.seq.dat")["inputs"]["chunk_size"] == 4


def test_reprocess_forces_a_rebuild(tmp_path, docs, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="diablogpt_pytorch.database")
    build(tmp_path)
    monkeypatch.setenv("REPROCESS", "1")
    caplog.clear()
    build(tmp_path)
    assert "REPROCESS is set" in caplog.text


def test_outputs_are_written_atomically_and_without_leftovers(tmp_path, docs):
    *_, out = build(tmp_path)
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if ".tmp" in n], names
    assert not (tmp_path / ".tmp").exists() and not os.path.exists(".tmp-retrieval-test")
    for name in ("train.chunks.dat", "train.seq.dat", "train.doc_ids.dat"):
        assert read_meta(out / name)["stats"]["chunks"] > 0


def test_a_failed_build_leaves_no_file_behind(tmp_path, docs):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="max_chunks"):
        build(tmp_path, max_chunks=2, truncate=False)
    assert not out.exists() or not list(out.iterdir())


def test_empty_folder_and_unmatched_glob_name_folder_and_glob(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"(?s)empty.*\*\*/\*\.txt.*folder is empty"):
        build(tmp_path, folder=empty)
    write_docs(empty, {"x.md": "text"})
    with pytest.raises(FileNotFoundError, match=r"no files in .*empty match glob '\*\*/\*\.txt'"):
        build(tmp_path, folder=empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build(tmp_path, folder=tmp_path / "missing")


def test_undecodable_bytes_are_replaced_with_a_warning_naming_the_file(tmp_path, caplog):
    folder = write_docs(tmp_path / "docs", {"ok.txt": "fine text"})
    (folder / "bad.txt").write_bytes(b"caf\xe9 au lait \xff\xfe and more")
    caplog.set_level(logging.WARNING)
    stats, *_ = build(tmp_path)
    assert stats["docs"] == 2
    assert "bad.txt" in caplog.text and "UTF-8" in caplog.text


def test_empty_documents_are_skipped_with_a_warning(tmp_path, caplog):
    write_docs(tmp_path / "docs", {"a.txt": "some words", "blank.txt": "  \n "})
    caplog.set_level(logging.WARNING)
    stats, chunks, doc_ids, *_ = build(tmp_path)
    assert stats["docs"] == 1 and stats["empty_docs"] == 1
    assert "blank.txt" in caplog.text
    only_blank = write_docs(tmp_path / "blank", {"blank.txt": ""})
    with pytest.raises(ValueError, match="has any text"):
        build(tmp_path, folder=only_blank)


def test_limits_truncate_with_a_warning_or_raise(tmp_path, docs, caplog):
    full, *_ = build(tmp_path)
    caplog.set_level(logging.INFO, logger="diablogpt_pytorch.database")
    caplog.clear()
    assert build(tmp_path, max_chunks=full["chunks"])[0] == full  # a cap it fits: still valid
    assert "reusing chunks" in caplog.text
    stats, chunks, doc_ids, seqs, _ = build(tmp_path, max_chunks=5)
    assert stats["chunks"] == 5 and stats["truncated"]
    assert "stopped at 5 chunks" in caplog.text
    assert chunks[-1, C] == emb.tokenizer_info().pad_id
    stats, *_ = build(tmp_path, max_seqs=1)  # one sequence of 4 chunks
    assert stats["chunks"] == SEQ_LEN // C and stats["seqs"] == 1 and stats["truncated"]
    assert full["chunks"] > SEQ_LEN // C
    caplog.clear()
    assert build(tmp_path)[0] == full  # a truncated build is rebuilt when the cap is raised
    assert "rebuilding chunks: max_chunks/max_seqs changed" in caplog.text
    with pytest.raises(ValueError, match=r"max_chunks=5.*raise"):
        build(tmp_path, max_chunks=5, truncate=False)


def test_bad_settings_and_mismatched_files_are_refused(tmp_path, docs):
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        build(tmp_path, seq_len=30)
    stats, *_, out = build(tmp_path)
    with pytest.raises(ValueError, match=r"num_chunks / chunk_size do not match"):
        retrieval.open_chunks(out / "train.chunks.dat", stats["chunks"] + 1, C)
    with pytest.raises(ValueError, match=r"num_chunks / chunk_size do not match"):
        retrieval.open_chunks(out / "train.chunks.dat", stats["chunks"], C * 2)
    with pytest.raises(FileNotFoundError):
        retrieval.open_doc_ids(out / "nope.dat", 3)


def test_special_token_strings_in_text_stay_text(tmp_path):
    info = emb.tokenizer_info()
    write_docs(tmp_path / "docs", {"a.txt": "BERT inputs look like [CLS] a b [SEP] [PAD] [PAD]"})
    stats, chunks, *_ = build(tmp_path)
    ids = np.asarray(chunks[:, :C]).reshape(-1)
    specials = {info.pad_id, info.cls_id, info.sep_id}
    real = ids[: np.flatnonzero(ids == info.eos_id)[-1]]
    assert not specials & set(real.tolist()), "only the final eos and the padding are special"
    assert not (retrieval.tokenize(["[PAD] [SEP]"])[0, 1:-1] < 1000).any()
