"""gpt2_medium_qlora, in bf16 and in fp16 under a T4's 15 GiB: a random-init model of GPT-2 Medium's exact shape, the
card's largest rank (16), both sides and the reseeded QLoRA run, 20 steps each (the card's 200 scaled down, inside the
first epoch of the sample's 94 rows, so no short last batch makes Unsloth compile GPT-2's blocks again); results.md
filled from the measured numbers, adapters of both sides reloaded. One rank keeps the test short (most of a run is
Unsloth compiling GPT-2's blocks for its fresh model); the CPU tests cover the study across ranks. Random weights: right for memory,
speed and the pipeline, meaningless for the quality columns."""
import json
from pathlib import Path

import pytest

from common.hardware import torch_dtype
from tests.gpu.conftest import assert_reload_reproduces_training

SAMPLE = Path(__file__).resolve().parents[2] / "recipes" / "data" / "alpaca_sample.jsonl"


@pytest.mark.gpu
@pytest.mark.slow
def test_gpt2_medium_qlora_study_real_shape(real_shape_model, run_recipe, logits_at_save, precision):
    base = real_shape_model("gpt2-medium")
    folder = run_recipe("gpt2_medium_qlora", "--model-name", base, "--data", str(SAMPLE), "--ranks", "16",
                        "--max-steps", "20", "--eval-prompts", "8", "--max-new-tokens", "16")
    manifest = json.loads((folder / "manifest.json").read_text())
    study = json.loads((folder / "study.json").read_text())
    results = (folder / "results.md").read_text()
    print(f"\ngpt2_medium_qlora on {manifest['gpu']} ({manifest['precision']}), optimizer {manifest['optimizer']}")
    for run in manifest["runs"]:
        print(f"  {run['side']:>5} r{run['rank']:<2}: median step {run['median_step_time_s']:.3f} s, "
              f"{run['tokens_per_s']:,.0f} tokens/s, peak {run['peak_gpu_memory_gib']:.2f} GiB "
              f"(allocated before load {run['gpu_memory_before_load_gib']:.2f} GiB), final loss {run['final_loss']:.4f}")
    print(results)
    reference = study["seed_reference"]
    assert (reference["rank"], reference["seeds"]) == (16, [3407, 3408])
    assert manifest["runs"][0]["quantization"]["blocksize"] == 64 and manifest["runs"][1]["quantization"] is None

    runs = study["runs"]
    assert [(r["side"], r["rank"]) for r in runs] == [("qlora", 16), ("lora", 16)]
    assert all(r["steps"] == 20 for r in runs)
    for qlora, lora in zip(runs[::2], runs[1::2]):
        assert qlora["trainable_parameters"] == lora["trainable_parameters"] == 24 * qlora["rank"] * (1024 + 3072)
    for comparison in study["ranks"]:
        assert comparison["memory_reduction_pct"] > 0, comparison  # an NF4 base holds less than a bf16 one
        assert 0 <= comparison["token_match_rate"] <= 1 and -1 <= comparison["mean_pooled_cosine"] <= 1 + 1e-4
    assert "| memory reduction, QLoRA vs 16-bit LoRA | n/a" not in results and "% less peak GPU memory" in results
    for plot in ("memory_vs_rank.png", "cosine_vs_rank.png"):
        assert (folder / plot).stat().st_size > 5000

    # The QLoRA adapter reloads through Unsloth on its 4-bit base; the 16-bit one through PEFT on the 16-bit base.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from unsloth import FastLanguageModel
    adapters = folder / "adapters"
    model, _ = FastLanguageModel.from_pretrained(str(adapters / "qlora-r16"), max_seq_length=512, load_in_4bit=True,
                                                 dtype=torch_dtype(precision))
    FastLanguageModel.for_inference(model)
    assert_reload_reproduces_training(model, logits_at_save[(adapters / "qlora-r16").resolve()])
    del model
    baseline = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype(precision)).cuda(),
                                         str(adapters / "lora-r16"))
    assert baseline.peft_config["default"].r == 16 and baseline.peft_config["default"].fan_in_fan_out
    assert_reload_reproduces_training(baseline, logits_at_save[(adapters / "lora-r16").resolve()])
