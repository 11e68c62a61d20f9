"""tinyllama_sentiment through Unsloth, in bf16 and in fp16 under a T4's 15 GiB. A random-init model of TinyLlama-1.1B's
exact shape (hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632, vocab 32000) trains 20 steps in 4-bit NF4 with
double quantization, at the recipe's batch, accumulation and length, then runs the full evaluation (zero-shot and fine-tuned constrained choice
on all 57 test tweets of the bundled sample, free generation, majority baseline); the adapter reloads and generates.

The learnability check runs on the GPU too, in 4-bit, with the CPU test's tiny learnable model (2 layers, hidden 64,
initializer_range 0.3), not the 1.1B shape: random-init weights of that size cannot learn a task in a few dozen steps,
so the check would say nothing about the pipeline. It runs twice with the same seed and must give the same F1."""
import json
from pathlib import Path

import pytest

from common.hardware import torch_dtype
from tests.gpu.conftest import assert_reload_reproduces_training
from tests.test_tinyllama_sentiment import (LABELS, LEARN_FLAGS, assert_learned, build_learnable_model, read_jsonl,
                                            write_learnable_data)

RECIPE = "tinyllama_sentiment"
SAMPLE = Path(__file__).resolve().parents[2] / "recipes" / "data" / "tweet_sentiment_sample.jsonl"


@pytest.mark.gpu
def test_tinyllama_real_shape_trains_in_4bit_evaluates_and_reloads(real_shape_model, run_recipe, logits_at_save,
                                                                   precision):
    base = real_shape_model("tinyllama-1.1b")
    folder = run_recipe(RECIPE, "--model-name", base, "--data", str(SAMPLE), "--max-steps", "20", "--warmup-steps", "2",
                        "--eval-steps", "10", "--generation-samples", "4", "--max-new-tokens", "8")
    manifest = json.loads((folder / "manifest.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    print(f"\ntinyllama_sentiment on {manifest['gpu']} ({manifest['precision']}, {manifest['quantization']}): "
          f"median step {manifest['median_step_time_s']:.3f} s, {manifest['tokens_per_s']:,.0f} tokens/s, "
          f"peak {manifest['peak_gpu_memory_gib']:.2f} GiB, optimizer {manifest['optimizer']}; macro-F1 zero-shot "
          f"{manifest['zero_shot_macro_f1']:.4f}, fine-tuned {manifest['fine_tuned_macro_f1']:.4f}, majority "
          f"{metrics['majority_baseline']['macro_f1']:.4f}")
    assert "8bit" in manifest["optimizer"]
    assert manifest["quantization"] == {"quant_type": "nf4", "double_quant": True, "blocksize": 64,
                                        "compute_dtype": str(torch_dtype(precision))}
    log = read_jsonl(folder / "metrics.jsonl")
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 21))
    assert [r["step"] for r in log if "eval_loss" in r] == [10, 20]

    predictions = read_jsonl(folder / "predictions.jsonl")
    assert len(predictions) == 57 and all(p["zero_shot"] in LABELS and p["fine_tuned"] in LABELS for p in predictions)
    assert sum("fine_tuned_reply" in p for p in predictions) == 4
    for name in ("zero_shot", "fine_tuned"):
        assert sum(map(sum, metrics[name]["constrained"]["confusion_matrix"])) == 57
        assert 0 <= metrics[name]["free_generation"]["parse_rate"] <= 1
    assert "| fine-tuned |" in (folder / "results.md").read_text()

    from unsloth import FastLanguageModel
    model, _ = FastLanguageModel.from_pretrained(str(folder / "adapter"), max_seq_length=256, load_in_4bit=True,
                                                 dtype=torch_dtype(precision))
    FastLanguageModel.for_inference(model)
    assert_reload_reproduces_training(model, logits_at_save[(folder / "adapter").resolve()])


@pytest.mark.gpu
def test_tiny_model_learns_on_gpu_in_4bit_and_same_seed_gives_same_f1(tmp_path, run_recipe):
    data = write_learnable_data(tmp_path / "learnable.jsonl")
    base = build_learnable_model(data, tmp_path / "model")
    folders = [run_recipe(RECIPE, "--model-name", base, "--data", str(data), *LEARN_FLAGS, output_dir=tmp_path / "out")
               for _ in range(2)]
    manifest = json.loads((folders[0] / "manifest.json").read_text())
    print(f"\nlearnability on {manifest['gpu']}: median step {manifest['median_step_time_s']:.3f} s")
    assert manifest["quantization"]["quant_type"] == "nf4"
    first, second = (assert_learned(folder) for folder in folders)
    assert first == second
    assert read_jsonl(folders[0] / "predictions.jsonl") == read_jsonl(folders[1] / "predictions.jsonl")
