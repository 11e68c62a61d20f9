"""./run.sh <recipe> --gpus 2 on CPU: two torchrun processes (gloo) through Unsloth's CPU backend, as on two GPUs.
One run folder, the card's effective batch kept, each row of the epoch trained once by exactly one rank, and a run
stopped on 2 processes resumed on 2 with the same losses as one never stopped. The rows each rank trains are recorded
by tests/rows_recorder/sitecustomize.py (on PYTHONPATH for these runs only)."""
import json
import math
import os
import random
import signal
import subprocess
import time

import pytest

from tests.conftest import REPO, read_jsonl, run_folders

STEPS = 8  # 40 conversations, 20% held out: 32 train rows, 4 a step (2 rows x 1 accumulation x 2 ranks): one epoch
LOSS_TOLERANCE = 1e-4  # a resumed run repeats the same computation: only float rounding may differ


def conversations(count: int) -> list[dict]:
    """Short, distinct conversations: every row's tokens differ, so a recorded row names one conversation."""
    rng = random.Random(0)
    words = "model data train answer question token batch step adapter weight loss layer".split()
    return [{"messages": [{"role": "user", "content": f"question {i}: " + " ".join(rng.choices(words, k=6))},
                          {"role": "assistant", "content": f"answer {i}: " + " ".join(rng.choices(words, k=12))}]}
            for i in range(count)]


def run_sh(*args, rows_log=None, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests" / "rows_recorder")}
    env.pop("FT_PRECISION", None)
    if rows_log is not None:
        rows_log.mkdir(parents=True, exist_ok=True)
        env["ROWS_LOG"] = str(rows_log)
    return subprocess.run([str(REPO / "run.sh"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def losses(folder) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(folder / "metrics.jsonl") if "loss" in r]


def rows_by_rank(rows_log) -> dict[int, list[tuple[int, ...]]]:
    return {rank: [tuple(row) for line in read_jsonl(rows_log / f"rank{rank}.jsonl") for row in line["rows"]]
            for rank in (0, 1)}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in conversations(40)))
    return path


def flags(data_file, output_dir) -> list[str]:
    # The smoke preset's accumulation of 1 does not divide over 2: a smoke run keeps it on each process, as
    # `./run.sh llama3_8b --smoke --gpus 2` on a CPU machine does.
    return ["llama3_8b", "--smoke", "--gpus", "2", "--data", str(data_file),
            "--max-steps", str(STEPS), "--eval-steps", "4", "--sample-prompts", "1", "--output-dir", str(output_dir)]


@pytest.fixture(scope="module")
def two_process_run(data_file, tmp_path_factory):
    work = tmp_path_factory.mktemp("two")
    result = run_sh(*flags(data_file, work / "outputs"), rows_log=work / "rows")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return work, result


def test_two_processes_write_one_run_with_the_cards_effective_batch(two_process_run):
    work, result = two_process_run
    (folder,) = run_folders(work / "outputs", "llama3_8b")  # rank 1 wrote no folder of its own
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["batch"] == {"world_size": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                                 "effective_batch": 4}
    assert manifest["world_size"] == 2 and len(manifest["peak_gpu_memory_gib_per_gpu"]) == 2
    assert manifest["tokens_per_s_per_gpu"] == pytest.approx(manifest["tokens_per_s"] / 2)
    assert json.loads((folder / "config.json").read_text())["world_size"] == 2
    steps = losses(folder)
    assert [step for step, _ in steps] == list(range(1, STEPS + 1))  # one metrics line a step, not one a rank
    assert all(math.isfinite(loss) for _, loss in steps)
    assert (folder / "adapter" / "adapter_model.safetensors").is_file() and (folder / "results.md").is_file()
    assert "on 2 CPU processes together" in (folder / "results.md").read_text()
    assert result.stdout.count("done: kept step") == 1  # rank 1's output is silenced


def test_each_row_of_the_epoch_is_trained_once_by_one_rank(two_process_run):
    work, _ = two_process_run
    (folder,) = run_folders(work / "outputs", "llama3_8b")
    train_rows = json.loads((folder / "manifest.json").read_text())["data"]["train"]
    ranks = rows_by_rank(work / "rows")
    assert len(ranks[0]) == len(ranks[1]) == STEPS * 2  # each rank: 2 rows a step
    assert not set(ranks[0]) & set(ranks[1])  # no row on both ranks
    trained = ranks[0] + ranks[1]
    assert len(trained) == len(set(trained)) == train_rows == 32  # every training row once


def test_a_run_stopped_on_two_processes_resumes_on_two_with_the_same_losses(two_process_run, data_file, tmp_path):
    work, _ = two_process_run
    (uninterrupted,) = run_folders(work / "outputs", "llama3_8b")
    stopped = run_sh(*flags(data_file, tmp_path / "outputs"), "--stop-after-step", "4")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    (folder,) = run_folders(tmp_path / "outputs", "llama3_8b")
    assert (folder / "STOPPED").read_text().strip().endswith(f"--resume {folder} --gpus 2")
    assert sorted(p.name for p in (folder / "checkpoints" / "checkpoint-4").glob("rng_state*")) == [
        "rng_state_0.pth", "rng_state_1.pth"]

    on_one = run_sh("llama3_8b", "--resume", str(folder))
    assert on_one.returncode == 2
    assert on_one.stderr.strip().splitlines()[-1] == (
        f"error: --resume {folder}: that run trained on 2 GPU(s) and its checkpoints hold 2 ranks' states; resume it "
        f"with --gpus 2")

    resumed = run_sh("llama3_8b", "--resume", str(folder), "--gpus", "2")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert "resume: continuing from checkpoint-4" in resumed.stdout
    got, expected = losses(folder), losses(uninterrupted)
    assert [step for step, _ in got] == list(range(1, STEPS + 1))
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in expected], rel=LOSS_TOLERANCE)


def test_an_accumulation_that_does_not_divide_is_one_line_unless_a_smoke_run(monkeypatch, capsys):
    from common.distributed import accumulation_per_rank
    from common.errors import UserError
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert accumulation_per_rank(8, False) == 4 and accumulation_per_rank(8, True) == 8
    with pytest.raises(UserError, match=r"^--gradient-accumulation-steps 1 does not divide over 2 GPUs, so the card's "
                                        r"effective batch cannot be kept; pass a multiple of 2, or --scale-batch"):
        accumulation_per_rank(1, False)
    assert accumulation_per_rank(1, False, smoke=True) == 1
    assert "smoke: accumulation 1 does not divide over 2 processes; each keeps it" in capsys.readouterr().out


def test_a_one_process_study_refuses_several(tmp_path):
    result = run_sh("gpt2_medium_qlora", "--smoke", "--gpus", "2", "--output-dir", str(tmp_path / "outputs"))
    assert result.returncode == 2
    assert result.stderr.count("error: gpt2_medium_qlora runs in one process (its study trains several runs one after "
                               "another and compares their weights); start it without --gpus / torchrun") == 1
    assert "Traceback" not in result.stderr and "exitcode" not in result.stderr
    assert not run_folders(tmp_path / "outputs", "gpt2_medium_qlora")


def test_sigterm_to_the_launcher_stops_both_ranks_after_the_same_step_with_a_checkpoint(data_file, tmp_path):
    """torchrun passes the signal to one rank, then the other: they agree on the step to stop after, rank 0 checkpoints
    (each rank its RNG state) and marks the run STOPPED, and ./run.sh exits 128 + SIGTERM."""
    output_dir = tmp_path / "outputs"
    arguments = flags(data_file, output_dir)
    arguments[arguments.index("--max-steps") + 1] = "400"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("FT_PRECISION", None)
    process = subprocess.Popen([str(REPO / "run.sh"), *arguments], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not any((folder / "metrics.jsonl").exists() and losses(folder)
                  for folder in run_folders(output_dir, "llama3_8b")):
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()[-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    (folder,) = run_folders(output_dir, "llama3_8b")
    stopped = (folder / "STOPPED").read_text()
    step = int(stopped.split("stopped after step ")[1].split()[0])
    assert stopped.strip().endswith(f"on SIGTERM; continue with: ./run.sh llama3_8b --resume {folder} --gpus 2")
    assert 0 < step < 400 and losses(folder)[-1][0] == step
    checkpoint = folder / "checkpoints" / f"checkpoint-{step}"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    assert not (folder / "results.md").exists() and not (folder / "FAILED").exists()


def test_a_rank_without_the_signal_stops_after_the_same_step_as_the_rank_that_got_it(monkeypatch):
    from types import SimpleNamespace

    from common import callbacks, distributed
    stop = callbacks.StopOnRequest()
    other_rank_signal = 0
    monkeypatch.setattr(distributed, "largest", lambda value: max(value, other_rank_signal))
    control = SimpleNamespace(should_save=False, should_training_stop=False)
    stop.on_step_end(None, SimpleNamespace(global_step=3), control)
    assert (stop.signal, control.should_save, control.should_training_stop) == (None, False, False)
    other_rank_signal = signal.SIGTERM  # torchrun reached the other rank first
    stop.on_step_end(None, SimpleNamespace(global_step=4), control)
    assert (stop.signal, control.should_save, control.should_training_stop) == (signal.SIGTERM, True, True)
