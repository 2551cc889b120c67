"""Training metrics: MetricsLogger's JSON Lines and TensorBoard records, and the main job
(examples/train.py, over `diablogpt train`) writing TensorBoard event files and periodic checkpoints."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diablogpt_pytorch.corpus import default_corpus_documents
from diablogpt_pytorch.tracking import MetricsLogger

ROOT = Path(__file__).parent.parent
TAGS = {"train/loss", "train/lr", "train/tokens_per_s", "held_out/with_retrieval",
        "held_out/without_retrieval"}


def _event_scalars(folder: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(s.step, s.value) for s in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_jsonl_records_and_resume(tmp_path):
    path = tmp_path / "m" / "metrics.jsonl"
    with MetricsLogger(path) as tracker:
        for step in (1, 2, 3):
            tracker.log(step, **{"train/loss": 4.0 - step, "train/lr": None})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": s, "train/loss": 4.0 - s} for s in (1, 2, 3)]
    MetricsLogger(path, start_step=2).close()  # a run resumed at step 2 drops the later records
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    MetricsLogger(path).close()  # a fresh run starts an empty file
    assert path.read_text() == ""


def test_without_tensorboard_a_warning_and_no_event_files(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    with caplog.at_level(logging.WARNING, logger="diablogpt_pytorch.tracking"):
        tracker = MetricsLogger(tmp_path / "metrics.jsonl", tmp_path / "tb")
    assert "TensorBoard is not installed" in caplog.text and "pip install tensorboard" in caplog.text
    tracker.log(1, **{"train/loss": 2.0})
    tracker.close()
    assert not (tmp_path / "tb").exists()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "train/loss": 2.0}


def test_tensorboard_scalars_read_back(tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard is not installed: pip install tensorboard")
    with MetricsLogger(None, tmp_path / "tb") as tracker:
        tracker.log(5, **{"train/loss": 2.5, "held_out/with_retrieval": 3.25})
        tracker.log(10, **{"train/loss": 2.0})
    assert _event_scalars(tmp_path / "tb") == {"train/loss": [(5, 2.5), (10, 2.0)],
                                               "held_out/with_retrieval": [(5, 3.25)]}


def test_main_job_writes_event_files_and_periodic_checkpoints(tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard is not installed: pip install tensorboard")
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, (name, text) in enumerate(default_corpus_documents().items()):
        if i % 10 == 0:
            (docs / name).write_text(text[:3000], encoding="utf-8")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train.py"), "--device", "cpu", "--docs",
         str(docs), "--out", str(tmp_path / "run"), "--steps", "4", "--batch-size", "2",
         "--evals", "2", "--log-every", "2", "--checkpoint-every", "2", "--tensorboard",
         str(tmp_path / "tb"), "--max-new-tokens", "4", "--vocab-size", "512", "--no-bf16"],
        capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "saved checkpoint at step 2" in out.stderr and "saved checkpoint at step 4" in out.stderr
    assert "sample: " in out.stdout and "with retrieval" in out.stdout  # the main job's report
    scalars = _event_scalars(tmp_path / "tb")
    assert TAGS <= set(scalars)
    for tag in TAGS:
        assert [step for step, _ in scalars[tag]] == [2, 4], tag
        assert all(value > 0 for _, value in scalars[tag]), tag
    records = [json.loads(line) for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # the event files hold what the run reports: its held-out curve and the jsonl records
    assert [v for _, v in scalars["held_out/with_retrieval"]] == pytest.approx(
        [c["with_retrieval"] for c in summary["held_out_curve"]], rel=1e-6)
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(
        [r["train/loss"] for r in records if "train/loss" in r], rel=1e-6)
