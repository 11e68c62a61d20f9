"""llama31_8b_qlora through Unsloth: one random-init model of Llama-3.1-8B's exact shape, saved in NF4 as Unsloth's
bnb-4bit checkpoints are, serves both tests. The instruct variant trains at the recipe's batch, accumulation and
2,048-token length on the sample's chats plus multi-turn chats up to that length; its adapter reloads. The base variant
runs a two-rank sweep that writes its table and plot, 8 steps a rank with accumulation 1 (each rank loads the 8B model
afresh). Both are slow tests, outside the 10-minute set: llama3_8b's test covers the same shape there."""
import json
from pathlib import Path

import pytest

from common.hardware import torch_dtype
from tests.conftest import read_jsonl
from tests.gpu.conftest import assert_reload_reproduces_training, long_tail_chat_data

SAMPLE = Path(__file__).resolve().parents[2] / "recipes" / "data" / "finetome_sample.jsonl"
# The card's passes (2 x 2048 tokens): the peak then reads as weights plus one such pass, which the 4-bit check needs.
SHORT = ("--max-samples", "0", "--warmup-steps", "2", "--max-eval-samples", "8", "--sample-prompts", "1",
         "--max-new-tokens", "16", "--token-budget", "card")
# Llama-3.1-8B's trainable LoRA parameters on q,k,v,o: 32 layers x r x (8192 + 5120 + 5120 + 8192).
LORA_ATTENTION_PARAMETERS = {8: 6_815_744, 16: 13_631_488}


def report(label: str, manifest: dict, entry: dict):
    print(f"\nllama31_8b_qlora {label} on {manifest['gpu']} ({manifest['precision']}), r={entry['rank']}: "
          f"median step {entry['median_step_time_s']:.3f} s, {entry['tokens_per_s']:,.0f} tokens/s, "
          f"peak {entry['peak_gpu_memory_gib']:.2f} GiB, eval loss {entry['eval_loss']:.4f}, "
          f"adapter {entry['adapter_mb']:.1f} MB, optimizer {manifest['optimizer']}")


def train_steps(metrics: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(metrics) if "loss" in r]


@pytest.mark.gpu
@pytest.mark.slow
def test_instruct_variant_trains_in_4bit_and_reloads(real_shape_model, run_recipe, logits_at_save, precision,
                                                      tmp_path):
    from transformers import AutoTokenizer
    from common.chat import set_chat_template
    base = real_shape_model("llama-3.1-8b")
    lengths = long_tail_chat_data(SAMPLE, set_chat_template(AutoTokenizer.from_pretrained(base), "llama-3.1"), 2048,
                                  tmp_path / "chats.jsonl")
    folder = run_recipe("llama31_8b_qlora", "--model-name", base, "--data", str(tmp_path / "chats.jsonl"), *SHORT,
                        "--max-steps", "12", "--eval-steps", "6")
    manifest = json.loads((folder / "manifest.json").read_text())
    report(f"instruct, rows of {min(lengths)}-{max(lengths)} tokens", manifest, manifest)
    assert "8bit" in manifest["optimizer"] and max(lengths) > 2048 - 512
    assert train_steps(folder / "metrics.jsonl") == list(range(1, 13))
    evaluations = {r["step"]: r["eval_loss"] for r in read_jsonl(folder / "metrics.jsonl") if "eval_loss" in r}
    assert manifest["best_step"] == min(evaluations, key=evaluations.get)
    assert manifest["trainable_parameters"] == LORA_ATTENTION_PARAMETERS[8]
    assert manifest["peak_gpu_memory_gib"] < 12  # the 16-bit weights alone would take 15 GiB: the base really is 4-bit
    assert "<|start_header_id|>assistant<|end_header_id|>" in (folder / "adapter" / "chat_template.jinja").read_text()

    from unsloth import FastLanguageModel
    model, _ = FastLanguageModel.from_pretrained(str(folder / "adapter"), max_seq_length=2048, load_in_4bit=True,
                                                 dtype=torch_dtype(precision))
    FastLanguageModel.for_inference(model)
    assert_reload_reproduces_training(model, logits_at_save[(folder / "adapter").resolve()])


@pytest.mark.gpu
@pytest.mark.slow
def test_base_variant_rank_sweep_writes_table_and_plot(real_shape_model, run_recipe):
    from peft.utils import load_peft_weights
    base = real_shape_model("llama-3.1-8b")
    folder = run_recipe("llama31_8b_qlora", "--model-name", base, "--variant", "base", "--rank-sweep", "8,16",
                        "--data", str(SAMPLE), "--max-seq-length", "1024", "--gradient-accumulation-steps", "1", *SHORT,
                        "--max-steps", "8", "--eval-steps", "4")
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["sweep"]:
        report("base, rank sweep", manifest, entry)
    assert [entry["rank"] for entry in manifest["sweep"]] == [8, 16]
    for entry in manifest["sweep"]:
        assert entry["trainable_parameters"] == LORA_ATTENTION_PARAMETERS[entry["rank"]]
        assert entry["lora_alpha"] == 2 * entry["rank"]
        assert train_steps(folder / "sweep" / f"r{entry['rank']}" / "metrics.jsonl") == list(range(1, 9))
    assert manifest["sweep"][1]["adapter_mb"] == pytest.approx(2 * manifest["sweep"][0]["adapter_mb"], rel=0.01)
    assert (folder / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    results = (folder / "results.md").read_text()
    assert "| rank | alpha | trainable parameters | adapter MB | eval loss | gain | peak memory GiB |" in results
    assert "| 8 | 16 | 6,815,744 |" in results and "| 16 | 32 | 13,631,488 |" in results
    assert f"**Chosen rank: {manifest['rank']}**" in results

    weights = load_peft_weights(str(folder / "adapter"), device="cpu")  # the kept adapter reloads through PEFT
    rank = manifest["rank"]
    assert len(weights) == 32 * 4 * 2
    swept = load_peft_weights(str(folder / "sweep" / f"r{rank}" / "adapter"), device="cpu")
    assert all(weights[name].equal(swept[name]) for name in swept)  # the chosen rank's own adapter is the one kept
    assert weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (rank, 4096)
    assert weights["base_model.model.model.layers.31.self_attn.k_proj.lora_B.weight"].shape == (1024, rank)
    assert "### Response:" in (folder / "adapter" / "chat_template.jinja").read_text()
