"""A run killed at any moment resumes: real llama3_8b --smoke processes killed with SIGKILL between checkpoints, left
with the newest checkpoint half written, or stopped with SIGTERM; each resumes with --resume and ends with the same
losses, step by step, as a run never interrupted, each step in metrics.jsonl once."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, read_jsonl, run_folders, run_to_completion

# Checkpoints every 4 steps (save_steps = eval_steps); 40 steps leave time to interrupt mid-run on a fast CPU.
FLAGS = ("--smoke", "--max-steps", "40", "--eval-steps", "4", "--sample-prompts", "1")
# Resuming restores the weights, optimizer, scheduler, RNG and data order exactly: the losses after it are the same
# computation on the same numbers, so they agree to float rounding (the CPU backend may compute in bf16).
LOSS_TOLERANCE = 1e-4


def losses(folder: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(folder / "metrics.jsonl") if "loss" in r]


def start(output_dir: Path) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "recipes.llama3_8b", *FLAGS, "--output-dir", str(output_dir)],
                            cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(process: subprocess.Popen, output_dir: Path, step: int) -> Path:
    """The run's folder once its metrics show `step` trained; fails if the run ends first."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the run ended before step {step}:\n{process.stdout.read()[-3000:]}"
        folders = run_folders(output_dir, "llama3_8b")
        if folders and (folders[0] / "metrics.jsonl").exists():
            if any(s >= step for s, _ in losses(folders[0])):
                return folders[0]
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within 300 s")


def resume(folder: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "recipes.llama3_8b", "--resume", str(folder)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert (folder / "results.md").exists()
    return result.stdout


def assert_same_losses_as(uninterrupted: Path, resumed: Path):
    expected, got = losses(uninterrupted), losses(resumed)
    assert [s for s, _ in got] == [s for s, _ in expected] == list(range(1, 41))  # every step once
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in expected], rel=LOSS_TOLERANCE)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    return run_to_completion("llama3_8b", *FLAGS, output_dir=tmp_path_factory.mktemp("uninterrupted"))[0]


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Path:
    """A run killed with SIGKILL at step 10 or later: after checkpoint-8, before checkpoint-12 is likely."""
    output_dir = tmp_path_factory.mktemp("killed")
    process = start(output_dir)
    folder = wait_for_step(process, output_dir, 10)
    process.kill()
    process.wait()
    return folder


def test_sigkill_between_checkpoints_resumes_from_the_last_one(uninterrupted, killed, tmp_path):
    folder = tmp_path / killed.name
    shutil.copytree(killed, folder)
    assert not (folder / "results.md").exists()
    stdout = resume(folder)
    assert "resume: continuing from checkpoint-" in stdout
    assert_same_losses_as(uninterrupted, folder)


def test_a_checkpoint_half_written_when_killed_is_skipped(uninterrupted, killed, tmp_path):
    """The Trainer writes trainer_state.json last: a kill during a checkpoint's write leaves the folder without it,
    which is what this makes of the newest checkpoint, deterministically."""
    folder = tmp_path / killed.name
    shutil.copytree(killed, folder)
    checkpoints = sorted((folder / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(checkpoints) >= 2, [c.name for c in checkpoints]
    newest = checkpoints[-1]
    (newest / "trainer_state.json").unlink()
    stdout = resume(folder)
    assert f"resume: skipping {newest.name} (no trainer_state.json: written when the run was killed)" in stdout
    assert f"resume: continuing from {checkpoints[-2].name}" in stdout
    assert_same_losses_as(uninterrupted, folder)


def test_sigterm_finishes_the_step_checkpoints_marks_stopped_and_resumes(uninterrupted, tmp_path):
    process = start(tmp_path)
    folder = wait_for_step(process, tmp_path, 10)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    stopped = (folder / "STOPPED").read_text()
    step = int(stopped.split("stopped after step ")[1].split()[0])
    assert stopped.startswith(f"stopped after step {step} on SIGTERM; continue with: ./run.sh llama3_8b --resume ")
    assert 10 <= step < 40 and (folder / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").exists()
    assert "SIGTERM: stopping after this step" in output and not (folder / "FAILED").exists()
    resume(folder)
    assert_same_losses_as(uninterrupted, folder)


def test_one_signal_asks_for_a_checkpointed_stop_and_a_second_stops_at_once():
    from transformers import TrainerControl, TrainerState
    from common.callbacks import StopOnRequest
    stop, control = StopOnRequest(), TrainerControl()
    stop.on_train_begin(None, TrainerState(), control)
    try:
        assert signal.getsignal(signal.SIGTERM) == stop._ask_to_stop
        stop.on_step_end(None, TrainerState(global_step=3), control)
        assert not control.should_training_stop  # nothing asked yet
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal == signal.SIGINT
        stop.on_step_end(None, TrainerState(global_step=4), control)
        assert control.should_save and control.should_training_stop
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.on_train_end(None, TrainerState(), control)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
