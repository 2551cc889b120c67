"""DIABLOGPTDataset: items are exactly what the memmaps say, and
reading never changes a file."""

import hashlib
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from diablogpt_pytorch import DIABLOGPTDataset

C = 4
SEQ_LEN = 8  # two chunks per sequence
K = 2
PAD = 0
EOS = 9


def save_memmap(path, array):
    f = np.memmap(path, dtype=array.dtype, mode="w+", shape=array.shape)
    f[:] = array
    f.flush()
    del f


def _database(tmp_path):
    """Three documents packed into 5 chunks, as the retrieval pipeline lays them out.

    doc 0: tokens 11..17 + EOS        -> chunks 0, 1
    doc 1: tokens 21..22 + EOS + pad  -> chunk 2
    doc 2: tokens 31..36 + EOS + pad  -> chunks 3, 4
    """
    stream = np.array(
        [11, 12, 13, 14, 15, 16, 17, EOS, 21, 22, EOS, PAD, 31, 32, 33, 34, 35, 36, EOS, PAD]
    )
    num_chunks = len(stream) // C
    nxt = np.append(stream[C::C], PAD)  # first token of the next chunk; pad after the last
    chunks = np.concatenate([stream.reshape(num_chunks, C), nxt[:, None]], axis=1).astype(np.int32)
    doc_ids = np.array([0, 0, 1, 2, 2], dtype=np.int32)
    knn = np.array([[3, 2], [4, -1], [0, 3], [1, -1], [-1, -1]], dtype=np.int32)
    seqs = np.arange(0, num_chunks, SEQ_LEN // C, dtype=np.int32)  # 0, 2, 4: the last runs past
    paths = {name: tmp_path / f"train.{name}.dat" for name in ("chunks", "knn", "seq", "doc_ids")}
    save_memmap(paths["chunks"], chunks)
    save_memmap(paths["knn"], knn)
    save_memmap(paths["seq"], seqs)
    save_memmap(paths["doc_ids"], doc_ids)
    return stream, chunks, knn, seqs, paths


def _dataset(paths, num_sequences=3, num_chunks=5, **kwargs):
    return DIABLOGPTDataset(
        num_sequences=num_sequences,
        num_chunks=num_chunks,
        num_neighbors=K,
        chunk_size=C,
        seq_len=SEQ_LEN,
        chunk_memmap_path=paths["chunks"],
        chunk_nn_memmap_path=paths["knn"],
        seq_memmap_path=paths["seq"],
        doc_ids_memmap_path=paths["doc_ids"],
        **kwargs,
    )


def test_items_equal_memmap_contents(tmp_path):
    stream, chunks, knn, seqs, paths = _database(tmp_path)
    ds = _dataset(paths)
    assert len(ds) == 3

    seq, retrieved = ds[0]
    assert seq.dtype == torch.int64 and retrieved.dtype == torch.int64
    assert seq.shape == (SEQ_LEN + 1,) and retrieved.shape == (SEQ_LEN // C, K, 2 * C)
    # chunks 0, 1 then the first token of chunk 2 (the next document: documents are packed)
    assert seq.tolist() == stream[: SEQ_LEN + 1].tolist()

    # chunk 0's neighbours: chunk 3 + its continuation chunk 4 (same doc); chunk 2 + pad
    # (chunk 3 belongs to another document)
    assert retrieved[0, 0].tolist() == stream[12:20].tolist()
    assert retrieved[0, 1].tolist() == stream[8:12].tolist() + [PAD] * C
    # chunk 1's neighbours: chunk 4 is the last chunk -> no continuation; -1 -> all padding
    assert retrieved[1, 0].tolist() == stream[16:20].tolist() + [PAD] * C
    assert retrieved[1, 1].tolist() == [PAD] * (2 * C)


def test_middle_sequence_and_document_end(tmp_path):
    stream, *_, paths = _database(tmp_path)
    seq, retrieved = _dataset(paths)[1]
    assert seq.tolist() == stream[8:17].tolist()
    # chunk 2's neighbour chunk 0 continues with chunk 1 (same document)
    assert retrieved[0, 0].tolist() == stream[0:8].tolist()
    assert retrieved[0, 1].tolist() == stream[12:20].tolist()
    # chunk 3's neighbour chunk 1 ends doc 0: continuation is padding, not doc 1's chunk 2
    assert retrieved[1, 0].tolist() == stream[4:8].tolist() + [PAD] * C


def test_last_sequence_is_padded_past_the_end(tmp_path):
    stream, *_, paths = _database(tmp_path)
    seq, retrieved = _dataset(paths)[2]
    assert seq.tolist() == stream[16:20].tolist() + [PAD] * (SEQ_LEN + 1 - C)
    assert (retrieved == PAD).all()  # chunk 4 has no neighbours; the missing chunk neither


def test_eos_marks_document_ends_without_doc_ids(tmp_path):
    stream, *_, paths = _database(tmp_path)
    paths = dict(paths, doc_ids=None)
    ds = DIABLOGPTDataset(3, 5, K, C, SEQ_LEN, paths["chunks"], paths["knn"], paths["seq"],
                          eos_id=EOS)
    _, retrieved = ds[1]
    assert retrieved[1, 0].tolist() == stream[4:8].tolist() + [PAD] * C


def test_reading_never_changes_files(tmp_path):
    *_, paths = _database(tmp_path)
    before = {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
              for p in paths.values()}
    ds = _dataset(paths)
    for item in DataLoader(ds, batch_size=2, num_workers=0):
        pass
    for i in range(len(ds)):
        ds[i]
    after = {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
             for p in paths.values()}
    assert after == before
    assert not ds._maps["chunks"].flags.writeable


def test_size_mismatch_names_the_file(tmp_path):
    *_, paths = _database(tmp_path)
    with pytest.raises(ValueError, match=r"train\.chunks\.dat.*bytes"):
        _dataset(paths, num_chunks=6)  # the seed's reference would silently grow the file
    with pytest.raises(ValueError, match=r"train\.seq\.dat"):
        _dataset(paths, num_sequences=4)
    assert paths["chunks"].stat().st_size == 5 * (C + 1) * 4
    with pytest.raises(FileNotFoundError, match="missing.dat"):
        _dataset(dict(paths, knn=tmp_path / "missing.dat"))
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        DIABLOGPTDataset(3, 5, K, C, 10, paths["chunks"], paths["knn"], paths["seq"])


def test_sequence_starts_outside_the_chunks_are_rejected(tmp_path):
    *_, paths = _database(tmp_path)
    save_memmap(paths["seq"], np.array([0, 2, 7], dtype=np.int32))
    with pytest.raises(ValueError, match=r"train\.seq\.dat.*outside"):
        _dataset(paths)


def test_pickles_without_open_handles_and_works_in_workers(tmp_path):
    *_, paths = _database(tmp_path)
    ds = _dataset(paths)
    ds[0]
    assert ds._maps is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._maps is None
    serial = [torch.cat([s, r.flatten()]) for s, r in (ds[i] for i in range(len(ds)))]
    loaded = []
    for seq, retrieved in DataLoader(ds, batch_size=1, num_workers=2):
        loaded.append(torch.cat([seq[0], retrieved[0].flatten()]))
    assert all(torch.equal(a, b) for a, b in zip(serial, loaded))


def test_seed_mock_example_shapes(tmp_path):
    """The seed README's mock-data example, as written (model call left to examples/dataset.py)."""
    NUM_CHUNKS, CHUNK_SIZE, NUM_SEQS, NUM_NEIGHBORS = 1000, 64, 100, 2
    save_memmap(tmp_path / "train.chunks.dat",
                np.int32(np.random.randint(0, 8192, size=(NUM_CHUNKS, CHUNK_SIZE + 1))))
    save_memmap(tmp_path / "train.chunks.knn.dat",
                np.int32(np.random.randint(0, 1000, size=(NUM_CHUNKS, NUM_NEIGHBORS))))
    save_memmap(tmp_path / "train.seq.dat", np.int32(np.random.randint(0, 128, size=(NUM_SEQS,))))
    train_ds = DIABLOGPTDataset(
        num_sequences=NUM_SEQS,
        num_chunks=NUM_CHUNKS,
        num_neighbors=NUM_NEIGHBORS,
        chunk_size=CHUNK_SIZE,
        seq_len=2048,
        chunk_memmap_path=tmp_path / "train.chunks.dat",
        chunk_nn_memmap_path=tmp_path / "train.chunks.knn.dat",
        seq_memmap_path=tmp_path / "train.seq.dat",
    )
    seq, retrieved = next(iter(DataLoader(train_ds, batch_size=2)))
    assert seq.shape == (2, 2049)
    assert retrieved.shape == (2, 32, 2, 128)


def test_dataset_example_runs(tmp_path):
    """examples/dataset.py: the seed's mock-data example with a small model on CPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    result = subprocess.run([sys.executable, str(root / "examples" / "dataset.py"),
                             "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "seq (2, 257), retrieved (2, 4, 2, 128), loss" in result.stdout
