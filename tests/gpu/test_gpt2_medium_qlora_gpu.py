"""gpt2_medium_qlora on an H100: a random-init model of GPT-2 Medium's exact shape, the card's largest rank (16), both
sides, 20 steps each (the card's 200 scaled down, inside the first epoch of the sample's 94 rows, so no short last batch
makes Unsloth compile GPT-2's blocks again); results.md filled from the measured numbers, adapters of both sides
reloaded. One rank keeps the test at about half of the two-rank run's three minutes (most of a run is Unsloth compiling
GPT-2's blocks for its fresh model); the CPU tests cover the study across ranks. Random weights: right for memory,
speed and the pipeline, meaningless for the quality columns."""
import json
from pathlib import Path

import pytest
import torch

SAMPLE = Path(__file__).resolve().parents[2] / "recipes" / "data" / "alpaca_sample.jsonl"
PROMPT = "### Instruction:\nName a color.\n\n### Response:\n"


@pytest.mark.gpu
def test_gpt2_medium_qlora_study_real_shape(real_shape_model, run_recipe):
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

    assert manifest["precision"] == "bf16"
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

    # The QLoRA adapter reloads through Unsloth on its 4-bit base; the 16-bit one through PEFT on the bf16 base.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from unsloth import FastLanguageModel
    model, tokenizer = FastLanguageModel.from_pretrained(str(folder / "adapters" / "qlora-r16"), max_seq_length=512,
                                                         load_in_4bit=True)
    FastLanguageModel.for_inference(model)
    inputs = tokenizer(PROMPT, return_tensors="pt").to("cuda")
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert output.shape[1] > inputs["input_ids"].shape[1]
    del model
    baseline = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).to("cuda"),
                                         str(folder / "adapters" / "lora-r16"))
    assert baseline.peft_config["default"].r == 16 and baseline.peft_config["default"].fan_in_fan_out
    output = baseline.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert output.shape[1] > inputs["input_ids"].shape[1]
