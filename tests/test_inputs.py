"""Document sources (JSON Lines, Parquet, a saved `datasets` dataset) give exactly the chunks the
same texts give as a folder of files."""

import json
import os

import pytest

from diablogpt_pytorch.corpus import default_corpus_documents
from diablogpt_pytorch.inputs import JsonlDocuments, ParquetDocuments, open_documents
from diablogpt_pytorch.retrieval import text_folder_to_chunks_

C, N = 16, 64


@pytest.fixture(scope="module")
def texts():
    docs = list(default_corpus_documents().values())[::9]
    # an empty document (skipped by the chunker), non-ASCII text and literal special tokens
    return docs[:3] + ["", "naïve café — 東京 [SEP] [PAD] end\n"] + docs[3:]


def _chunk(out, **kwargs):
    out.mkdir(parents=True, exist_ok=True)
    names = ("chunks", "seq", "doc_ids")
    stats = text_folder_to_chunks_(chunks_memmap_path=out / "c.dat", seqs_memmap_path=out / "s.dat",
                                   doc_ids_memmap_path=out / "d.dat", chunk_size=C, seq_len=N,
                                   **kwargs)
    return stats, {n: (out / f"{n[0]}.dat").read_bytes() for n in names}


@pytest.fixture(scope="module")
def folder_result(tmp_path_factory, texts):
    root = tmp_path_factory.mktemp("folder")
    for i, text in enumerate(texts):
        (root / "docs").mkdir(exist_ok=True)
        (root / "docs" / f"{i:03d}.txt").write_text(text, encoding="utf-8")
    return _chunk(root / "out", folder=root / "docs", glob="*.txt")


def test_jsonl_equals_the_folder(tmp_path, texts, folder_result):
    path = tmp_path / "docs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": i, "body": text}) + "\n")
            if i == 1:
                f.write("\n")  # blank lines are not documents
    docs = open_documents(path, text_field="body")
    assert isinstance(docs, JsonlDocuments) and len(docs) == len(texts)
    assert [t for _, t in docs] == texts
    assert _chunk(tmp_path / "out", documents=docs) == folder_result


def test_gzipped_jsonl_and_parquet_equal_the_folder(tmp_path, texts, folder_result):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    with gzip.open(tmp_path / "docs.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    assert _chunk(tmp_path / "gz", documents=open_documents(tmp_path / "docs.jsonl.gz")) == folder_result

    # small row groups and batches: documents cross batch boundaries
    pq.write_table(pa.table({"n": list(range(len(texts))), "content": texts}),
                   tmp_path / "docs.parquet", row_group_size=3)
    docs = ParquetDocuments(tmp_path / "docs.parquet", text_field="content", batch_size=2)
    assert len(docs) == len(texts)
    assert _chunk(tmp_path / "pq", documents=docs) == folder_result


def test_a_saved_datasets_dataset_equals_the_folder(tmp_path, texts, folder_result):
    datasets = pytest.importorskip("datasets")

    ds = datasets.Dataset.from_dict({"text": texts, "n": list(range(len(texts)))})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert _chunk(tmp_path / "out", documents=open_documents(tmp_path / "ds")) == folder_result

    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"splits \['test', 'train'\]: pass split="):
        open_documents(tmp_path / "dd")
    assert _chunk(tmp_path / "out2", documents=open_documents(tmp_path / "dd", split="train")) \
        == folder_result


def test_a_changed_source_is_rechunked(tmp_path, texts):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:3]))
    first, _ = _chunk(tmp_path / "out", documents=open_documents(path))
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:2]))
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse clocks
    second, _ = _chunk(tmp_path / "out", documents=open_documents(path))
    assert second["docs"] == 2 < first["docs"] == 3


def test_clear_errors(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 has no field 'text' \(it has \['body'\]\)"):
        list(open_documents(path))
    path.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2 is not valid JSON"):
        list(open_documents(path))
    path.write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match="holds a int, not text"):
        list(open_documents(path))

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match=r"no column 'text' \(it has \['body'\]\)"):
        open_documents(tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="not a saved `datasets` dataset"):
        open_documents(tmp_path)
    with pytest.raises(ValueError, match="not both"):
        _chunk(tmp_path / "o", folder=tmp_path, documents=open_documents(tmp_path / "x.parquet",
                                                                         text_field="body"))
