"""The `diablogpt` command line end to end on a tiny config: build-db, train (metrics, checkpoints,
TensorBoard, resume, loss plot, printed sample, the same losses as a plain loop, two ranks under
torchrun), eval, generate, neighbours; config-file and flag precedence; clear errors."""

import contextlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diablogpt_pytorch import DIABLOGPT
from diablogpt_pytorch.cli import CLIError, build_parser, resolve, run
from diablogpt_pytorch.corpus import default_corpus_documents

CONFIG = """
[model]
preset = "cpu"
max_seq_len = 64
enc_dim = 32
enc_depth = 1
dec_dim = 64
dec_depth = 2
dec_cross_attn_layers = [2]
heads = 2
dim_head = 16
chunk_size = 16

[database]
folder = "{root}/db"
documents = "{root}/docs"
glob = "*.txt"
knn = 2
knn_extra_neighbors = 8
valid_fraction = 0.2

[train]
out = "{root}/run"
steps = 4
batch_size = 2
log_every = 2
eval_every = 2
eval_batches = 1
checkpoint_every = 2
bf16 = false
device = "cpu"

[eval]
model = "{root}/run/model"
device = "cpu"

[generate]
model = "{root}/run/model"
max_new_tokens = 8
temperature = 0.0
device = "cpu"
"""


def _errors(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "docs").mkdir()
    for i, (name, text) in enumerate(default_corpus_documents().items()):
        if i % 10 == 0:
            (root / "docs" / name).write_text(text[:2000], encoding="utf-8")
    config = root / "tiny.toml"
    config.write_text(CONFIG.format(root=root.as_posix()))
    built = run(["build-db", "--config", str(config), "-q"])
    # --tensorboard: without TensorBoard installed a warning says so and training goes on
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = run(["train", "--config", str(config), "-q", "--tensorboard", str(root / "tb")])
    result["printed"] = printed.getvalue()
    return root, config, built, result


def test_build_db_and_train(trained):
    root, config, built, result = trained
    manifest = json.loads((root / "db" / "database.json").read_text())
    assert manifest["splits"]["train"]["counts"] == {k: built["train"][k]
                                                     for k in ("chunks", "docs", "seqs")}
    assert (manifest["chunk_size"], manifest["seq_len"]) == (16, 64)
    # train reused the database build-db made, then wrote the checkpoint and the model folder
    model = DIABLOGPT.from_pretrained(root / "run" / "model")
    assert model.config["dec_dim"] == 64 and model.config["dec_cross_attn_layers"] == [2]
    # the default LM tokenizer is a BPE trained on the documents, stored in the database folder;
    # the model was built with its exact vocabulary
    tok = manifest["tokenizer"]
    assert tok["kind"] == "tokenizers" and tok["path"] == "train.chunks.tokenizer.json"
    assert model.config["num_tokens"] == tok["vocab_size"] <= 4096
    assert model.config["pad_id"] == tok["pad_id"] == 0
    assert (root / "run" / "checkpoint.pt").is_file()
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    held = [r for r in records if "held_out/with_retrieval" in r]
    assert [r["step"] for r in train] == [2, 4] and [r["step"] for r in held] == [2, 4]
    assert all(r["train/tokens_per_s"] > 0 and r["train/lr"] > 0 for r in train)
    assert [h["step"] for h in result["held_out"]] == [2, 4]
    # what the main job shows: the loss plot, metrics.json, the held-out table and a sample
    summary = json.loads((root / "run" / "metrics.json").read_text())
    assert [c["step"] for c in summary["held_out_curve"]] == [2, 4]
    assert summary["held_out"]["with_retrieval"]["loss"] == result["held_out"][-1]["with_retrieval"]
    assert summary["steps"] == 4 and summary["world_size"] == 1 and len(result["losses"]) == 4
    if importlib.util.find_spec("matplotlib") is None:  # without the plot extra: no plot
        assert result["loss_plot"] is None and not (root / "run" / "loss.png").exists()
    else:
        assert (root / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["sample"] and f"sample: {result['sample']}" in result["printed"]
    assert summary["sample"] == result["sample"]
    assert "with retrieval" in result["printed"] and "without retrieval" in result["printed"]


def test_train_losses_equal_a_plain_loop(trained, tmp_path):
    """`diablogpt train` (the library's train_loop) gives, step by step, the losses of a plain
    few-line loop with the same seed, batch order, learning-rate schedule and accumulation."""
    from torch.utils.data import DataLoader

    from diablogpt_pytorch import TrainingWrapper
    from diablogpt_pytorch.cli import lm_tokenizer, model_config
    from diablogpt_pytorch.data import StepBatchSampler
    from diablogpt_pytorch.optim import get_optimizer, lr_schedule

    root, config, *_ = trained
    result = run(["train", "--config", str(config), "-q", "--out", str(tmp_path / "run"),
                  "--log-every", "1", "--grad-accum", "2", "--max-new-tokens", "0"])
    assert result["sample"] is None

    torch.manual_seed(0)
    cfg = resolve(build_parser().parse_args(["train", "--config", str(config)]))
    model = DIABLOGPT(**model_config(cfg["model"], lm_tokenizer(cfg["database"])))
    db = root / "db"
    wrapper = TrainingWrapper(
        diablogpt=model, knn=2, chunk_size=16, documents_path=root / "docs", glob="*.txt",
        chunks_memmap_path=db / "train.chunks.dat", seqs_memmap_path=db / "train.seq.dat",
        doc_ids_memmap_path=db / "train.doc_ids.dat", knn_extra_neighbors=8,
        valid_fraction=0.2, device="cpu", tokenizer="train", tokenizer_vocab_size=4096)
    optim = get_optimizer(model, lr=1e-3, wd=0.01)
    batches = iter(DataLoader(wrapper.train_ds,
                              batch_sampler=StepBatchSampler(len(wrapper.train_ds), 2, seed=0)))
    losses = []
    for step in range(4):
        for group in optim.param_groups:
            group["lr"] = lr_schedule(step, 4, 1e-3)
        total = 0.0
        for _ in range(2):
            seq, retrieved = next(batches)
            loss = model(seq, retrieved, return_loss=True) / 2
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad()
        losses.append(total)
    records = [json.loads(line) for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/loss"] for r in records if "train/loss" in r] == pytest.approx(losses, rel=1e-6)
    assert result["losses"] == pytest.approx(losses, rel=1e-6)
    assert len(set(losses)) == 4  # the steps differ: the comparison is not of constants


def test_train_under_two_ranks(trained, tmp_path):
    """`diablogpt train` under torchrun (2 ranks, gloo, CPU): DDP over the database build-db made;
    rank 0 alone writes the records, the model folder and metrics.json, and prints the sample;
    the checkpoint loads in one process."""
    from test_distributed import assert_ok, free_port

    from diablogpt_pytorch.checkpoint import load_model

    root, config, *_ = trained
    out = tmp_path / "run"
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=str(Path(__file__).parent.parent) + os.pathsep
                   + os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "diablogpt_pytorch.cli", "train", "--config", str(config),
             "--out", str(out), "--batch-size", "1", "--max-new-tokens", "4"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    printed, results = [], []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank was still running after 600 s: it hung")
        printed.append(stdout)
        results.append((p.returncode, stderr))
    assert_ok(results)
    assert "sample:" in printed[0] and "x 2 ranks" in printed[0] and printed[1] == ""
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["world_size"] == 2 and [c["step"] for c in summary["held_out_curve"]] == [2, 4]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [2, 4]  # written once
    assert DIABLOGPT.from_pretrained(out / "model").config["dec_dim"] == 64
    assert load_model(out / "checkpoint.pt").config["dec_dim"] == 64


def test_eval_generate_neighbours(trained, capsys):
    root, config, *_ = trained
    metrics = run(["eval", "--config", str(config), "-q", "--output", str(root / "eval.json")])
    for key in ("with_retrieval", "without_retrieval"):
        assert metrics[key]["tokens"] > 0 and metrics[key]["bits_per_byte"] > 0
    assert json.loads((root / "eval.json").read_text())["with_retrieval"]["loss"] == \
        metrics["with_retrieval"]["loss"]
    assert json.loads(capsys.readouterr().out) == json.loads((root / "eval.json").read_text())

    text = run(["generate", "--config", str(config), "-q", "--prompt",
                "a list is a mutable sequence of items that"])
    assert capsys.readouterr().out.startswith("a list is a mutable sequence of items that")
    assert text == run(["generate", "--config", str(config), "-q", "--prompt",
                        "a list is a mutable sequence of items that"])  # greedy: the same
    capsys.readouterr()

    shown = run(["neighbours", "--config", str(config), "-q", "--chunk", "3"])
    out = capsys.readouterr().out
    assert out.startswith("chunk 3 (document ") and len(shown) == 2
    assert all(s["text"] in out and s["document"] != shown[0]["document"] or s is shown[0]
               for s in shown)
    by_text = run(["neighbours", "--config", str(config), "-q", "--text",
                   "the list is a mutable sequence", "--k", "3"])
    assert len(by_text) == 3 and by_text[0]["score"] >= by_text[-1]["score"]


def test_tensorboard_and_resume(trained):
    pytest.importorskip("tensorboard", reason="TensorBoard is not installed: pip install tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, config, *_ = trained
    result = run(["train", "--config", str(config), "-q", "--resume", "--steps", "6",
                  "--tensorboard", str(root / "tb")])
    assert result["resumed_from"] == 4
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [2, 4, 6]
    events = EventAccumulator(str(root / "tb"))
    events.Reload()
    tags = {"train/loss", "train/lr", "train/tokens_per_s", "held_out/with_retrieval",
            "held_out/without_retrieval"}
    assert tags <= set(events.Tags()["scalars"])
    for tag in tags:  # the first run's records and the resumed run's, none twice
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [2, 4, 6], tag
        assert all(s.value > 0 for s in scalars), tag
        assert [s.value for s in scalars] == pytest.approx(
            [r[tag] for r in records if tag in r], rel=1e-6), tag


def test_config_file_and_flag_precedence(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[train]\nsteps = 7\nlr = 0.5\n[model]\ndec_dim = 96\n')
    parse = build_parser().parse_args
    cfg = resolve(parse(["train", "--config", str(config), "--steps", "3", "--no-bf16"]))
    assert cfg["train"]["steps"] == 3          # flag over file
    assert cfg["train"]["lr"] == 0.5           # file over default
    assert cfg["train"]["batch_size"] == 4     # default
    assert cfg["train"]["bf16"] is False and cfg["model"]["dec_dim"] == 96
    cfg = resolve(parse(["train", "--dec-cross-attn-layers", "1,2"]))
    assert cfg["model"]["dec_cross_attn_layers"] == [1, 2] and cfg["train"]["steps"] == 150
    assert (cfg["database"]["tokenizer"], cfg["database"]["tokenizer_vocab_size"]) == ("train", 4096)
    assert cfg["database"]["index"] == "auto" and cfg["database"]["rescore"] is None
    cfg = resolve(parse(["build-db", "--index", "IVF4,PQ8np", "--rescore", "0"]))
    assert (cfg["database"]["index"], cfg["database"]["rescore"]) == ("IVF4,PQ8np", 0)
    cfg = resolve(parse(["train", "--tokenizer", "bert", "--vocab-size", "512"]))
    assert (cfg["database"]["tokenizer"], cfg["database"]["tokenizer_vocab_size"]) == ("bert", 512)
    # one file serves every command: eval reads of [database] only the folder
    config.write_text('[database]\nfolder = "x/db"\nknn = 3\n[eval]\nbatch_size = 2\n')
    cfg = resolve(parse(["eval", "--config", str(config)]))
    assert cfg["database"] == {"folder": "x/db"} and cfg["eval"]["batch_size"] == 2


def test_yaml_config(tmp_path):
    pytest.importorskip("yaml", reason="YAML configs need PyYAML (pip install pyyaml)")
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  steps: 7\n  lr: 0.5\nmodel:\n  dec_cross_attn_layers: [1, 2]\n")
    cfg = resolve(build_parser().parse_args(["train", "--config", str(config), "--steps", "3"]))
    assert cfg["train"]["steps"] == 3 and cfg["train"]["lr"] == 0.5
    assert cfg["model"]["dec_cross_attn_layers"] == [1, 2]
    config.write_text("train:\n  stpes: 3\n")
    with pytest.raises(CLIError, match="\\[train\\] has no key 'stpes'"):
        resolve(build_parser().parse_args(["train", "--config", str(config)]))


def test_clear_errors(trained, tmp_path, capsys):
    root, config, *_ = trained
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nstpes = 3\n")
    assert "[train] has no key 'stpes'" in _errors(["train", "--config", str(bad)], capsys)
    bad.write_text("[trian]\nsteps = 3\n")
    assert "unknown section [trian]" in _errors(["train", "--config", str(bad)], capsys)
    bad.write_text('[train]\nsteps = "many"\n')
    assert "'many' is not a valid int" in _errors(["train", "--config", str(bad)], capsys)

    err = _errors(["eval", "--config", str(config), "--db", str(tmp_path / "nowhere")], capsys)
    assert "no retrieval database" in err and "build-db" in err
    torch.manual_seed(0)
    DIABLOGPT(max_seq_len=64, enc_dim=32, enc_depth=1, dec_dim=32, dec_depth=2,
              dec_cross_attn_layers=(2,), heads=2, dim_head=16,
              chunk_size=8).save_pretrained(tmp_path / "other")
    err = _errors(["generate", "--config", str(config), "--model", str(tmp_path / "other")], capsys)
    assert "does not match the database" in err and "chunk_size 8 != the database's 16" in err
    # the database folder moves as a whole (its trained tokenizer inside); a changed tokenizer
    # file is refused
    shutil.copytree(root / "db", tmp_path / "moved_db")
    args = ["generate", "--config", str(config), "-q", "--prompt", "a list is"]
    assert run(args + ["--db", str(tmp_path / "moved_db")]) == run(args)
    capsys.readouterr()
    tok = tmp_path / "moved_db" / "train.chunks.tokenizer.json"
    tok.write_text(json.dumps(json.loads(tok.read_text()), indent=3))  # same tokens, other bytes
    err = _errors(args + ["--db", str(tmp_path / "moved_db")], capsys)
    assert "differs from the one the database" in err and "rebuild the database" in err
    err = _errors(["train", "--config", str(config), "--resume", "--dec-dim", "32"], capsys)
    assert "different config" in err and "dec_dim" in err


def test_help_of_every_command():
    for command in ("build-db", "train", "eval", "generate", "neighbours", "add-docs",
                    "remove-docs"):
        out = subprocess.run([sys.executable, "-m", "diablogpt_pytorch.cli", command, "--help"],
                             capture_output=True, text=True, cwd=Path(__file__).parent.parent)
        assert out.returncode == 0 and "--config" in out.stdout and command in out.stdout


def test_loss_plot_without_matplotlib_is_skipped_with_one_warning(tmp_path, monkeypatch, caplog):
    import logging

    from diablogpt_pytorch.train_loop import plot_losses

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the plot extra were not installed
    with caplog.at_level(logging.WARNING, logger="diablogpt_pytorch.train_loop"):
        assert plot_losses(tmp_path / "loss.png", [3.0, 2.0], []) is None
    assert not (tmp_path / "loss.png").exists()
    assert len(caplog.records) == 1 and "pip install 'diablogpt-pytorch[plot]'" in caplog.text


def test_evaluation_steps():
    from diablogpt_pytorch.train_loop import evaluation_steps

    assert evaluation_steps(150, evals=4) == [38, 75, 112, 150]
    assert evaluation_steps(150, eval_every=50) == [50, 100, 150]
    assert evaluation_steps(7, eval_every=0) == [7]


def test_add_docs_and_remove_docs(trained, tmp_path, capsys):
    """Issue 17: the incremental update from the command line, on a copy of the tiny database."""
    root, config, built, _ = trained
    db = tmp_path / "db"
    shutil.copytree(root / "db", db)
    names = sorted(default_corpus_documents())
    new = tmp_path / "new.txt"  # a document the database does not hold
    new.write_text(default_corpus_documents()[names[5]][:1500], encoding="utf-8")
    chunks = built["train"]["chunks"]

    added = run(["add-docs", "--config", str(config), "-q", "--db", str(db), str(new)])
    assert added["documents_added"] == 1 and added["chunks"] == chunks + added["chunks_added"] > chunks
    assert json.loads(capsys.readouterr().out) == added
    manifest = json.loads((db / "database.json").read_text())
    assert manifest["splits"]["train"]["counts"]["chunks"] == added["chunks"]
    err = _errors(["add-docs", "--config", str(config), "--db", str(db), str(new)], capsys)
    assert "new.txt" in err  # a duplicate is refused, naming the file
    assert run(["add-docs", "--config", str(config), "-q", "--db", str(db), str(new),
                "--duplicates", "skip"])["documents_added"] == 0
    capsys.readouterr()

    removed = run(["remove-docs", "--config", str(config), "-q", "--db", str(db), str(new)])
    assert removed["documents_removed"] == 1 and removed["chunks"] == chunks
    capsys.readouterr()
    # the database is the original again: neighbours read it
    assert len(run(["neighbours", "--config", str(config), "-q", "--db", str(db), "--chunk", "0"])) == 2
    capsys.readouterr()

    err = _errors(["remove-docs", "--config", str(config), "--db", str(db), str(new)], capsys)
    assert "matches no document" in err
    err = _errors(["remove-docs", "--config", str(config), "--db", str(db), "100000"], capsys)
    assert "document id 100000 is not in the database" in err
    err = _errors(["add-docs", "--config", str(config), "--db", str(db),
                   str(tmp_path / "missing.txt")], capsys)
    assert "missing.txt" in err and "is not a file" in err
    err = _errors(["add-docs", "--config", str(config), "--db", str(tmp_path / "nowhere"),
                   str(new)], capsys)
    assert "no retrieval database" in err


def test_train_refuses_a_bad_evals_before_building(tmp_path, capsys):
    err = _errors(["train", "--evals", "0", "--out", str(tmp_path / "run")], capsys)
    assert "--evals 0" in err and not (tmp_path / "run").exists()
