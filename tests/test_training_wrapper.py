"""TrainingWrapper end to end on a tiny corpus of real text (Python's own documentation topics),
with the real offline embedder and faiss: database build and reuse, REPROCESS, config checks,
training, held-out evaluation with and without retrieval, checkpoints."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from diablogpt_pytorch import DIABLOGPT, TrainingWrapper
from diablogpt_pytorch.checkpoint import load_model
from diablogpt_pytorch.corpus import default_corpus_documents
from diablogpt_pytorch.training import held_out_path, split_documents

C, N, K = 16, 64, 2
TINY = dict(max_seq_len=N, enc_dim=32, enc_depth=1, dec_dim=64, dec_depth=2,
            dec_cross_attn_layers=(2,), heads=2, dim_head=16, chunk_size=C)


def _write_corpus(folder: Path, every: int = 8, chars: int = 3000) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, text) in enumerate(default_corpus_documents().items()):
        if i % every == 0:
            (folder / name).write_text(text[:chars], encoding="utf-8")
    return sorted(folder.iterdir())


def _wrapper(model, root: Path, **kwargs):
    args = dict(
        diablogpt=model, knn=K, chunk_size=C, documents_path=root / "docs", glob="*.txt",
        chunks_memmap_path=root / "db" / "train.chunks.dat",
        seqs_memmap_path=root / "db" / "train.seq.dat",
        doc_ids_memmap_path=root / "db" / "train.doc_ids.dat",
        max_chunks=10_000, max_seqs=1_000, knn_extra_neighbors=8, valid_fraction=0.2,
    )
    args.update(kwargs)
    return TrainingWrapper(**args)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("wrapper")
    _write_corpus(root / "docs")
    torch.manual_seed(0)
    model = DIABLOGPT(**TINY)
    return root, model, _wrapper(model, root)


def _db_files(root: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in sorted((root / "db").iterdir())}


def test_builds_training_and_held_out_databases(built):
    root, model, wrapper = built
    assert len(wrapper.valid_documents) == 2 and len(wrapper.train_documents) == 8
    assert not set(wrapper.valid_documents) & set(wrapper.train_documents)
    names = set(_db_files(root))
    for name in ("train.chunks.dat", "train.chunks.knn.dat", "train.seq.dat", "train.doc_ids.dat",
                 "train.chunks.valid.dat", "train.chunks.valid.knn.dat", "train.seq.valid.dat"):
        assert name in names
    # held-out neighbours are ids into the TRAINING chunks
    knn = np.fromfile(root / "db" / "train.chunks.valid.knn.dat", dtype=np.int32)
    assert knn.max() < wrapper.train_stats["chunks"] and (knn >= 0).all()

    seq, retrieved = next(iter(wrapper.get_dataloader(batch_size=3, shuffle=True)))
    assert seq.shape == (3, N + 1) and retrieved.shape == (3, N // C, K, 2 * C)
    assert seq.dtype == retrieved.dtype == torch.int64
    assert int(seq.max()) < model.num_tokens and (retrieved != 0).any()


def test_split_is_deterministic_and_order_free(tmp_path):
    paths = [tmp_path / f"doc{i}.txt" for i in range(20)]
    train, valid = split_documents(paths, tmp_path, 0.1)
    assert len(valid) == 2 and sorted(train + valid) == sorted(paths)
    assert split_documents(list(reversed(paths)), tmp_path, 0.1) == (train, valid)
    assert split_documents(paths[:1], tmp_path, 0.5) == (paths[:1], [])
    assert held_out_path("a/train.chunks.dat") == Path("a/train.chunks.valid.dat")


def test_facade_parts_rebuild_the_wrappers_datasets_and_old_imports_still_work(built):
    from diablogpt_pytorch import build, data, optim, training

    root, model, wrapper = built
    # the names that moved out of training.py are the same objects under both paths
    assert training.get_optimizer is optim.get_optimizer
    assert training.lr_schedule is optim.lr_schedule
    assert training.StepBatchSampler is data.StepBatchSampler
    assert training.split_documents is build.split_documents
    assert training.held_out_path is build.held_out_path
    # the build module alone, given the wrapper's settings, reuses its files and serves its items
    before = _db_files(root)
    settings = wrapper.build_settings
    files = build.build_split_files(settings, wrapper.train_documents, wrapper.paths, train=True)
    assert _db_files(root) == before and files[0] == wrapper.train_stats
    ds = build.open_split(settings, wrapper.paths, files)
    for i in (0, len(ds) - 1):
        for a, b in zip(ds[i], wrapper.train_ds[i]):
            assert torch.equal(a, b)
    valid = build.build_split_files(settings, wrapper.valid_documents, wrapper.valid_paths,
                                    train=False, db_paths=wrapper.paths)
    vds = build.open_split(settings, wrapper.valid_paths, valid, db_paths=wrapper.paths,
                           db_num_chunks=wrapper.train_stats["chunks"])
    assert all(torch.equal(a, b) for a, b in zip(vds[0], wrapper.valid_ds[0]))
    assert wrapper.database_info()["num_chunks"] == wrapper.train_stats["chunks"]
    with pytest.raises(ValueError, match="held-out split needs db_paths"):
        build.build_split_files(settings, wrapper.valid_documents, wrapper.valid_paths,
                                train=False)


def test_reuses_matching_database_and_rebuilds_on_reprocess(built, monkeypatch):
    root, model, wrapper = built
    before = _db_files(root)
    again = _wrapper(model, root)
    assert _db_files(root) == before  # nothing rewritten
    assert again.train_stats == wrapper.train_stats

    monkeypatch.setenv("REPROCESS", "1")
    _wrapper(model, root)
    after = _db_files(root)
    assert after.keys() == before.keys()
    rebuilt = [n for n in before if after[n] != before[n]]
    for name in ("train.chunks.dat", "train.chunks.knn.dat", "train.chunks.valid.dat",
                 "train.chunks.valid.knn.dat"):
        assert name in rebuilt


def test_changed_settings_rebuild_instead_of_reusing(tmp_path):
    _write_corpus(tmp_path / "docs", every=20, chars=1500)
    torch.manual_seed(0)
    first = _wrapper(DIABLOGPT(**TINY), tmp_path)
    other = DIABLOGPT(**dict(TINY, max_seq_len=2 * N))  # a different sequence length
    second = _wrapper(other, tmp_path)  # same paths: the stale files must not be reused
    assert second.train_stats["chunks"] == first.train_stats["chunks"]
    assert second.train_stats["seqs"] == math.ceil(first.train_stats["chunks"] / (2 * N // C))
    seq, retrieved = second.train_ds[0]
    assert seq.shape == (2 * N + 1,) and retrieved.shape == (2 * N // C, K, 2 * C)


def test_mismatched_configs_are_rejected(built, tmp_path):
    root, model, _ = built
    with pytest.raises(ValueError, match="chunk_size=16 but TrainingWrapper got chunk_size=32"):
        _wrapper(model, root, chunk_size=32)
    with pytest.raises(ValueError, match=r"num_tokens=1000 is smaller than the vocabulary.*30522"):
        _wrapper(DIABLOGPT(**dict(TINY, num_tokens=1000)), root)
    with pytest.raises(ValueError, match="pad_id=5 differs"):
        _wrapper(DIABLOGPT(**dict(TINY, pad_id=5)), root)
    with pytest.raises(ValueError, match="max_seq_len=72 is not a multiple of chunk_size=16"):
        _wrapper(DIABLOGPT(**dict(TINY, max_seq_len=72)), root)
    (tmp_path / "docs").mkdir()
    with pytest.raises(FileNotFoundError, match="no files in .* match glob"):
        _wrapper(model, tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        _wrapper(model, tmp_path / "nowhere")


def test_loss_decreases_and_evaluation_runs_in_both_modes(built, tmp_path):
    root, _, wrapper = built
    torch.manual_seed(0)
    model = DIABLOGPT(**TINY)
    wrapper.model = model  # a fresh model on the same database
    before = wrapper.evaluate(batch_size=16, max_batches=1, progress=False)
    assert before["with_retrieval"]["bits_per_byte"] is None  # partial: no byte count applies
    optim = wrapper.get_optimizer(lr=3e-3, wd=0.01)
    dl = wrapper.get_dataloader(batch_size=2, shuffle=True,
                                generator=torch.Generator().manual_seed(0))
    steps, losses = 24, []
    while len(losses) < steps:
        for seq, retrieved in dl:
            loss = model(seq, retrieved, return_loss=True)
            loss.backward()
            optim.step()
            optim.zero_grad()
            losses.append(loss.item())
            if len(losses) == steps:
                break
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 1.0

    after = wrapper.evaluate(batch_size=16, progress=False)
    for metrics in (after,):
        assert set(metrics) == {"with_retrieval", "without_retrieval"}
        with_r, without_r = metrics["with_retrieval"], metrics["without_retrieval"]
        assert with_r["retrieval"] and not without_r["retrieval"]
        assert with_r["tokens"] == without_r["tokens"] > 0
        for m in (with_r, without_r):
            assert all(math.isfinite(m[k]) for k in ("loss", "perplexity", "bits_per_byte"))
            assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
            # bytes of the text the held-out ids decode to (the WordPiece changes case and spacing)
            tok = wrapper.tokenizer
            decoded = sum(len(tok.decode(tok.encode(p.read_text())).encode())
                          for p in wrapper.valid_documents)
            assert decoded != sum(p.stat().st_size for p in wrapper.valid_documents)
            assert m["bits_per_byte"] == pytest.approx(m["nats"] / (math.log(2) * decoded))
        assert with_r["loss"] != without_r["loss"]  # retrieval is actually used
    assert after["with_retrieval"]["loss"] < math.log(model.num_tokens) - 1.0
    assert model.training  # evaluate restores the mode


def test_checkpoint_through_the_wrapper_needs_no_documents(built, tmp_path):
    root, model, wrapper = built
    wrapper.model = model
    optim = wrapper.get_optimizer()
    path = wrapper.save_checkpoint(tmp_path / "ckpt.pt", optim, step=5)
    loaded = load_model(path)
    seq, retrieved = wrapper.train_ds[0]
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(seq[None, :-1], retrieved[None]),
                           model(seq[None, :-1], retrieved[None]))
    model.train()
    payload = wrapper.load_checkpoint(path, optim)
    assert payload["step"] == 5 and payload["extra"]["database"]["knn"] == K


def test_generate_delegates_with_the_training_database(built):
    root, model, wrapper = built
    wrapper.model = model
    prompt, _ = wrapper.valid_ds[0]
    prompt = prompt[None, : 2 * C]
    seen = []
    sampled = wrapper.generate(prompt, temperature=0.0, max_new_tokens=C,
                               on_retrieve=lambda i, chunk, nbrs: seen.append(nbrs))
    assert sampled.shape[0] == 1 and 2 * C < sampled.shape[1] <= 3 * C
    assert torch.equal(sampled[:, : 2 * C], prompt)
    assert seen and all(n.shape[-2:] == (K, 2 * C) for n in seen)
    assert model.training  # generation leaves the mode as it found it


def test_trained_tokenizer_database_trains_evaluates_and_generates(tmp_path, caplog):
    _write_corpus(tmp_path / "docs")
    with pytest.raises(ValueError, match="num_tokens=512"):
        _wrapper(DIABLOGPT(**TINY, num_tokens=300), tmp_path, tokenizer="train",
                 tokenizer_vocab_size=512)
    torch.manual_seed(0)
    model = DIABLOGPT(**TINY, num_tokens=512)
    wrapper = _wrapper(model, tmp_path, tokenizer="train", tokenizer_vocab_size=512)
    tok = wrapper.tokenizer
    assert (tok.kind, tok.vocab_size, tok.pad_id, tok.eos_id) == ("tokenizers", 512, 0, 1)
    assert wrapper.tokenizer_path == tmp_path / "db" / "train.chunks.tokenizer.json"
    assert wrapper.tokenizer_path.is_file()
    assert wrapper.database_info()["tokenizer"]["fingerprint"] == tok.fingerprint()
    # lossless: the held-out ids decode to exactly the documents' bytes
    assert wrapper.valid_num_bytes == sum(p.stat().st_size for p in wrapper.valid_documents)
    optim = wrapper.get_optimizer(lr=3e-3, wd=0.01)
    losses = []
    for seq, retrieved in wrapper.get_dataloader(batch_size=2, shuffle=True,
                                                 generator=torch.Generator().manual_seed(0)):
        assert int(seq.max()) < 512 and int(retrieved.max()) < 512
        loss = model(seq, retrieved, return_loss=True)
        loss.backward()
        optim.step()
        optim.zero_grad()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    metrics = wrapper.evaluate(batch_size=16, progress=False)["with_retrieval"]
    assert metrics["bits_per_byte"] == pytest.approx(
        metrics["nats"] / (math.log(2) * wrapper.valid_num_bytes))
    # generation: the prompt (a held-out document's start) comes back with its case and newlines
    text = wrapper.valid_documents[0].read_text()
    prompt = torch.tensor([tok.encode(text)[: 2 * C]])
    sampled = wrapper.generate(prompt, temperature=0.0, max_new_tokens=C)
    out = wrapper.ids_to_text(sampled[0])
    head = tok.decode(prompt[0].tolist())
    assert out.startswith(head) and text.startswith(head)
    assert "\n" in head and any(c.isupper() for c in head)
    assert len(out) > len(head)
    assert wrapper.ids_to_text(torch.tensor([tok.encode("Ab\n\tC")] * 2)) == ["Ab\n\tC"] * 2
    # a second wrapper over the same folder reuses the tokenizer and every database file
    with caplog.at_level("INFO"):
        again = _wrapper(DIABLOGPT(**TINY, num_tokens=512), tmp_path, tokenizer="train",
                         tokenizer_vocab_size=512)
    assert again.tokenizer.fingerprint() == tok.fingerprint()
    assert "reusing tokenizer" in caplog.text and "rebuilding" not in caplog.text
