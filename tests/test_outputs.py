"""Run folders are never overwritten, a failed run is marked FAILED, and a stopped run is resumable."""
import hashlib
import json
from dataclasses import dataclass

import pytest

from common.config import RunOptions
from common.errors import UserError
from common.outputs import RunFolder, manifest, package_versions
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


def test_resume_refuses_completed_or_checkpointless_runs(tmp_path):
    folder = RunFolder.create("demo", str(tmp_path))
    with pytest.raises(UserError, match="no checkpoint saved there yet"):
        RunFolder.reopen(str(folder.path))
    (folder.checkpoints / "checkpoint-4").mkdir(parents=True)
    (folder.checkpoints / "checkpoint-12").mkdir()
    (folder.path / "FAILED").write_text("interrupted\n")
    reopened = RunFolder.reopen(str(folder.path))
    assert reopened.last_checkpoint().endswith("checkpoint-12") and not (folder.path / "FAILED").exists()
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
    folder.write_config(Card(), RunOptions(smoke=True))
    saved = json.loads((folder.path / "config.json").read_text())
    assert saved["hyperparameters"] == {"learning_rate": 1e-4} and saved["run"]["smoke"] is True
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


def test_report_to_checks_each_logger_and_sends_tensorboard_into_the_run(tmp_path, monkeypatch):
    import importlib.util
    import os

    from common.report import loggers
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    assert loggers("none", tmp_path / "tb") == ["none"] and "TENSORBOARD_LOGGING_DIR" not in os.environ
    assert loggers("tensorboard", tmp_path / "tb") == ["tensorboard"]
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "tb")
    with pytest.raises(UserError, match=r"^--report-to mlflow: use none or some of tensorboard, wandb, trackio$"):
        loggers("mlflow", tmp_path / "tb")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"^--report-to wandb: the wandb package is not installed; pip install wandb$"):
        loggers("wandb", tmp_path / "tb")
