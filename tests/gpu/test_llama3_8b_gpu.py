"""llama3_8b on an H100 through Unsloth: a random-init model of Llama-3-8B's exact shape, the card's batch, accumulation,
sequence length and LoRA settings, max steps and eval cadence scaled down; best checkpoint kept, adapter reloaded. A
step's 2 x 8 rows reach the Trainer as one micro-batch of 16, which Unsloth runs as passes of at most 2 x 1024 tokens."""
import json
from pathlib import Path

import pytest

SAMPLE = Path(__file__).resolve().parents[2] / "recipes" / "data" / "finetome_sample.jsonl"


@pytest.mark.gpu
def test_llama3_8b_real_shape_trains_evaluates_and_reloads(real_shape_model, run_recipe):
    base = real_shape_model("llama-3-8b")
    folder = run_recipe("llama3_8b", "--model-name", base, "--data", str(SAMPLE), "--max-samples", "0",
                        "--max-steps", "10", "--eval-steps", "5", "--warmup-steps", "2", "--max-eval-samples", "8",
                        "--sample-prompts", "2", "--max-new-tokens", "16")
    manifest = json.loads((folder / "manifest.json").read_text())
    print(f"\nllama3_8b on {manifest['gpu']} ({manifest['precision']}): median step {manifest['median_step_time_s']:.2f} s, "
          f"{manifest['tokens_per_s']:,.0f} tokens/s, peak {manifest['peak_gpu_memory_gib']:.2f} GiB, "
          f"best step {manifest['best_step']}, optimizer {manifest['optimizer']}")
    assert manifest["precision"] == "bf16" and "8bit" in manifest["optimizer"]
    assert manifest["best_step"] in (5, 10)
    state = json.loads((folder / "checkpoints" / "checkpoint-10" / "trainer_state.json").read_text())
    assert state["train_batch_size"] == 16

    from unsloth import FastLanguageModel
    model, tokenizer = FastLanguageModel.from_pretrained(str(folder / "adapter"), max_seq_length=1024, load_in_4bit=True)
    FastLanguageModel.for_inference(model)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "the model learns"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True).to("cuda")
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]
