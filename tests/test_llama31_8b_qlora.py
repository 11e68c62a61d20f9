"""llama31_8b_qlora on CPU: the smoke run (instruct), a base-variant rank sweep that stops doubling, the stopping rule on
synthetic losses, alpha and target mapping, reply-only loss in both prompt formats, and the memory arithmetic checked
against hand computations for Llama-3.1-8B's and Llama-3.2-1B's published configs."""
import unsloth  # noqa: F401  (first, as in the recipe: the recipe module is imported below)

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.data import read_rows
from common.errors import UserError
from common.smoke import tiny_model
from recipes.llama31_8b_qlora import (LLAMA31_8B_CONFIG, SAMPLE_DATA, Config, VARIANTS, chosen_rank, lora_alpha_for,
                                      lora_parameter_count, main, parameter_counts, relative_gain)
from tests.conftest import cpu_training_precision, read_jsonl, run_to_completion

RECIPE = "llama31_8b_qlora"
ATTENTION = ["k_proj", "o_proj", "q_proj", "v_proj"]
MLP = ["down_proj", "gate_proj", "up_proj"]
CARD_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
EVERY_PROJECTION = CARD_TARGETS + ("gate_proj", "up_proj", "down_proj")


def run_smoke(tmp_path_factory, name, *args):
    return run_to_completion(RECIPE, "--smoke", *args, output_dir=tmp_path_factory.mktemp(name))[0]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    return run_smoke(tmp_path_factory, "smoke")


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    # --min-gain 1 (100%): a doubling would have to bring eval loss to zero to pay that much, so the sweep must stop
    # after training rank 8 and keep rank 4, whatever the two eval losses are. --max-steps 2 --eval-steps 2: one
    # evaluation per rank, at step 2, so step 2 is each rank's best.
    return run_smoke(tmp_path_factory, "sweep", "--variant", "base", "--target-modules", ",".join(MLP), "--rank-sweep", "4,8,16",
                     "--min-gain", "1", "--max-steps", "2", "--eval-steps", "2")


@pytest.fixture(scope="module")
def tiny_config():
    """A tiny model as --smoke builds it: (its folder, its config.json)."""
    folder = tiny_model("llama-3.1", read_rows(str(SAMPLE_DATA)))
    return folder, json.loads((Path(folder) / "config.json").read_text())


def adapter_config(folder):
    return json.loads((folder / "adapter_config.json").read_text())


def lora_module_names(folder):
    return {key.split(".")[-3] for key in load_file(folder / "adapter_model.safetensors")}


def test_smoke_run_trains_the_card_defaults(smoke_run, tiny_config):
    folder = smoke_run
    for name in ("config.json", "manifest.json", "metrics.jsonl", "results.md", "adapter/adapter_model.safetensors"):
        assert (folder / name).exists(), name
    assert not (folder / "FAILED").exists() and not (folder / "sweep.png").exists()
    config = adapter_config(folder / "adapter")
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (8, 16, ATTENTION)
    assert lora_module_names(folder / "adapter") == set(ATTENTION)
    assert "<|start_header_id|>assistant<|end_header_id|>" in (folder / "adapter" / "chat_template.jinja").read_text()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["rank"] == 8 and manifest["sweep"] is None and manifest["precision"] == cpu_training_precision() and manifest["precision_requested"] == "fp32"
    # The smoke run evaluates at steps 2 and 4 (max_steps 4, eval_steps 2); the kept checkpoint is the one whose eval
    # loss metrics.jsonl recorded lower (the recipe takes it from the trainer's best_model_checkpoint, not from there).
    losses = {r["step"]: r["eval_loss"] for r in read_jsonl(folder / "metrics.jsonl") if "eval_loss" in r}
    assert sorted(losses) == [2, 4] and losses[2] != losses[4], losses
    best_step = min(losses, key=losses.get)
    assert manifest["best_step"] == best_step
    # Its eval loss is the best one again (re-evaluated after loading it: bitsandbytes' 4-bit inference kernel may
    # round differently from one evaluation to the next, so not to the last digit), and its adapter is the one saved.
    assert manifest["eval_loss"] == pytest.approx(losses[best_step], rel=1e-3)
    kept = load_file(folder / "checkpoints" / f"checkpoint-{best_step}" / "adapter_model.safetensors")
    saved = load_file(folder / "adapter" / "adapter_model.safetensors")
    assert kept.keys() == saved.keys() and all(torch.equal(kept[k], saved[k]) for k in kept)
    # The estimate's LoRA arithmetic on the tiny model's config equals what the run trained and saved (fp32 on CPU).
    _, tiny = tiny_config
    expected = lora_parameter_count(tiny, 8, CARD_TARGETS)
    assert manifest["trainable_parameters"] == expected == sum(t.numel() for t in saved.values())
    assert manifest["adapter_mb"] == pytest.approx(expected * 4 / 1e6, abs=0.02)
    results = (folder / "results.md").read_text()
    assert "LoRA r 8, alpha 16 on q_proj, k_proj, v_proj, o_proj" in results and "Rank sweep" not in results


def test_rank_sweep_stops_doubling_and_keeps_the_rank_before(sweep_run):
    folder = sweep_run
    manifest = json.loads((folder / "manifest.json").read_text())
    sweep = manifest["sweep"]
    assert [r["rank"] for r in sweep] == [4, 8] and manifest["rank"] == 4
    assert [r["best_step"] for r in sweep] == [2, 2] and manifest["best_step"] == 2
    assert not (folder / "sweep" / "r16").exists()  # the rule stopped before training it
    for rank in (4, 8):
        adapter = folder / "sweep" / f"r{rank}" / "adapter"
        config = adapter_config(adapter)
        assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (rank, 2 * rank, MLP)
        assert lora_module_names(adapter) == set(MLP)
        assert not (folder / "sweep" / f"r{rank}" / "checkpoints").exists()
    assert sweep[1]["trainable_parameters"] == 2 * sweep[0]["trainable_parameters"]
    kept = (folder / "adapter" / "adapter_model.safetensors").read_bytes()
    assert kept == (folder / "sweep" / "r4" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert "### Response:" in (folder / "adapter" / "chat_template.jinja").read_text()  # the base variant's format
    png = (folder / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    results = (folder / "results.md").read_text()
    gain = (sweep[0]["eval_loss"] - sweep[1]["eval_loss"]) / sweep[0]["eval_loss"]  # eval loss saved by doubling
    assert f"| 4 | 8 | {sweep[0]['trainable_parameters']:,} |" in results
    assert f"| {sweep[1]['eval_loss']:.4f} | {gain:.2%} |" in results
    assert "**Chosen rank: 4** (doubling to 8 gained less than 100.0%)" in results and "sweep.png" in results


@pytest.mark.parametrize("losses, expected", [
    ([2.0], None),                     # one rank trained: go on
    ([2.0, 1.8], None),                # 10% better: keep doubling
    ([2.0, 1.8, 1.79], 16),            # 0.56% < 1%: 32 is not worth it, keep 16
    ([2.0, 1.8, 1.7, 1.6], 64),        # every doubling paid: the largest rank
    ([2.0, 2.1], 8),                   # worse at 16: keep 8
])
def test_stopping_rule_on_synthetic_eval_losses(losses, expected):
    assert chosen_rank([8, 16, 32, 64], losses, 0.01) == expected


def test_a_gain_exactly_at_the_threshold_keeps_doubling():
    assert relative_gain(2.0, 1.5) == 0.25
    assert chosen_rank([8, 16, 32], [2.0, 1.5], 0.25) is None
    assert chosen_rank([8, 16, 32], [2.0, 1.5, 1.25], 0.25) == 16  # 16.7% < 25%


def test_a_min_gain_of_one_keeps_the_first_rank():
    # The sweep run's setting: a 100% gain needs an eval loss of zero, so the first doubling never pays.
    assert chosen_rank([4, 8, 16], [2.0, 1.0], 1.0) == 4  # halving the loss gains 50%
    assert chosen_rank([4, 8, 16], [2.0, 0.0], 1.0) is None


def test_alpha_keeps_the_cards_ratio_to_the_rank():
    card = Config()
    assert (card.lora_r, card.lora_alpha, card.target_modules) == (8, 16, CARD_TARGETS)
    assert [lora_alpha_for(rank, card) for rank in (8, 16, 32, 64)] == [16, 32, 64, 128]
    assert lora_alpha_for(64, Config(lora_r=8, lora_alpha=8)) == 64  # alpha = rank given: each swept rank keeps it


@pytest.mark.parametrize("variant", ["instruct", "base"])
def test_loss_falls_on_the_replies_only(variant, tiny_config):
    from transformers import AutoTokenizer
    from unsloth import get_chat_template, train_on_responses_only
    from common.chat import TURN_MARKERS
    _, template = VARIANTS[variant]
    user_marker, reply_marker = TURN_MARKERS[template]
    tokenizer = get_chat_template(AutoTokenizer.from_pretrained(tiny_config[0]), chat_template=template)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is LoRA?"},
                {"role": "assistant", "content": "Low-rank adapters."}, {"role": "user", "content": "And QLoRA?"},
                {"role": "assistant", "content": "LoRA on a 4-bit base."}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    mask = train_on_responses_only(None, instruction_part=user_marker, response_part=reply_marker, tokenizer=tokenizer,
                                   return_function=True)
    labels = mask({"input_ids": [ids]})["labels"][0]
    trained = tokenizer.decode([token for token, label in zip(ids, labels) if label != -100])
    assert trained == "Low-rank adapters.<|eot_id|>LoRA on a 4-bit base.<|eot_id|>"


def llama_parameters_by_hand(hidden, layers, heads, kv_heads, mlp, vocab, tied):
    head_dim = hidden // heads
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    block = attention + 3 * hidden * mlp + 2 * hidden
    return layers * block + vocab * hidden * (1 if tied else 2) + hidden


def test_parameter_count_matches_hand_computation():
    total, linear = parameter_counts(LLAMA31_8B_CONFIG)
    assert total == llama_parameters_by_hand(4096, 32, 32, 8, 14336, 128256, False) == 8_030_261_248  # "8.03 B"
    assert linear == 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    llama32_1b = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                  "intermediate_size": 8192, "vocab_size": 128256, "tie_word_embeddings": True, "head_dim": 64}
    assert parameter_counts(llama32_1b)[0] == 1_235_814_400  # Llama-3.2-1B's published count: tied embeddings
    # Unsloth's notebooks print these trainable counts for Llama-3.x-8B: r=8 on q,k,v,o and r=16 on every projection.
    assert lora_parameter_count(LLAMA31_8B_CONFIG, 8, CARD_TARGETS) == 6_815_744
    assert lora_parameter_count(LLAMA31_8B_CONFIG, 16, EVERY_PROJECTION) == 41_943_040


def test_estimate_memory_reads_a_local_config_and_writes_nothing(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**LLAMA31_8B_CONFIG, "model_type": "llama"}))
    with pytest.raises(SystemExit) as exited:  # it answers and ends, as --help does
        main(["--estimate-memory", "--model-name", str(model), "--target-modules", ",".join(EVERY_PROJECTION),
              "--rank-sweep", "8,16", "--output-dir", str(tmp_path / "outputs")])
    assert exited.value.code == 0
    printed = capsys.readouterr().out
    assert f"from {model / 'config.json'}" in printed
    assert "parameters: 8,030,261,248 (8.03 B)" in printed
    for line in ("fp32    32.12 GB", "bf16    16.06 GB", "8-bit    8.03 GB", "4-bit    4.02 GB"):
        assert line in printed
    assert "4-bit as QLoRA loads it: 5.59 GB" in printed  # 6.98 B linear x 0.5 + 1.05 B embeddings x 2 bytes
    assert "LoRA r=8 alpha=16 on q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj: 20,971,520 parameters, " \
           "83.9 MB in fp32, 41.9 MB in 16-bit" in printed
    assert "LoRA r=16 alpha=32" in printed
    assert not (tmp_path / "outputs").exists()


def test_estimate_memory_offline_falls_back_to_the_builtin_config(monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("no connection")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(SystemExit):
        main(["--estimate-memory", "--variant", "base"])
    printed = capsys.readouterr().out
    assert "unsloth/Meta-Llama-3.1-8B-bnb-4bit, from built-in copy of Llama-3.1-8B's published values" in printed
    assert "parameters: 8,030,261,248" in printed and "LoRA r=8 alpha=16 on q_proj, k_proj, v_proj, o_proj: 6,815,744" \
        in printed
    with pytest.raises(UserError, match="pass a local model folder"):
        main(["--estimate-memory", "--model-name", "someone/other-model"])  # no built-in copy for other models


@pytest.mark.parametrize("flags, message", [
    (["--variant", "chat"], "--variant chat: use one of instruct, base"),
    (["--target-modules", "qkv"], "--target-modules qkv: llama has no such layer"),
    (["--rank-sweep", "16,8"], "--rank-sweep 16,8: ranks must be positive and increasing"),
    (["--lora-r", "0"], "--lora-r 0: must be at least 1"),
    (["--rank-sweep", "8,16", "--stop-after-step", "2"], "not on a --rank-sweep"),
    (["--eval-steps", "50", "--max-steps", "10"], "no checkpoint to keep"),
])
def test_flag_mistakes_are_one_line_errors(flags, message, tmp_path):
    with pytest.raises(UserError, match=re.escape(message)):
        main(["--smoke", *flags, "--output-dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())
