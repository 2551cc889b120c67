"""Past one process: DDP training steps, rank-0-first preparation, metric
reduction and failure handling, on CPU with the gloo backend and two processes.

Each multi-process test starts this file as a script in 2 processes with the variables torchrun
sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free port), so what is tested
is exactly what a ``torchrun --nproc_per_node 2`` launch runs. The ``__main__`` block at the end
holds the per-rank scenarios.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diablogpt_pytorch import distributed as D

WORLD = 2
B = 2  # sequences per rank
C, SEQ_LEN, K, VOCAB = 8, 32, 2, 64
TINY = dict(num_tokens=VOCAB, max_seq_len=SEQ_LEN, enc_dim=32, enc_depth=1, dec_dim=32,
            dec_depth=2, dec_cross_attn_layers=(2,), heads=2, dim_head=16, chunk_size=C)
LR = 0.5


# ----------------------------------------------------------------------------- launching


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, out: Path, world_size: int = WORLD, script: str = __file__,
           **env_extra) -> list:
    """Start ``script scenario out`` as ranks 0..world_size-1, as torchrun would."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", **{k: str(v) for k, v in env_extra.items()})
        procs.append(subprocess.Popen([sys.executable, script, scenario, str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs, timeout: float = 300) -> list:
    """(returncode, stderr) per rank; kills every process still running after ``timeout``."""
    deadline = time.monotonic() + timeout
    results = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a rank was still running after {timeout}s: it hung")
        results.append((p.returncode, err))
    return results


def assert_ok(results):
    for rank, (rc, err) in enumerate(results):
        assert rc == 0, f"rank {rank} exited with {rc}:\n{err[-3000:]}"


# ----------------------------------------------------------------------------- single process


def test_single_process_helpers_are_no_ops(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    info = D.init_distributed(device="cpu")
    assert (info.rank, info.world_size, info.backend, info.is_main) == (0, 1, None, True)
    assert not D.is_distributed() and D.is_main() and D.get_world_size() == 1
    model = torch.nn.Linear(2, 2)
    assert D.wrap_model(model) is model and D.unwrap_model(model) is model
    assert D.reduce_metrics({"nats": 2.5, "tokens": 4}) == {"nats": 2.5, "tokens": 4.0}
    assert D.broadcast_object({"a": 1}) == {"a": 1}
    with D.main_process_first("nothing") as main:
        assert main
    D.barrier()


def test_shard_ranges_tile_the_items_on_aligned_boundaries():
    for n in (0, 1, 7, 64, 100, 1000):
        for world in (1, 2, 3, 8):
            for align in (1, 16):
                ranges = [D.shard_range(n, r, world, align) for r in range(world)]
                assert ranges[0][0] == 0 and ranges[-1][1] == n
                for (a, b), (c, _) in zip(ranges, ranges[1:]):
                    assert b == c and a <= b
                assert all(a % align == 0 for a, b in ranges if a < n)
                sizes = [b - a for a, b in ranges]
                assert max(sizes) - min(sizes) < 2 * align  # one block, plus a partial last one
    with pytest.raises(ValueError):
        D.shard_range(10, 2, 2)


def test_bad_timeout_setting_is_named(monkeypatch):
    monkeypatch.setenv(D.TIMEOUT_ENV, "ten minutes")
    with pytest.raises(ValueError, match=D.TIMEOUT_ENV):
        D._seconds(None, D.TIMEOUT_ENV, 1.0)


# ----------------------------------------------------------------------------- DDP


def tiny_batch(seed: int = 1):
    """The global batch: 2B sequences without padding (so every rank holds the same number of
    loss tokens and the mean of the ranks' mean losses is the mean loss of the whole batch)."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, VOCAB, (WORLD * B, SEQ_LEN + 1), generator=g)
    retrieved = torch.randint(1, VOCAB, (WORLD * B, SEQ_LEN // C, K, 2 * C), generator=g)
    return seq, retrieved


def tiny_model():
    from diablogpt_pytorch import DIABLOGPT

    torch.manual_seed(0)
    return DIABLOGPT(**TINY)


def test_ddp_step_on_two_ranks_equals_one_step_on_the_whole_batch(tmp_path):
    """One SGD step: 2 ranks x B sequences under DDP == 1 process x 2B sequences; the same with
    gradient accumulation (2 micro-batches of B/2 per rank, no_sync on the first).

    Tolerance: max |difference| of any parameter <= 2e-6 (float32 summation order differs
    between the ranks' gradient average and the single process's batch mean), while the step
    itself moves parameters by more than 1e-3.
    """
    procs = launch("ddp_step", tmp_path)
    assert_ok(finish(procs))

    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seq, retrieved = tiny_batch()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    model(seq, retrieved, return_loss=True).backward()
    opt.step()
    expected = model.state_dict()
    moved = max((expected[k] - before[k]).abs().max().item() for k in expected)
    assert moved > 1e-3
    for name in ("ddp_step.pt", "ddp_accum.pt"):
        got = torch.load(tmp_path / name, weights_only=True)
        assert got.keys() == expected.keys()
        worst = max((got[k] - expected[k]).abs().max().item() for k in expected)
        assert worst <= 2e-6, f"{name}: parameters differ by up to {worst}"


# ----------------------------------------------------------------------------- preparation


def test_rank0_first_order_metrics_and_broadcast(tmp_path):
    assert_ok(finish(launch("collectives", tmp_path)))
    for rank in range(WORLD):
        seen = json.loads((tmp_path / f"seen{rank}.json").read_text())
        # rank 1 entered the block only after rank 0 had finished it
        assert seen["file_existed_on_entry"] == (rank == 1)
        assert seen["metrics"] == {"nats": 3.0, "tokens": 30.0}
        assert seen["mean"] == {"loss": 1.5}
        assert seen["broadcast"] == {"num_chunks": 123}


def test_failure_on_rank0_during_preparation_stops_the_others(tmp_path):
    start = time.monotonic()
    results = finish(launch("prepare_fails", tmp_path), timeout=90)
    (rc0, err0), (rc1, err1) = results
    assert rc0 != 0 and "ValueError: rank 0 could not build the database" in err0
    assert rc1 != 0 and "DistributedError" in err1 and "rank(s) [0] failed during building" in err1
    assert time.monotonic() - start < 80


def test_each_rank_draws_and_resumes_its_own_random_stream(tmp_path):
    """Issue 19 item 4: seeded per rank, dropout masks differ between ranks and each rank's stream
    is reproducible; a checkpoint written by rank 0 holds every rank's RNG state and each rank
    resumes its own (before, every rank restored rank 0's)."""
    assert_ok(finish(launch("rng", tmp_path)))
    seen = json.loads((tmp_path / "rng.json").read_text())
    masks = [torch.tensor(m) for m in seen["masks"]]
    assert not torch.equal(masks[0], masks[1])
    for rank, mask in enumerate(masks):  # what one process seeded for that rank draws
        torch.manual_seed(D.rank_seed(7, rank))
        assert torch.equal(torch.nn.functional.dropout(torch.ones(64), 0.5), mask)
    assert D.rank_seed(7, 0) == 7  # one process draws what it always drew
    assert seen["resumed_exactly"] == [True, True]
    assert seen["next_draws_differ"]


# ----------------------------------------------------------------------------- dead ranks


def test_killed_rank_makes_the_other_exit_with_a_clear_error(tmp_path):
    """Rank 1 is killed (SIGKILL) while rank 0 waits for it in a metric all-reduce: rank 0 must
    exit with a DistributedError naming the cause, well before its 60 s timeout (gloo notices
    the closed sockets)."""
    procs = launch("wait_for_kill", tmp_path, **{D.TIMEOUT_ENV: 60})
    ready = tmp_path / "rank1.ready"
    deadline = time.monotonic() + 90
    while not ready.exists():
        assert procs[1].poll() is None, procs[1].communicate()[1][-3000:]
        assert time.monotonic() < deadline, "rank 1 never became ready"
        time.sleep(0.1)
    killed_at = time.monotonic()
    os.kill(procs[1].pid, signal.SIGKILL)
    (rc0, err0), (rc1, _) = finish(procs, timeout=60)
    waited = time.monotonic() - killed_at
    assert rc1 == -signal.SIGKILL
    assert rc0 != 0
    assert "DistributedError: rank 0 of 2: reducing the step's metrics failed" in err0, err0[-3000:]
    assert "another rank probably died" in err0
    assert waited < 30, f"rank 0 took {waited:.0f}s to give up"


def test_hung_rank_makes_the_other_time_out(tmp_path):
    """Rank 1 is alive but never joins the collective: rank 0 gives up after the 3 s timeout."""
    procs = launch("hang", tmp_path, **{D.TIMEOUT_ENV: 3})
    ((rc0, err0),) = finish(procs[:1], timeout=90)
    procs[1].kill()
    procs[1].communicate()
    assert rc0 != 0 and "DistributedError" in err0 and "give up after 3 s" in err0, err0[-3000:]
    elapsed = json.loads((tmp_path / "rank0.json").read_text())["elapsed"]
    assert 2.5 <= elapsed < 30


# ----------------------------------------------------------------------------- per-rank code


def _scenario_ddp_step(out: Path, info):
    seq, retrieved = tiny_batch()
    mine = slice(info.rank * B, (info.rank + 1) * B)
    for name, micro in (("ddp_step.pt", 1), ("ddp_accum.pt", 2)):
        model = tiny_model()
        ddp = D.wrap_model(model)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        s, r = seq[mine], retrieved[mine]
        pieces = list(zip(s.chunk(micro), r.chunk(micro)))
        for i, (ms, mr) in enumerate(pieces):
            sync = i == len(pieces) - 1
            with (ddp.no_sync() if not sync else contextlib.nullcontext()):
                with D.collective_errors("backward"):
                    (ddp(ms, mr, return_loss=True) / micro).backward()
        opt.step()
        if D.is_main():
            torch.save(model.state_dict(), out / name)
        D.barrier("saved")


def _scenario_collectives(out: Path, info):
    flag = out / "built.txt"
    with D.main_process_first("building the test file") as main:
        existed = flag.exists()
        if main:
            time.sleep(1.0)  # a slow build: the others must still wait
            flag.write_text("built")
    metrics = D.reduce_metrics({"nats": 1.0 + info.rank, "tokens": 10 * (1 + info.rank)})
    mean = D.reduce_metrics({"loss": 1.0 + info.rank}, average=True)
    got = D.broadcast_object({"num_chunks": 123} if main else None)
    (out / f"seen{info.rank}.json").write_text(json.dumps(dict(
        file_existed_on_entry=existed, metrics=metrics, mean=mean, broadcast=got)))


def _scenario_prepare_fails(out: Path, info):
    with D.main_process_first("building the database") as main:
        if main:
            raise ValueError("rank 0 could not build the database")
        # never reached on rank 1: it must fail at the barrier instead of entering


def _scenario_wait_for_kill(out: Path, info):
    D.barrier("start")
    if info.rank == 1:
        (out / "rank1.ready").write_text("ready")
        time.sleep(600)  # killed by the test
    D.reduce_metrics({"loss": 1.0}, what="reducing the step's metrics")


def _scenario_hang(out: Path, info):
    D.barrier("start")
    if info.rank == 1:
        time.sleep(300)  # alive, but never joins; killed by the test
    start = time.monotonic()
    try:
        D.reduce_metrics({"loss": 1.0}, what="reducing the step's metrics")
    finally:
        (out / "rank0.json").write_text(json.dumps({"elapsed": time.monotonic() - start}))


def _scenario_rng(out: Path, info):
    import random

    import numpy as np

    from diablogpt_pytorch import checkpoint as ckpt

    D.seed_everything(7)
    mask = torch.nn.functional.dropout(torch.ones(64), 0.5)
    model = D.wrap_model(tiny_model())  # DDP: rank 0's weights on both ranks
    states = ckpt.rank_rng_states()
    with D.main_process_first("saving") as main:
        if main:
            ckpt.save_checkpoint(out / "rng.pt", D.unwrap_model(model), rng_states=states)
    expected = (torch.rand(5).tolist(), np.random.rand(2).tolist(), random.random())
    torch.manual_seed(123), np.random.seed(123), random.seed(123)  # lose the state
    ckpt.load_checkpoint(out / "rng.pt", D.unwrap_model(model))
    got = (torch.rand(5).tolist(), np.random.rand(2).tolist(), random.random())
    everyone = D.all_gather_object((mask.tolist(), got == expected, expected))
    if D.is_main():
        (out / "rng.json").write_text(json.dumps(dict(
            masks=[e[0] for e in everyone], resumed_exactly=[e[1] for e in everyone],
            next_draws_differ=everyone[0][2] != everyone[1][2])))


if __name__ == "__main__":
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    info = D.init_distributed(device="cpu")
    assert info.backend == "gloo" and info.world_size == WORLD
    globals()[f"_scenario_{scenario}"](out_dir, info)
    D.cleanup()
