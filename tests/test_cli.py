"""The `diablogpt` command line end to end on a tiny config: build-db, train (metrics, checkpoints,
TensorBoard, resume), eval, generate, neighbours; config-file and flag precedence; clear errors."""

import json
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
    result = run(["train", "--config", str(config), "-q", "--tensorboard", str(root / "tb")])
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
    for command in ("build-db", "train", "eval", "generate", "neighbours"):
        out = subprocess.run([sys.executable, "-m", "diablogpt_pytorch.cli", command, "--help"],
                             capture_output=True, text=True, cwd=Path(__file__).parent.parent)
        assert out.returncode == 0 and "--config" in out.stdout and command in out.stdout
