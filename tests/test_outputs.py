"""Run folders are never overwritten, a failed run is marked FAILED, and a stopped run is resumable."""
import hashlib
import json
from dataclasses import dataclass

import pytest

from common.config import RunOptions
from common.errors import UserError
from common.outputs import RunFolder, checkpoint_problem, manifest, package_versions
from tests.conftest import read_jsonl
from common.hardware import Hardware


def test_two_runs_in_the_same_second_get_two_folders(tmp_path):
    first = RunFolder.create("demo", str(tmp_path))
    (first.path / "marker").write_text("first")
    second = RunFolder.create("demo", str(tmp_path))
    assert first.path != second.path and second.path.name.startswith(first.path.name[:15])
    assert (first.path / "marker").read_text() == "first" and not (second.path / "marker").exists()


def test_failure_marks_the_folder_and_leaves_no_results(tmp_path):
    folder = RunFolder.create("demo", str(tmp_path))
    with pytest.raises(RuntimeError):
        with folder:
            raise RuntimeError("CUDA error: device-side assert\nmore detail")
    assert (folder.path / "FAILED").read_text() == "RuntimeError: CUDA error: device-side assert\n"
    assert not (folder.path / "results.md").exists()


def test_out_of_memory_is_recorded_with_the_flags_that_lower_memory(tmp_path):
    folder = RunFolder.create("demo", str(tmp_path))
    with pytest.raises(RuntimeError):
        with folder:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    reason = (folder.path / "FAILED").read_text()
    assert "--per-device-train-batch-size" in reason and "--max-seq-length" in reason


def write_checkpoint(folder: RunFolder, step: int, skip: str | None = None, state_step: int | None = None):
    """A checkpoint folder as the Trainer writes it, optionally without one file or with another step in its state."""
    checkpoint = folder.checkpoints / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        if name != skip:
            (checkpoint / name).write_bytes(b"x")
    if skip != "trainer_state.json":
        (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": state_step or step}))
    return checkpoint


def test_a_checkpoint_is_complete_only_with_every_file_the_trainer_resumes_from(tmp_path):
    folder = RunFolder.create("demo", str(tmp_path))
    assert checkpoint_problem(write_checkpoint(folder, 2)) is None
    assert checkpoint_problem(write_checkpoint(folder, 4, skip="optimizer.pt")) == "no optimizer.pt"
    assert checkpoint_problem(write_checkpoint(folder, 6, skip="trainer_state.json")) == "no trainer_state.json"
    assert checkpoint_problem(write_checkpoint(folder, 8, state_step=6)) == "trainer_state.json at step 6"
    half_written = write_checkpoint(folder, 10)
    (half_written / "trainer_state.json").write_text('{"global_st')
    assert checkpoint_problem(half_written) == "trainer_state.json unreadable"
    assert folder.last_checkpoint().endswith("checkpoint-2")


def test_resume_continues_from_the_newest_complete_checkpoint_and_removes_the_rest(tmp_path, capsys):
    folder = RunFolder.create("demo", str(tmp_path))
    folder.metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 15)))
    for step in (4, 8):
        write_checkpoint(folder, step)
    write_checkpoint(folder, 12, skip="trainer_state.json")  # killed while the Trainer wrote it
    (folder.path / "FAILED").write_text("interrupted\n")
    reopened = RunFolder.reopen(str(folder.path))
    assert reopened.last_checkpoint().endswith("checkpoint-8") and not (folder.path / "FAILED").exists()
    assert [c.name for c in reopened.checkpoint_folders()] == ["checkpoint-4", "checkpoint-8"]
    assert [r["step"] for r in read_jsonl(folder.metrics)] == list(range(1, 9))
    out = capsys.readouterr().out
    assert "resume: skipping checkpoint-12 (no trainer_state.json: written when the run was killed)" in out
    assert "resume: continuing from checkpoint-8" in out


def test_resume_without_a_complete_checkpoint_trains_again_from_step_0_in_the_same_folder(tmp_path, capsys):
    folder = RunFolder.create("demo", str(tmp_path))
    folder.metrics.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    write_checkpoint(folder, 2, skip="scheduler.pt")
    reopened = RunFolder.reopen(str(folder.path))
    assert reopened.path == folder.path and reopened.last_checkpoint() is None
    assert folder.metrics.read_text() == "" and reopened.checkpoint_folders() == []
    assert "no complete checkpoint in" in capsys.readouterr().out
    folder.write_results("# done", loss_curves={})
    with pytest.raises(UserError, match="already completed"):
        RunFolder.reopen(str(folder.path))


def test_metrics_after_the_checkpoint_are_dropped_on_resume(tmp_path):
    folder = RunFolder.create("demo", str(tmp_path))
    folder.metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 8)))
    kept = folder.trim_metrics_after(4)
    assert [r["step"] for r in kept] == [1, 2, 3, 4]
    assert len(folder.metrics.read_text().splitlines()) == 4


def test_config_and_manifest_record_what_reproduces_the_run(tmp_path):
    @dataclass
    class Card:
        learning_rate: float = 1e-4

    folder = RunFolder.create("demo", str(tmp_path))
    folder.write_config(Card(), RunOptions(smoke=True), "demo")
    saved = json.loads((folder.path / "config.json").read_text())
    assert saved["hyperparameters"] == {"learning_rate": 1e-4} and saved["run"]["smoke"] is True
    assert saved["recipe"] == "demo"
    data_file = tmp_path / "d.jsonl"
    data_file.write_text("{}\n")
    record = manifest("demo", Hardware("NVIDIA H100", "9.0", "fp32"), 7, {"source": str(data_file)}, "bf16", optimizer="x")
    assert record["gpu"] == "NVIDIA H100" and record["seed"] == 7
    assert record["precision"] == "bf16" and record["precision_requested"] == "fp32"
    assert record["data"]["sha256"] == hashlib.sha256(b"{}\n").hexdigest()
    # The versions of the packages this process imported, as they report themselves (not read from the installed
    # metadata, as the manifest reads them): no version pinned here, any installed one passes if recorded correctly.
    import sys

    import torch
    import transformers
    assert record["packages"] == package_versions()
    assert record["packages"]["transformers"] == transformers.__version__
    assert record["packages"]["torch"] == torch.__version__
    assert record["packages"]["python"] == "{}.{}.{}".format(*sys.version_info[:3])


def test_report_to_checks_each_logger(monkeypatch):
    import importlib.util

    from common.report import loggers
    assert loggers("none") == ["none"]
    assert loggers("tensorboard") == ["tensorboard"]
    with pytest.raises(UserError, match=r"^--report-to mlflow: use none or some of tensorboard, wandb, trackio$"):
        loggers("mlflow")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"^--report-to wandb: the wandb package is not installed; pip install wandb$"):
        loggers("wandb")


def test_each_training_log_is_one_short_line_above_the_progress_bar():
    import types

    from common.callbacks import ReadableProgress
    progress, written = ReadableProgress(), []
    progress.training_bar = types.SimpleNamespace(write=written.append)
    state = types.SimpleNamespace(is_world_process_zero=True, global_step=8, max_steps=12)
    progress.on_log(None, state, None, logs={"loss": 6.89123, "grad_norm": 0.3945, "learning_rate": 1e-3, "epoch": 0.5})
    progress.on_log(None, state, None, logs={"eval_loss": 6.9, "eval_runtime": 7.4})  # MetricsRecorder says this one
    assert written == ["step 8/12: loss 6.8912, grad norm 0.395, lr 0.001"]
