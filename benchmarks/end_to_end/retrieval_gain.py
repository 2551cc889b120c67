"""Does retrieval pay? Held-out loss with and without retrieval, same weights, against a baseline.

    HF_HUB_OFFLINE=1 python -m benchmarks.end_to_end.retrieval_gain                 # 400 steps, both corpora
    HF_HUB_OFFLINE=1 python -m benchmarks.end_to_end.retrieval_gain --steps 1600 --corpora near_duplicate

The main job's CPU configuration (``diablogpt_pytorch.config.CPU``: chunk_size 64, K=2), bf16
autocast, 4 x 256 tokens per step, the library's ``get_optimizer`` and the main job's schedule
(``diablogpt_pytorch.training.lr_schedule``). From the same initialisation and the same data order
it trains

- A: with retrieval; evaluated on the held-out documents with retrieval and with it switched off
  (``retrieved=None``, same weights);
- B: with retrieval switched off during training, the baseline at equal steps and tokens;

on two corpora of real text, both made from the default corpus (Python's documentation topics):

- ``near_duplicate``: every document twice, as it is (``a/``) and with its prose paragraphs
  re-wrapped at another line width (``b/``), as manuals and documentation often exist in several
  renderings; the train/held-out split is by file, so most held-out documents have their twin in
  the database. It measures whether the model can use its neighbours at all.
- ``natural``: the default corpus, nothing planted.

Writes ``<out>/retrieval_gain.json`` (every evaluation of every run), ``<out>/retrieval_gain.png``
(learning curves) and, unless ``--no-report``, the "Retrieval gain" section of BENCHMARKS.md.
Every run made is reported, not the best.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import textwrap
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from diablogpt_pytorch import DIABLOGPT, TrainingWrapper
from diablogpt_pytorch.config import CPU
from diablogpt_pytorch.corpus import default_corpus_documents
from diablogpt_pytorch.training import StepBatchSampler, lr_schedule

from benchmarks.common import report as _report
from benchmarks.end_to_end.retrieval_diagnostics import branch_scales, diagnose, gradient_norms

REPO = Path(__file__).resolve().parents[2]
logger = logging.getLogger("retrieval_gain")

CORPORA = ("near_duplicate", "natural")


# ---------------------------------------------------------------------------------- corpora


def rewrap(text: str, width: int = 56) -> str:
    """The same document rendered at another line width: prose paragraphs (blank-line separated,
    not indented) are re-filled at ``width`` columns; indented blocks (code, grammar) are kept."""
    out = []
    for para in text.split("\n\n"):
        lines = para.split("\n")
        if para.strip() and not any(line.startswith((" ", "\t")) for line in lines):
            para = textwrap.fill(" ".join(line.strip() for line in lines), width=width,
                                 break_long_words=False, break_on_hyphens=False)
        out.append(para)
    return "\n\n".join(out)


def _write_folder(folder: Path, documents: dict[str, str]) -> Path:
    """Write ``{relative name: text}`` into ``folder`` (files already right are left alone, so a
    database built from the folder stays fresh)."""
    for name, text in documents.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        data = text.encode("utf-8")
        if not (path.is_file() and path.read_bytes() == data):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
    return folder


def make_corpus(name: str, work: Path) -> Path:
    """The text folder of corpus ``name`` under ``work``."""
    docs = default_corpus_documents()
    if name == "natural":
        return _write_folder(work / name / "text", docs)
    if name == "near_duplicate":
        # a/ and b/ sort apart, so twins are not packed into the same training sequence
        both = {f"a/{n}": t for n, t in docs.items()}
        both.update({f"b/{n}": rewrap(t) for n, t in docs.items()})
        return _write_folder(work / name / "text", both)
    raise ValueError(f"unknown corpus {name!r}; choose from {CORPORA}")


def twin_coverage(wrapper: TrainingWrapper) -> float:
    """Share of held-out chunks (that have a next chunk in their document) for which at least 90%
    of the next chunk's tokens occur in the retrieved neighbours and their continuations."""
    hits = total = 0
    pad = wrapper.tokenizer.pad_id
    for i in range(len(wrapper.valid_ds)):
        seq, retrieved = wrapper.valid_ds[i]
        C = wrapper.chunk_size
        chunks = seq[:-1].view(-1, C)
        for u in range(chunks.shape[0] - 1):
            nxt = chunks[u + 1]
            nxt = nxt[nxt != pad]
            if nxt.numel() < C // 2:
                continue
            pool = set(retrieved[u].reshape(-1).tolist())
            total += 1
            hits += sum(t in pool for t in nxt.tolist()) >= 0.9 * nxt.numel()
    return hits / max(total, 1)


# ---------------------------------------------------------------------------------- training


def build_wrapper(folder: Path, db: Path, model: DIABLOGPT, knn: int, bf16: bool) -> TrainingWrapper:
    return TrainingWrapper(
        diablogpt=model, knn=knn, chunk_size=model.chunk_size, documents_path=folder,
        glob="**/*.txt", chunks_memmap_path=db / "train.chunks.dat",
        seqs_memmap_path=db / "train.seq.dat", doc_ids_memmap_path=db / "train.doc_ids.dat",
        valid_fraction=0.1, device="cpu", bf16=bf16)


def train_run(wrapper: TrainingWrapper, model: DIABLOGPT, *, retrieval: bool, steps: int,
              eval_at: list[int], batch_size: int, lr: float, wd: float, seed: int,
              diagnose_every: bool = False, lr_floor: float = 0.1) -> list[dict]:
    """Train ``model`` (already initialised) for ``steps`` (``lr_schedule`` from ``lr`` down to
    ``lr_floor`` x ``lr``); evaluate at the steps in ``eval_at`` (and at step 0), with
    ``diagnose_every`` also the attention shares, per-offset gain and gradient norms of
    :mod:`retrieval_diagnostics`. Returns one record per evaluation."""
    wrapper.model = wrapper.train_model = model
    optim = wrapper.get_optimizer(lr=lr, wd=wd)
    sampler = StepBatchSampler(len(wrapper.train_ds), batch_size, seed=seed)
    loader = iter(wrapper.get_dataloader(batch_sampler=sampler, num_workers=0))
    records = []

    def record(step: int, train_loss: float, seconds: float) -> None:
        metrics = wrapper.evaluate(batch_size=8, progress=False)
        records.append(dict(step=step, train_loss=train_loss, seconds=seconds,
                            with_retrieval=metrics["with_retrieval"]["loss"],
                            without_retrieval=metrics["without_retrieval"]["loss"]))
        if diagnose_every and retrieval:
            seq, retrieved = wrapper.train_ds[0]
            records[-1].update(
                diagnose(model, wrapper.valid_ds, autocast=wrapper.autocast),
                grad_norms=gradient_norms(model, seq[None], retrieved[None], wrapper.autocast),
                branch_rms=branch_scales(model, seq[None], retrieved[None], wrapper.autocast))
        logger.info("step %d: held-out %.3f with retrieval, %.3f without (train %.3f, %.0fs)",
                    step, records[-1]["with_retrieval"], records[-1]["without_retrieval"],
                    train_loss, seconds)

    record(0, float("nan"), 0.0)
    model.train()
    started, window = time.time(), []
    for step in range(steps):
        for group in optim.param_groups:
            group["lr"] = lr_schedule(step, steps, lr, floor=lr_floor)
        seq, retrieved = next(loader)
        with wrapper.autocast():
            loss = model(seq, retrieved if retrieval else None, return_loss=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        window = (window + [loss.item()])[-20:]
        if step + 1 in eval_at:
            record(step + 1, sum(window) / len(window), time.time() - started)
            model.train()
    return records


def run_corpus(name: str, work: Path, args) -> dict:
    folder = make_corpus(name, work)
    torch.manual_seed(args.seed)
    init = DIABLOGPT(**CPU.model_kwargs())
    state = {k: v.clone() for k, v in init.state_dict().items()}
    wrapper = build_wrapper(folder, work / name / "db", init, args.knn, not args.no_bf16)
    eval_at = sorted({s for s in args.eval_at if s <= args.steps} | {args.steps})
    runs = {}
    for label, retrieval in (("A", True), ("B", False)):
        model = DIABLOGPT(**CPU.model_kwargs())
        model.load_state_dict(state)  # the same initialisation for A and B
        torch.manual_seed(args.seed + 1)  # the same dropout stream start
        logger.info("%s: run %s (%s retrieval), %d steps", name, label,
                    "with" if retrieval else "without", args.steps)
        runs[label] = train_run(wrapper, model, retrieval=retrieval, steps=args.steps,
                                eval_at=eval_at, batch_size=args.batch_size, lr=args.lr,
                                wd=args.wd, seed=args.seed, diagnose_every=args.diagnose)
    return dict(corpus=name, train_documents=len(wrapper.train_documents),
                valid_documents=len(wrapper.valid_documents),
                train_chunks=wrapper.train_stats["chunks"], valid_chunks=wrapper.valid_stats["chunks"],
                twin_coverage=twin_coverage(wrapper), runs=runs)


def summarise(result: dict) -> dict:
    """Final-step figures: A with/without retrieval, B, and the relative gains."""
    a, b = result["runs"]["A"][-1], result["runs"]["B"][-1]
    return dict(step=a["step"], a_with=a["with_retrieval"], a_without=a["without_retrieval"],
                b=b["without_retrieval"],
                gain_vs_a_without=1 - a["with_retrieval"] / a["without_retrieval"],
                gain_vs_b=1 - a["with_retrieval"] / b["without_retrieval"])


def plot(payload: dict, path: Path) -> None:
    """Held-out loss against steps: A with retrieval, A with it off (same weights), B."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = payload["results"]
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results):
        a, b = r["runs"]["A"][1:], r["runs"]["B"][1:]  # step 0 (untrained) squeezes the scale
        steps = [x["step"] for x in a]
        ax.plot(steps, [x["with_retrieval"] for x in a], "o-", label="A, with retrieval")
        ax.plot(steps, [x["without_retrieval"] for x in a], "s:", label="A, retrieval off (same weights)")
        ax.plot([x["step"] for x in b], [x["without_retrieval"] for x in b], "^--",
                label="B, trained without retrieval")
        ax.set_title(f"{r['corpus']}: gain {r['summary']['gain_vs_a_without']:.1%} "
                     f"(vs B {r['summary']['gain_vs_b']:.1%})")
        ax.set_xlabel("step")
        ax.set_ylabel("held-out loss (nats/token)")
        ax.legend()
    fig.tight_layout()
    _report.write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)


def section(payload: dict, png: str) -> str:
    """The BENCHMARKS.md section: every run's final figures and the last run's curves."""
    lines = [
        "## Retrieval gain",
        "",
        "Generated by `python -m benchmarks.end_to_end.retrieval_gain` (raw numbers: "
        "`benchmarks/results/retrieval_gain.json`). The main job's CPU configuration, bf16 "
        "autocast, 4 x 256 tokens per step, `get_optimizer` and `lr_schedule`; A trains with "
        "retrieval and is evaluated with it and with it off (same weights), B trains without it "
        "from the same initialisation and data order. Gains are 1 - loss(A with) / loss(other). "
        "`twins`: share of held-out chunks for which at least 90% of the next chunk's tokens are "
        "in the retrieved neighbours and continuations.",
        "",
        f"![retrieval gain]({png})",
        "",
        "Every run of this script (newest last):",
        "",
        "| when | commit | CPU | corpus | steps | A with | A off | B | gain vs A off | vs B | twins |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in payload["history"]:
        for r in run["results"]:
            s = r["summary"]
            lines.append(
                f"| {run['when']} | {run['commit']} | {run['cpu']} | {r['corpus']} | {s['step']} | "
                f"{s['a_with']:.3f} | {s['a_without']:.3f} | {s['b']:.3f} | "
                f"{s['gain_vs_a_without']:.1%} | {s['gain_vs_b']:.1%} | {r['twin_coverage']:.0%} |")
    lines += ["", f"Learning curves of the last run ({payload['commit']}):", "",
              "| corpus | step | A with | A off | B | gain vs A off | vs B |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in payload["results"]:
        for a, b in zip(r["runs"]["A"][1:], r["runs"]["B"][1:]):
            lines.append(
                f"| {r['corpus']} | {a['step']} | {a['with_retrieval']:.3f} | "
                f"{a['without_retrieval']:.3f} | {b['without_retrieval']:.3f} | "
                f"{1 - a['with_retrieval'] / a['without_retrieval']:.1%} | "
                f"{1 - a['with_retrieval'] / b['without_retrieval']:.1%} |")
    return "\n".join(lines)


def add_run_args(p: argparse.ArgumentParser, work: str) -> None:
    """The options the training benchmarks share: batch, optimiser, K, seed, precision, and where
    to work (``benchmarks/_work/<work>``) and write results."""
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--wd", type=float, default=0.01)
    p.add_argument("--knn", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--work", default=str(REPO / "benchmarks" / "_work" / work))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--no-report", action="store_true", help="do not touch BENCHMARKS.md")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpora", default=",".join(CORPORA))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-at", type=lambda s: [int(x) for x in s.split(",")],
                   default=[100, 200, 400, 800, 1600])
    add_run_args(p, "retrieval_gain")
    p.add_argument("--diagnose", action="store_true", help="at every evaluation of run A also "
                   "record CCA attention shares, the gain by chunk offset and gradient norms")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("diablogpt_pytorch",):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [run_corpus(name, work, args) for name in args.corpora.split(",")]
    commit, cpu = _report.run_identity(REPO)
    payload = dict(commit=commit, cpu=cpu, steps=args.steps, batch_size=args.batch_size,
                   lr=args.lr, wd=args.wd, bf16=not args.no_bf16, results=results)
    for r in results:
        r["summary"] = summarise(r)
    payload["when"] = time.strftime("%Y-%m-%d", time.gmtime())
    json_path = out / "retrieval_gain.json"
    previous = json.loads(json_path.read_text()).get("history", []) if json_path.exists() else []
    payload["history"] = previous + [{  # every run of the script: its final figures
        **{k: v for k, v in payload.items() if k not in ("results", "history")},
        "results": [{k: v for k, v in r.items() if k != "runs"} for r in results]}]
    _report.write_atomically(json_path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2)))
    plot(payload, out / "retrieval_gain.png")
    if not args.no_report:
        png = os.path.relpath(out / "retrieval_gain.png", REPO)
        _report.write_section(REPO / "BENCHMARKS.md", "retrieval_gain", section(payload, png))

    print(f"\ncommit {commit}, {cpu}, {args.steps} steps of {args.batch_size} x "
          f"{CPU.max_seq_len} tokens")
    print(f"{'corpus':<16}{'A retr.':>9}{'A no-retr.':>11}{'B':>8}{'gain vs A-':>11}{'vs B':>8}"
          f"{'twins':>7}")
    for r in results:
        s = r["summary"]
        print(f"{r['corpus']:<16}{s['a_with']:>9.3f}{s['a_without']:>11.3f}{s['b']:>8.3f}"
              f"{s['gain_vs_a_without']:>10.1%}{s['gain_vs_b']:>8.1%}{r['twin_coverage']:>7.0%}")


if __name__ == "__main__":
    main()
