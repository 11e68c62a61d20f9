"""llama3_8b end to end on CPU through Unsloth's CPU backend: smoke run, split, eval cadence, best checkpoint,
moving average, reproducibility and resume."""
import json

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO, cpu_training_precision, read_jsonl, run_folders, run_recipe_process, run_to_completion

SAMPLE_DATA = REPO / "recipes" / "data" / "finetome_sample.jsonl"  # the smoke run's data


def read_metrics(folder):
    return read_jsonl(folder / "metrics.jsonl")


def eval_records(folder):
    return [r for r in read_metrics(folder) if "eval_loss" in r]


def train_losses(folder):
    return [(r["step"], r["loss"]) for r in read_metrics(folder) if "loss" in r]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    folder, result = run_to_completion("llama3_8b", "--smoke", output_dir=tmp_path_factory.mktemp("smoke"))
    return folder, result


def test_smoke_run_writes_every_output(smoke_run):
    folder, _ = smoke_run
    for name in ("config.json", "manifest.json", "metrics.jsonl", "results.md", "adapter/adapter_model.safetensors",
                 "adapter/adapter_config.json", "adapter/tokenizer_config.json"):
        assert (folder / name).exists(), name
    assert not (folder / "FAILED").exists()
    adapter_config = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter_config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (8, 16)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["precision"] == cpu_training_precision() and manifest["precision_requested"] == "fp32" and manifest["seed"] == 3407
    assert len(manifest["data"]["sha256"]) == 64
    assert "AdamW" in manifest["optimizer"]  # on CPU Unsloth swaps 8-bit AdamW for fused AdamW, and we record that
    assert manifest["batching"] == "card micro-batches"  # Unsloth's CPU backend does not split steps by token budget
    # The record says what ran: the tiny model (not the card's), the command as started, the data actually used.
    assert manifest["model"] == (f"{folder / 'smoke-base'}: a tiny random-init model of "
                                 "unsloth/llama-3-8b-Instruct-bnb-4bit's architecture (--smoke), for checking the "
                                 "pipeline only")
    assert manifest["command"].startswith("python -m recipes.llama3_8b --smoke --output-dir ")
    assert (folder / "results.md").read_text().startswith(f"# llama3_8b: Llama-3-8B-Instruct LoRA on {SAMPLE_DATA}")
    record = json.loads((folder / "run.json").read_text())
    assert (record["base_model"], record["smoke"], record["chat_template"]) == (str(folder / "smoke-base"), True, "llama-3")
    assert record["adapters"] == [{"path": "adapter", "base_model": str(folder / "smoke-base"), "load_in_4bit": True}]
    assert record["metrics"]["final_eval_loss"] == manifest["final_eval_loss"]


def test_split_is_80_20_of_what_was_kept(smoke_run):
    folder, result = smoke_run
    data = json.loads((folder / "manifest.json").read_text())["data"]
    sample = read_jsonl(SAMPLE_DATA)
    # The sample marks its deliberately unusable rows "source": "messy" (its repairable ones "messy-repairable"): lines
    # 37 and 38 are empty conversations, 39 has a "narrator" role, 42 has no reply, 43 is a string, not a list.
    unusable = [line for line, row in enumerate(sample, 1) if row["source"] == "messy"]
    assert unusable == [37, 38, 39, 42, 43]
    kept = len(sample) - len(unusable)
    assert (data["rows"], data["kept"]) == (len(sample), kept)
    assert data["dropped"] == {"empty": 2, "bad roles": 1, "no reply": 1, "malformed": 1, "too long": 0}
    assert kept == 38 and (data["train"], data["eval"]) == (30, 8)  # 20% of 38 is 7.6: 8 held out
    assert f"kept {kept} / {len(sample)}; dropped: empty 2, bad roles 1, no reply 1, malformed 1" in result.stdout


def test_evaluates_every_eval_steps_with_moving_average(smoke_run):
    folder, _ = smoke_run
    evals = eval_records(folder)
    assert [r["step"] for r in evals] == [4, 8, 12]  # smoke: eval_steps 4, max_steps 12
    losses = [r["eval_loss"] for r in evals]
    expected = [losses[0], sum(losses[:2]) / 2, sum(losses[:3]) / 3]  # window 3
    assert [r["eval_loss_moving_avg"] for r in evals] == pytest.approx(expected)
    results = (folder / "results.md").read_text()
    assert f"| 12 | {losses[2]:.4f} | {expected[2]:.4f} |" in results
    assert "## Held-out prompts" in results


def test_moving_average_is_over_the_last_three_evaluations():
    # The smoke run has three evaluations, where a window of 3 and the mean of all evaluations agree: here the fourth
    # tells them apart ((2 + 3 + 1) / 3 = 2, not (4 + 2 + 3 + 1) / 4 = 2.5).
    from common.callbacks import MovingAverageEvalLoss
    average = MovingAverageEvalLoss(window=3)
    logged = [{"eval_loss": loss} for loss in (4.0, 2.0, 3.0, 1.0)]
    for logs in logged:
        average.on_log(None, None, None, logs=logs)
    assert [logs["eval_loss_moving_avg"] for logs in logged] == [4.0, 3.0, 3.0, 2.0]
    train_log = {"loss": 5.0}
    average.on_log(None, None, None, logs=train_log)
    assert train_log == {"loss": 5.0}  # a training log gets no average and does not enter the window
    resumed = MovingAverageEvalLoss(window=3, history=[4.0, 2.0])  # a resumed run starts from the evaluations kept
    logs = {"eval_loss": 6.0}
    resumed.on_log(None, None, None, logs=logs)
    assert logs["eval_loss_moving_avg"] == 4.0


def test_same_seed_gives_identical_losses(smoke_run, tmp_path):
    first, _ = smoke_run
    result = run_recipe_process("llama3_8b", "--smoke", output_dir=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    (second,) = run_folders(tmp_path, "llama3_8b")
    assert train_losses(first) == train_losses(second)
    assert len(train_losses(first)) == 12


def conflicting_answers(folder):
    """A tiny model and 40 conversations whose held-out answers contradict the training answers: training rows answer
    'alpha ...', the rows the recipe's seeded 80/20 split holds out answer 'omega ...'. Learning the training answers
    first lowers the eval loss (the shared template) and then raises it, so the best evaluation is not the last."""
    from common.data import split_train_eval
    from common.smoke import tiny_model
    from recipes.llama3_8b import Config
    _, held_out = split_train_eval(list(range(40)), Config.eval_fraction, Config.seed)
    rows = [{"messages": [{"role": "user", "content": f"which word comes next {i}"},
                          {"role": "assistant", "content": " ".join(["omega" if i in held_out else "alpha"] * 12)}]}
            for i in range(40)]
    data = folder / "conflicting.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return tiny_model("llama-3", rows), str(data)


def test_best_checkpoint_is_kept_when_eval_loss_rises(run_recipe, tmp_path):
    # A 16-bit base: on CPUs with AVX512-BF16, bitsandbytes 0.50 repacks 4-bit weights for its inference kernel at some
    # evaluations and not others, so the same weights' eval loss moves in the fourth digit and could not be compared.
    model, data = conflicting_answers(tmp_path)
    folder = run_recipe("llama3_8b", "--model-name", model, "--data", data, "--max-samples", "0",
                        "--max-seq-length", "128", "--per-device-train-batch-size", "1",
                        "--gradient-accumulation-steps", "2", "--load-in-4bit", "false",
                        "--learning-rate", "0.05", "--lr-scheduler-type", "constant", "--warmup-steps", "0",
                        "--eval-steps", "2", "--max-steps", "8", "--max-eval-samples", "8", "--sample-prompts", "1",
                        "--max-new-tokens", "4")
    evals = eval_records(folder)
    losses = {r["step"]: r["eval_loss"] for r in evals}
    best_step = min(losses, key=losses.get)
    assert best_step < max(losses) and losses[max(losses)] > losses[best_step] + 0.05, \
        f"eval loss did not clearly rise, the test proves nothing: {losses}"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["best_step"] == best_step
    assert manifest["final_eval_loss"] == pytest.approx(losses[best_step], rel=1e-4)
    saved = load_file(folder / "adapter" / "adapter_model.safetensors")
    kept = load_file(folder / "checkpoints" / f"checkpoint-{best_step}" / "adapter_model.safetensors")
    assert saved.keys() == kept.keys()
    assert all((saved[k] == kept[k]).all() for k in saved)
    assert f"| {best_step} |" in (folder / "results.md").read_text()
    # Unsloth's CPU backend does not split a step by token budget, so the step runs as the card's micro-batches (1 row
    # x 2), never as one pass of both rows (on a GPU: one micro-batch of 2, split by Unsloth; tests/gpu).
    state = json.loads((folder / "checkpoints" / f"checkpoint-{best_step}" / "trainer_state.json").read_text())
    assert state["train_batch_size"] == 1 and manifest["batching"] == "card micro-batches"


def test_interrupted_run_resumes_to_the_same_losses(smoke_run, tmp_path):
    uninterrupted, _ = smoke_run
    stopped = run_recipe_process("llama3_8b", "--smoke", "--stop-after-step", "6", output_dir=tmp_path)
    assert stopped.returncode == 0, stopped.stderr[-4000:]
    (folder,) = run_folders(tmp_path, "llama3_8b")
    assert (folder / "STOPPED").exists() and not (folder / "results.md").exists()
    assert not (folder / "adapter").exists()
    resumed = run_recipe_process("llama3_8b", "--resume", str(folder), output_dir=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert run_folders(tmp_path, "llama3_8b") == [folder]  # continued in place, no new folder
    assert (folder / "results.md").exists() and not (folder / "STOPPED").exists()
    expected, got = train_losses(uninterrupted), train_losses(folder)
    assert [step for step, _ in got] == [step for step, _ in expected]
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in expected], rel=1e-4)
