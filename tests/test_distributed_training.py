"""TrainingWrapper under 2 ranks (gloo, CPU): the ranks build the database together (each embeds
its share; the files equal one process's) or reuse one built by one process, both open it
read-only, the DDP step goes through ``wrapper.train_model``, evaluation is split and summed, and
the checkpoint written by rank 0 alone loads in one process.

The database is built here, in one process, with the real offline embedder; the ranks reuse it.
This file is also the per-rank script (``__main__`` below).
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diablogpt_pytorch import DIABLOGPT, TrainingWrapper
from diablogpt_pytorch.corpus import default_corpus_documents
from diablogpt_pytorch.training import StepBatchSampler

C, N, K = 16, 64, 2
TINY = dict(max_seq_len=N, enc_dim=32, enc_depth=1, dec_dim=32, dec_depth=2,
            dec_cross_attn_layers=(2,), heads=2, dim_head=16, chunk_size=C)
B = 2


def make_wrapper(root: Path, model, **kwargs) -> TrainingWrapper:
    return TrainingWrapper(
        diablogpt=model, knn=K, chunk_size=C, documents_path=root / "docs", glob="*.txt",
        chunks_memmap_path=root / "db" / "train.chunks.dat",
        seqs_memmap_path=root / "db" / "train.seq.dat",
        doc_ids_memmap_path=root / "db" / "train.doc_ids.dat",
        max_chunks=10_000, max_seqs=1_000, knn_extra_neighbors=8, valid_fraction=0.3,
        device="cpu", **kwargs)


def tiny_model():
    torch.manual_seed(0)
    return DIABLOGPT(**TINY)


def test_step_batches_of_two_ranks_tile_the_one_process_batches():
    """Rank r's batch at step s is the r-th slice of the one-process batch of the same step with
    twice the batch size: 2 ranks see exactly what 1 process sees, and resume the same way."""
    one = iter(StepBatchSampler(23, 2 * B, seed=3, start_step=0, rank=0, world_size=1))
    ranks = [iter(StepBatchSampler(23, B, seed=3, start_step=0, rank=r, world_size=2))
             for r in range(2)]
    for _ in range(12):  # several epochs
        assert next(one) == next(ranks[0]) + next(ranks[1])
    resumed = iter(StepBatchSampler(23, B, seed=3, start_step=12, rank=1, world_size=2))
    assert next(resumed) == next(ranks[1])
    with pytest.raises(ValueError, match="global batch"):
        StepBatchSampler(3, B, rank=0, world_size=2)


def test_wrapper_under_two_ranks(tmp_path):
    from test_distributed import assert_ok, finish, launch

    (tmp_path / "docs").mkdir()
    for i, (name, text) in enumerate(default_corpus_documents().items()):
        if i % 8 == 0:
            (tmp_path / "docs" / name).write_text(text[:2000], encoding="utf-8")
    model = tiny_model()
    wrapper = make_wrapper(tmp_path, model)  # builds the database in this process
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "db").iterdir()}

    assert_ok(finish(launch("wrapper", tmp_path, script=__file__), timeout=180))

    # nothing of the database was rewritten: rank 0 validated it, rank 1 only opened it
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "db").iterdir()} == before
    # the checkpoint (rank 0 alone wrote it) loads in one process; its held-out figures equal
    # the ones the two ranks reduced (float64 sums of the same float32 nats: 1e-9 relative)
    from diablogpt_pytorch.checkpoint import load_model

    trained = load_model(tmp_path / "ckpt.pt")
    reduced = json.loads((tmp_path / "eval.json").read_text())
    single = make_wrapper(tmp_path, trained).evaluate(batch_size=B, progress=False)
    for mode in ("with_retrieval", "without_retrieval"):
        assert reduced[mode]["tokens"] == single[mode]["tokens"]
        assert reduced[mode]["sequences"] == single[mode]["sequences"] == len(wrapper.valid_ds)
        assert reduced[mode]["loss"] == pytest.approx(single[mode]["loss"], rel=1e-6)
        assert reduced[mode]["bits_per_byte"] == pytest.approx(single[mode]["bits_per_byte"],
                                                               rel=1e-6)
    # and its weights are those of one SGD step in one process on the mean of the two ranks'
    # losses (each rank's loss is the mean over its own non-pad tokens; DDP averages the ranks)
    batches = torch.load(tmp_path / "batches.pt", weights_only=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sum(model(s, r, return_loss=True) for s, r in batches).div(len(batches)).backward()
    opt.step()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(trained.state_dict()[name], value, rtol=0, atol=2e-6)


def test_wrapper_built_before_the_process_group_builds_the_database_once(tmp_path):
    """Issue 19 item 7: a TrainingWrapper made under torchrun before init_distributed had every
    rank build the database on the same paths at once. It now joins the process group itself:
    rank 0 builds, rank 1 only opens the files."""
    from test_distributed import assert_ok, finish, launch

    (tmp_path / "docs").mkdir()
    for i, (name, text) in enumerate(default_corpus_documents().items()):
        if i % 8 == 0:
            (tmp_path / "docs" / name).write_text(text[:2000], encoding="utf-8")
    results = finish(launch("before_init", tmp_path, script=__file__), timeout=240)
    assert_ok(results)
    (_, err0), (_, err1) = results
    for built in ("chunked ", "wrote "):  # text_folder_to_chunks_, chunks_to_precalculated_knn_
        assert built in err0 and built not in err1, (err0[-2000:], err1[-2000:])
    assert "joining it" in err1
    sizes = json.loads((tmp_path / "before_init.json").read_text())
    assert sizes[0] == sizes[1] and sizes[0]["train"] > 0


# small batches: both ranks embed and search several batches of the tiny corpus; the search ranges
# (multiples of 12) differ from the embedding ranges (multiples of 8)
SMALL_BATCHES = dict(embed_batch_size=8, index_batch_size=12)


def write_docs(root: Path) -> None:
    (root / "docs").mkdir(parents=True)
    for i, (name, text) in enumerate(default_corpus_documents().items()):
        if i % 8 == 0:
            (root / "docs" / name).write_text(text[:2000], encoding="utf-8")


def test_two_ranks_build_the_database_together_and_equal_one_process(tmp_path):
    """Issue 17: under torchrun every rank embeds and searches its own share of the training
    chunks (rank 0 alone chunks the documents and builds the held-out split), and every file
    equals the single-process build's, byte for byte."""
    from diablogpt_pytorch._io import read_meta
    from test_distributed import assert_ok, finish, launch

    one, two = tmp_path / "one", tmp_path / "two"
    write_docs(one)
    write_docs(two)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: bf16 matmuls round differently with other counts
    try:
        single = make_wrapper(one, tiny_model(), **SMALL_BATCHES)
    finally:
        torch.set_num_threads(threads)
    results = finish(launch("build_together", two, script=__file__), timeout=240)
    assert_ok(results)
    (_, err0), (_, err1) = results

    n = single.train_stats["chunks"]
    shards = sorted((two / "db" / "train.chunks.emb.shards").glob("emb-*-of-00002.npy"))
    ranges = [(read_meta(p)["inputs"]["start"], read_meta(p)["inputs"]["stop"]) for p in shards]
    cut = ranges[0][1]
    assert ranges == [(0, cut), (cut, n)] and 0 < cut < n and cut % 8 == 0
    # each rank embedded its own range only; rank 0 alone chunked the documents
    assert f"embedding chunks [0, {cut})" in err0 and f"[{cut}, {n})" not in err0
    assert f"embedding chunks [{cut}, {n})" in err1 and "[0, " not in err1
    assert "chunked " in err0 and "chunked " not in err1
    assert "query knn" in err0 and "query knn" not in err1  # the held-out split: rank 0 alone
    np.testing.assert_array_equal(np.concatenate([np.load(p) for p in shards]),
                                  np.load(one / "db" / "train.chunks.emb.npy"))
    names = sorted(p.name for p in (one / "db").iterdir() if p.is_file()
                   and not p.name.endswith(".json") and p.suffix != ".npy")
    assert "train.chunks.knn.dat" in names and "train.chunks.valid.knn.dat" in names
    for name in names:
        assert (two / "db" / name).read_bytes() == (one / "db" / name).read_bytes(), name
    assert read_meta(two / "db" / "train.chunks.knn.dat")["stats"]["world_size"] == 2
    # one process then reuses what the ranks built: nothing is rebuilt
    before = {p: p.stat().st_mtime_ns for p in (two / "db").rglob("*")}
    again = make_wrapper(two, tiny_model(), **SMALL_BATCHES)
    assert len(again.train_ds) == len(single.train_ds)
    assert {p: p.stat().st_mtime_ns for p in (two / "db").rglob("*")} == before


def _scenario_build_together(out: Path, info):
    import logging

    logging.basicConfig(level=logging.INFO)
    make_wrapper(out, tiny_model(), **SMALL_BATCHES)


def _scenario_before_init(out: Path, info):
    import logging

    from diablogpt_pytorch import distributed as D

    logging.basicConfig(level=logging.INFO)
    assert not D.is_distributed()
    wrapper = make_wrapper(out, tiny_model())  # joins the process group itself
    assert D.is_distributed() and D.get_world_size() == 2
    assert isinstance(wrapper.train_model, torch.nn.parallel.DistributedDataParallel)
    everyone = D.all_gather_object({"train": len(wrapper.train_ds), "valid": len(wrapper.valid_ds)})
    if D.is_main():
        (out / "before_init.json").write_text(json.dumps(everyone))


def _scenario_wrapper(out: Path, info):
    from diablogpt_pytorch import distributed as D

    model = tiny_model()
    wrapper = make_wrapper(out, model)
    assert isinstance(wrapper.train_model, torch.nn.parallel.DistributedDataParallel)
    sampler = StepBatchSampler(len(wrapper.train_ds), B, seed=0)
    seq, retrieved = next(iter(wrapper.get_dataloader(batch_sampler=sampler)))
    # every rank's batch, for the single-process comparison
    everyone = [None] * info.world_size
    torch.distributed.all_gather_object(everyone, (seq, retrieved))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    wrapper.train_model(seq, retrieved, return_loss=True).backward()
    opt.step()
    wrapper.save_checkpoint(out / "ckpt.pt", opt, step=1)
    metrics = wrapper.evaluate(batch_size=B, progress=False)
    if D.is_main():
        torch.save(everyone, out / "batches.pt")
        (out / "eval.json").write_text(json.dumps(metrics))


if __name__ == "__main__":
    from diablogpt_pytorch import distributed as D

    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    info = None if scenario == "before_init" else D.init_distributed(device="cpu")
    globals()[f"_scenario_{scenario}"](out_dir, info)
    D.cleanup()
