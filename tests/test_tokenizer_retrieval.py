"""The retrieval database with an LM tokenizer of its own: chunks hold LM ids, the embedder embeds
each chunk's decoded text, identically at build and at query time; a changed tokenizer rebuilds."""

import numpy as np
import pytest
import torch

from diablogpt_pytorch import embedder as emb
from diablogpt_pytorch import retrieval
from diablogpt_pytorch._io import read_meta
from diablogpt_pytorch.corpus import write_default_corpus
from diablogpt_pytorch.tokenizer import TokenizersLMTokenizer, train_bpe_tokenizer

C = 32


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("docs")
    write_default_corpus(folder)
    keep = sorted(folder.glob("*.txt"))[:6]
    for p in folder.glob("*.txt"):
        if p not in keep:
            p.unlink()
    # code, tabs, capitals and non-ASCII text the WordPiece would lose
    (folder / "zz-code.txt").write_text("def Café(x):\n\treturn {'Ω': x}  # 東京\n\n    END\n")
    return folder


def chunk(docs, out, tokenizer, **kw):
    return retrieval.text_folder_to_chunks_(
        docs, "*.txt", out / "db.chunks.dat", out / "db.seq.dat", out / "db.doc_ids.dat",
        chunk_size=C, seq_len=4 * C, max_chunks=400, tokenizer=tokenizer, **kw)


def test_chunks_hold_lm_ids_that_decode_to_the_documents(docs, tmp_path):
    stats = chunk(docs, tmp_path, "train")
    tok_path = retrieval.tokenizer_path_for(tmp_path / "db.chunks.dat")
    assert tok_path == tmp_path / "db.chunks.tokenizer.json" and tok_path.is_file()
    lm = TokenizersLMTokenizer(tok_path)
    chunks = retrieval.open_chunks(tmp_path / "db.chunks.dat", stats["chunks"], C)
    doc_ids = retrieval.open_doc_ids(tmp_path / "db.doc_ids.dat", stats["chunks"])
    assert int(chunks.max()) < lm.vocab_size
    files = sorted(docs.glob("*.txt"))
    for d in (0, len(files) - 1):
        rows = np.asarray(chunks[np.asarray(doc_ids) == d, :C]).reshape(-1)
        assert lm.decode(rows.tolist()) == files[d].read_text()  # lossless through chunking
        assert (rows == lm.eos_id).sum() == 1
    assert read_meta(tmp_path / "db.chunks.dat")["inputs"]["tokenizer"] == lm.identity()


def test_same_chunk_embeds_identically_at_build_and_query_time(docs, tmp_path):
    stats = chunk(docs, tmp_path, "train")
    lm = TokenizersLMTokenizer(retrieval.tokenizer_path_for(tmp_path / "db.chunks.dat"))
    n = stats["chunks"]
    index, embeddings = retrieval.chunks_to_index_and_embed(
        n, C, tmp_path / "db.chunks.dat", tokenizer=lm, dtype="float32",
        chunks_to_embeddings_batch_size=64)
    chunks = retrieval.open_chunks(tmp_path / "db.chunks.dat", n, C)
    rows = [0, 5, n - 1]
    queries = torch.from_numpy(np.asarray(chunks[rows, :C]))
    # query time: the Retriever (generation) embeds through the same function
    retriever = retrieval.Retriever(tmp_path / "db.chunks.dat", tmp_path / "db.doc_ids.dat",
                                    tokenizer=lm)
    at_query = emb.embed_chunks(queries, tokenizer=lm, dtype="float32", normalize=True)
    np.testing.assert_allclose(at_query.numpy(), embeddings[rows], atol=1e-5)
    ids, scores = retriever.search(queries, 1)
    assert ids[:, 0].tolist() == rows
    np.testing.assert_allclose(scores[:, 0].numpy(), 1.0, atol=1e-4)
    # what BERT embeds is the chunk's decoded text, tokenized by its own WordPiece
    text = lm.decode(queries[1].tolist())
    assert text and any(c.isupper() for c in "".join(lm.decode_batch(chunks[:, :C].tolist())))
    direct = torch.nn.functional.normalize(retrieval.bert_embed(retrieval.tokenize(text), dtype="float32"), dim=-1)
    np.testing.assert_allclose(direct.numpy()[0], embeddings[5], atol=1e-5)
    # the last chunk's next-chunk neighbours stay LM ids
    assert int(retriever.retrieve(queries[:1], 1).max()) < lm.vocab_size
    # a Retriever without the database's tokenizer cannot embed queries the same way
    with pytest.raises(ValueError, match="pass tokenizer= the database's tokenizer"):
        retrieval.Retriever(tmp_path / "db.chunks.dat", tmp_path / "db.doc_ids.dat")


def test_changing_the_tokenizer_invalidates_the_chunk_files(docs, tmp_path, caplog):
    chunk(docs, tmp_path, "train")
    first = (tmp_path / "db.chunks.dat").read_bytes()
    files = sorted(docs.glob("*.txt"))
    other = train_bpe_tokenizer(files, tmp_path / "other.json", vocab_size=600)
    with caplog.at_level("INFO", logger="diablogpt_pytorch.database"):
        stats = chunk(docs, tmp_path, other)
    assert "rebuilding chunks" in caplog.text and "tokenizer" in caplog.text
    assert (tmp_path / "db.chunks.dat").read_bytes() != first
    # chunks of one tokenizer are never embedded as if made by another ("train" loads the
    # tokenizer stored beside the chunks, which is not the one they are now made with)
    for wrong in ("train", None):
        with pytest.raises(ValueError, match="was made with LM tokenizer"):
            retrieval.chunks_to_index_and_embed(stats["chunks"], C, tmp_path / "db.chunks.dat",
                                                tokenizer=wrong)
    caplog.clear()
    with caplog.at_level("INFO", logger="diablogpt_pytorch.database"):
        stats = chunk(docs, tmp_path, None)  # back to the WordPiece
    assert "rebuilding chunks" in caplog.text
    chunks = retrieval.open_chunks(tmp_path / "db.chunks.dat", stats["chunks"], C)
    assert read_meta(tmp_path / "db.chunks.dat")["inputs"]["tokenizer"]["kind"] == "bert"
    assert int(chunks.max()) > 600
