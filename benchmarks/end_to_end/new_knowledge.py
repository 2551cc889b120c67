"""New knowledge without retraining: add documents to the database of a trained model.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python -m benchmarks.end_to_end.new_knowledge            # 120 steps
    HF_HUB_OFFLINE=1 python -m benchmarks.end_to_end.new_knowledge --steps 400 --no-report

The ``near_duplicate`` corpus of ``retrieval_gain.py`` holds every document twice (as it is and
re-wrapped). The database is built with ``TrainingWrapper`` (timed: the full build), then the
copies of the held-out documents (training documents with the same tokens: their twins) are
removed from it (``remove_documents``), so the model trains (with retrieval) on a database that
lacks them. The held-out loss is measured with retrieval and
without it; then the copies are put back with ``add_documents`` (timed) and the held-out loss is
measured again with the same weights (copies with identical tokens are added once). ``twins``:
share of held-out chunks for which at least 90% of the next chunk's tokens are in the retrieved
neighbours and continuations.

Writes ``<out>/new_knowledge.json`` and, unless ``--no-report``, the "New knowledge without
retraining" section of BENCHMARKS.md. Fewer steps than ``retrieval_gain.py`` (400) keep the run
to a few minutes on one CPU thread: the model is less trained, so the gain is smaller.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from diablogpt_pytorch import DIABLOGPT, add_documents, remove_documents
from diablogpt_pytorch.config import CPU
from diablogpt_pytorch.database import Database

from benchmarks.common import report as _report
from benchmarks.end_to_end.retrieval_gain import (add_run_args, build_wrapper, make_corpus,
                                                  train_run, twin_coverage)

REPO = Path(__file__).resolve().parents[2]
logger = logging.getLogger("new_knowledge")


def held_out(wrapper, db: Path) -> dict:
    """Held-out losses (with / without retrieval) and twin coverage over the database as it is
    on disk now (the held-out neighbours are re-read from it)."""
    wrapper.valid_ds = Database.open(db).dataset("valid")
    metrics = wrapper.evaluate(batch_size=8, progress=False)
    return dict(with_retrieval=metrics["with_retrieval"]["loss"],
                without_retrieval=metrics["without_retrieval"]["loss"],
                twins=twin_coverage(SimpleNamespace(valid_ds=wrapper.valid_ds,
                                                    tokenizer=wrapper.tokenizer,
                                                    chunk_size=wrapper.chunk_size)))


def run(args) -> dict:
    work = Path(args.work)
    folder = make_corpus("near_duplicate", work)
    db = work / "near_duplicate" / "db"
    shutil.rmtree(db, ignore_errors=True)  # the full build is timed from nothing
    torch.manual_seed(args.seed)
    model = DIABLOGPT(**CPU.model_kwargs())
    started = time.perf_counter()
    wrapper = build_wrapper(folder, db, model, args.knn, not args.no_bf16)
    full_build = time.perf_counter() - started
    # the copies: every training document with the tokens of a held-out one (its twin; with the
    # uncased WordPiece a re-wrapped text has the same tokens, and a few topics share a text)
    tokens = lambda p: tuple(wrapper.tokenizer.encode(p.read_text(encoding="utf-8")))  # noqa: E731
    held = {tokens(p) for p in wrapper.valid_documents}
    twins = [p for p in wrapper.train_documents if tokens(p) in held]
    logger.info("full build %.1fs; %d held-out documents, %d copies of them in the database",
                full_build, len(wrapper.valid_documents), len(twins))

    removed = remove_documents(db, twins)
    wrapper.train_ds = Database.open(db).dataset("train")  # the model never sees the twins
    wrapper.valid_ds = Database.open(db).dataset("valid")
    records = train_run(wrapper, model, retrieval=True, steps=args.steps, eval_at=[args.steps],
                        batch_size=args.batch_size, lr=args.lr, wd=args.wd, seed=args.seed)
    before = held_out(wrapper, db)

    added = add_documents(db, twins, duplicates="skip")  # one of each text
    after = held_out(wrapper, db)
    logger.info("held-out loss with retrieval %.3f -> %.3f after adding %d documents in %.1fs "
                "(full build %.1fs)", before["with_retrieval"], after["with_retrieval"],
                added["documents_added"], added["seconds"], full_build)
    return dict(steps=args.steps, batch_size=args.batch_size, bf16=not args.no_bf16,
                train_seconds=records[-1]["seconds"], full_build_seconds=full_build,
                database_chunks=added["chunks"], twins=len(twins),
                documents_added=added["documents_added"],
                valid_documents=len(wrapper.valid_documents),
                remove_seconds=removed["seconds"], removed_chunks=removed["chunks_removed"],
                add_seconds=added["seconds"], added_chunks=added["chunks_added"],
                before=before, after=after)


def section(payload: dict) -> str:
    lines = [
        "## New knowledge without retraining",
        "",
        "Generated by `python -m benchmarks.end_to_end.new_knowledge` (raw numbers: "
        "`benchmarks/results/new_knowledge.json`). The `near_duplicate` corpus of "
        "`retrieval_gain.py` (every document twice, as it is and re-wrapped); the copies of the "
        "held-out documents (training documents with their tokens) are removed from the "
        "database (`remove_documents`), the main job's CPU model trains with retrieval on it, "
        "then the copies are added back (`add_documents`; copies with identical tokens once) "
        "and the held-out loss is measured again with the same weights. `full build`: "
        "`TrainingWrapper` building the whole database (train and held-out neighbours) from "
        "nothing; `add`: `add_documents` (only the new chunks embedded; the held-out "
        "neighbours searched again). `twins`: share of held-out chunks whose next chunk is "
        "(90% of its tokens) in the retrieved neighbours and continuations. 120 steps by default "
        "(`retrieval_gain.py` runs 400) keep the run near 8 minutes on one thread of the shared "
        "2-core machine; the model is less trained, so its gain is smaller.",
        "",
        "| when | commit | CPU | steps | held-out docs / copies / added | chunks added / total | "
        "full build | add | loss with retrieval before -> after | without retrieval | "
        "twins before -> after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in payload["history"]:
        b, a = r["before"], r["after"]
        lines.append(
            f"| {r['when']} | {r['commit']} | {r['cpu']} | {r['steps']} | "
            f"{r['valid_documents']} / {r['twins']} / {r['documents_added']} | "
            f"{r['added_chunks']} / {r['database_chunks']} | "
            f"{r['full_build_seconds']:.0f} s | {r['add_seconds']:.1f} s | "
            f"{b['with_retrieval']:.3f} -> {a['with_retrieval']:.3f} | "
            f"{b['without_retrieval']:.3f} | {b['twins']:.0%} -> {a['twins']:.0%} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=120)
    add_run_args(p, "new_knowledge")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("diablogpt_pytorch").setLevel(logging.WARNING)

    result = run(args)
    commit, cpu = _report.run_identity(REPO)
    result.update(commit=commit, cpu=cpu, when=time.strftime("%Y-%m-%d", time.gmtime()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "new_knowledge.json"
    history = json.loads(json_path.read_text()).get("history", []) if json_path.exists() else []
    payload = dict(result, history=history + [result])
    _report.write_atomically(json_path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2)))
    if not args.no_report:
        _report.write_section(REPO / "BENCHMARKS.md", "new_knowledge", section(payload))
    b, a = result["before"], result["after"]
    print(f"\ncommit {commit}, {cpu}, {args.steps} steps")
    print(f"held-out loss with retrieval: {b['with_retrieval']:.3f} -> {a['with_retrieval']:.3f} "
          f"(without retrieval {b['without_retrieval']:.3f}); twins {b['twins']:.0%} -> "
          f"{a['twins']:.0%}")
    print(f"add_documents: {result['documents_added']} documents, {result['added_chunks']} chunks in "
          f"{result['add_seconds']:.1f}s; full build {result['full_build_seconds']:.1f}s")


if __name__ == "__main__":
    main()
