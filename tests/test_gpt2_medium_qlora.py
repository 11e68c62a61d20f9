"""gpt2_medium_qlora on CPU: the whole study on a tiny GPT-2 (two ranks, both sides), the comparison metrics on
hand-made cases, the card's prompt format, a fair start for both sides, and one-line errors."""
import unsloth  # noqa: F401  (first, as in the recipe: it patches transformers and PEFT on import)

import json
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from common.errors import UserError
from common.hardware import detect, torch_dtype
from common.model import load_model
from common.smoke import tiny_model, train_tokenizer
from recipes.gpt2_medium_qlora import (SAMPLE_DATA, Config, add_lora, alpaca_prompt, alpaca_rows, card_answers, main,
                                       mean_pool, study_arguments, mean_pooled_cosine, probe, token_match_rate)
from tests.conftest import cpu_training_precision, read_jsonl, run_to_completion

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    folder, result = run_to_completion("gpt2_medium_qlora", "--smoke", output_dir=tmp_path_factory.mktemp("smoke"))
    return folder, result.stdout


def test_smoke_study_writes_every_table_plot_and_adapter(smoke_run):
    folder, stdout = smoke_run
    for name in ("config.json", "manifest.json", "study.json", "results.md"):
        assert (folder / name).exists(), name
    for plot in ("memory_vs_rank.png", "cosine_vs_rank.png"):
        assert (folder / plot).read_bytes()[:8] == PNG_SIGNATURE and (folder / plot).stat().st_size > 5000, plot
    study = json.loads((folder / "study.json").read_text())
    assert [(r["side"], r["rank"]) for r in study["runs"]] == [("qlora", 2), ("lora", 2), ("qlora", 4), ("lora", 4)]
    for run in study["runs"]:
        adapter = folder / run["adapter"]
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (run["rank"], 16, 0.05)
        assert config["target_modules"] == ["c_attn"]
        assert (adapter / "adapter_model.safetensors").exists() and (adapter / "tokenizer.json").exists()
        assert run["steps"] == 4 and run["peak_gpu_memory_gib"] is None  # CPU: no GPU memory to measure
        metrics = read_jsonl(folder / "metrics" / f"{run['side']}-r{run['rank']}.jsonl")
        losses = [r["loss"] for r in metrics if "loss" in r]
        assert len(losses) == 4 and run["final_loss"] == pytest.approx(sum(losses[-3:]) / 3)  # smoke window: 3
    results = (folder / "results.md").read_text()
    assert "| memory reduction, QLoRA vs 16-bit LoRA | n/a: no GPU" in results
    assert "| optimal rank |" in results and "![cosine and token match vs rank](cosine_vs_rank.png)" in results
    # One precision, the one that ran (Unsloth's CPU backend picks bf16 on a CPU with bf16 hardware), in both places.
    assert f"; CPU, {cpu_training_precision()}; LoRA on c_attn" in results
    assert f"both compute in {cpu_training_precision()}" in results
    for comparison in study["ranks"]:
        row = f"| {comparison['rank']} | n/a / n/a | n/a |"
        assert row in results and f"| {comparison['mean_pooled_cosine']:.4f} |" in results
        clears = "yes" if comparison["mean_pooled_cosine"] >= 0.95 else "no"
        assert f"| {comparison['token_match_rate']:.3f} | {comparison['mean_pooled_cosine']:.4f} | {clears} |" in results
        assert comparison["clears_threshold"] is (clears == "yes")
    assert "| rank | peak GiB qlora / lora |" in stdout  # the table is printed too
    for run in study["runs"]:
        assert f"{run['side']} r{run['rank']} {run['cosine_to_base']:.4f}" in results
        assert run["quantization"] == ({"quant_type": "nf4", "double_quant": True, "blocksize": 64,
                                        "compute_dtype": str(torch_dtype(run["precision"]))}
                                       if run["side"] == "qlora" else None)  # read back from the loaded layers
    assert "4-bit base as loaded: nf4, block 64, double quantization True" in results


def test_chat_and_export_load_each_adapter_on_the_base_it_trained_on(smoke_run, tmp_path):
    import shutil

    from after_training.trained_run import open_run
    run = tmp_path / "run"
    shutil.copytree(smoke_run[0], run)
    manifest = json.loads((run / "manifest.json").read_text())
    # On a GPU the QLoRA side trains on bitsandbytes 4-bit layers, which its entry records (Unsloth's CPU backend has none).
    for trained in manifest["runs"]:
        trained["quantization"] = {"quant_type": "nf4"} if trained["side"] == "qlora" else None
    (run / "manifest.json").write_text(json.dumps(manifest))
    sides = {trained["side"] for trained in manifest["runs"]}
    assert sides == {"qlora", "lora"}
    for trained in manifest["runs"]:
        assert open_run(str(run), str(run / trained["adapter"])).load_in_4bit is (trained["side"] == "qlora")


def test_the_cosine_has_a_yardstick_qlora_against_itself_from_another_seed(smoke_run):
    folder, _ = smoke_run
    study = json.loads((folder / "study.json").read_text())
    reference = study["seed_reference"]
    assert (reference["rank"], reference["seeds"]) == (4, [3407, 3408])  # the smoke study's largest rank, seed + 1
    assert (folder / "adapters" / "qlora-r4-seed3408" / "adapter_model.safetensors").exists()
    reseeded = read_jsonl(folder / "metrics" / "qlora-r4-seed3408.jsonl")
    assert len([r for r in reseeded if "loss" in r]) == 4
    assert f"from seed 3408 instead of 3407: cosine {reference['mean_pooled_cosine']:.4f}" in (
        folder / "results.md").read_text()
    assert len(study["runs"]) == 4  # the reseeded run is the yardstick, not one of the study's runs


def test_both_sides_see_the_same_batches_and_train_the_same_parameters(smoke_run):
    folder, _ = smoke_run
    study = json.loads((folder / "study.json").read_text())
    metrics = {(r["side"], r["rank"]): read_jsonl(folder / "metrics" / f"{r['side']}-r{r['rank']}.jsonl")
               for r in study["runs"]}
    tokens = {key: [m["num_tokens"] for m in records if "num_tokens" in m] for key, records in metrics.items()}
    assert len(set(map(tuple, tokens.values()))) == 1 and len(tokens["qlora", 2]) == 4  # same data order everywhere
    by = {(r["side"], r["rank"]): r for r in study["runs"]}
    for rank in (2, 4):
        assert by["qlora", rank]["trainable_parameters"] == by["lora", rank]["trainable_parameters"]
        assert by["qlora", rank]["optimizer"] == by["lora", rank]["optimizer"]
    assert by["qlora", 4]["trainable_parameters"] == 2 * by["qlora", 2]["trainable_parameters"]


@pytest.mark.parametrize("losses, clears, optimal", [
    ({2: 1.00, 4: 0.97, 8: 0.90}, {2: True, 4: True, 8: True}, 8),  # only 8 is within 0.05 of the best (0.90)
    ({2: 0.94, 4: 0.91, 8: 0.90}, {2: True, 4: True, 8: True}, 2),  # all within 0.05: the smallest
    ({2: 0.94, 4: 0.91, 8: 0.90}, {2: False, 4: True, 8: True}, 4),  # 2 fits on loss but misses the cosine
    ({2: 1.00, 4: 0.97, 8: 0.90}, {2: True, 4: True, 8: False}, None),  # the only rank on loss misses the cosine
])
def test_optimal_rank_is_the_smallest_within_the_loss_tolerance_that_clears_the_cosine(losses, clears, optimal):
    cfg = Config(ranks=(2, 4, 8))
    runs = [{"side": "qlora", "rank": rank, "final_loss": loss} for rank, loss in losses.items()]
    comparisons = [{"rank": rank, "clears_threshold": ok, "mean_pooled_cosine": 0.96 if ok else 0.9,
                    "memory_reduction_pct": None} for rank, ok in clears.items()]
    card = card_answers(cfg, runs, comparisons)
    assert card["optimal_rank"] == optimal
    assert card["rule"] == ("smallest rank whose qlora final loss is within 0.05 of the best rank's and whose cosine "
                            "to 16-bit LoRA is >= 0.95")


def test_only_one_side_runs_and_says_what_cannot_be_compared(tmp_path):
    main(["--smoke", "--only", "lora", "--ranks", "2", "--max-steps", "2", "--output-dir", str(tmp_path)])
    (folder,) = (tmp_path / "gpt2_medium_qlora").iterdir()
    study = json.loads((folder / "study.json").read_text())
    assert [(r["side"], r["rank"]) for r in study["runs"]] == [("lora", 2)] and study["ranks"] == []
    assert sorted(p.name for p in (folder / "adapters").iterdir()) == ["lora-r2"]
    results = (folder / "results.md").read_text()
    assert "| cosine similarity vs 16-bit LoRA (threshold 0.95) | n/a: needs both sides" in results
    assert "| 2 | n/a / n/a | n/a | n/a / " in results
    assert (folder / "cosine_vs_rank.png").read_bytes()[:8] == PNG_SIGNATURE


def test_token_match_rate_on_hand_made_continuations():
    assert token_match_rate([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]]) == 1.0
    assert token_match_rate([[1, 2, 3, 4]], [[1, 9, 3, 9]]) == 0.5
    assert token_match_rate([[1, 2, 3]], [[1, 2]]) == pytest.approx(2 / 3)  # one stopped early: a mismatch
    assert token_match_rate([[1, 2], [7]], [[1, 2], [8, 8, 8]]) == pytest.approx(2 / 5)  # pooled over positions
    assert token_match_rate([[]], [[]]) == 1.0
    with pytest.raises(ValueError):
        token_match_rate([[1]], [[1], [2]])


def test_mean_pooled_cosine_on_hand_made_embeddings():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert mean_pooled_cosine(a, a.clone()) == pytest.approx(1.0)
    assert mean_pooled_cosine(a, torch.tensor([[0.0, 3.0], [0.0, 1.0]])) == pytest.approx(0.5)  # cosines 0 and 1
    assert mean_pooled_cosine(a, 5 * a) == pytest.approx(1.0)  # direction, not scale
    hidden = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [100.0, -100.0]]])
    assert mean_pool(hidden, torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 2.0]]  # padding left out


def test_identical_models_score_one_and_different_models_less():
    corpus = [alpaca_prompt(row) + row["output"] for row in alpaca_rows(str(SAMPLE_DATA), 0, 4, 0)[0]]
    tokenizer = train_tokenizer(corpus, "gpt2", vocab_size=512)

    def adapted_gpt2(seed):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=len(tokenizer),
                                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id))
        return get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))

    prompts = [alpaca_prompt({"instruction": "Name a color.", "input": ""}),
               alpaca_prompt({"instruction": "Add the two numbers.", "input": "12 and 30"})]
    tokens_a, pooled_a, base_a = probe(adapted_gpt2(0), tokenizer, prompts, max_new_tokens=12)
    tokens_b, pooled_b, _ = probe(adapted_gpt2(0), tokenizer, prompts, max_new_tokens=12)
    tokens_c, pooled_c, _ = probe(adapted_gpt2(1), tokenizer, prompts, max_new_tokens=12)
    assert torch.equal(pooled_a, base_a)  # an untrained adapter (B = 0) leaves the base as it was
    assert token_match_rate(tokens_a, tokens_b) == 1.0 and mean_pooled_cosine(pooled_a, pooled_b) == pytest.approx(1.0)
    assert token_match_rate(tokens_a, tokens_c) < 1.0 and mean_pooled_cosine(pooled_a, pooled_c) < 0.99


def test_both_sides_start_from_the_same_adapter():
    rows = alpaca_rows(str(SAMPLE_DATA), 0, 4, 0)[0]
    base = tiny_model("gpt2", rows)
    cfg = Config()
    qlora, lora = (add_lora(load_model(base, 256, "fp32", load_in_4bit=side == "qlora",
                                       use_gradient_checkpointing=False)[0], side, 4, cfg, cfg.seed)
                   for side in ("qlora", "lora"))
    q = {k: v for k, v in qlora.named_parameters() if "lora_" in k}
    l = {k: v for k, v in lora.named_parameters() if "lora_" in k}
    assert q.keys() == l.keys() and len(q) == 4  # A and B on c_attn of both layers
    for name in q:
        assert torch.equal(q[name], l[name]), name  # same seeded A, zero B
    layer = lambda model: model.base_model.model.transformer.h[0].attn.c_attn  # noqa: E731
    assert type(layer(qlora).base_layer).__name__ == "Linear4bit" and type(layer(lora).base_layer).__name__ == "Conv1D"
    assert layer(qlora).scaling == layer(lora).scaling == {"default": 16 / 4}
    assert layer(qlora).lora_dropout["default"].p == layer(lora).lora_dropout["default"].p == 0.05


def test_alpaca_prompt_has_input_only_when_given():
    without_input = "### Instruction:\nName a color.\n\n### Response:\n"
    assert alpaca_prompt({"instruction": "Name a color.", "input": ""}) == without_input
    assert alpaca_prompt({"instruction": "Name a color.", "input": "  "}) == without_input
    assert alpaca_prompt({"instruction": "Translate.", "input": "Hello"}) == (
        "### Instruction:\nTranslate.\n\n### Input:\nHello\n\n### Response:\n")
    assert alpaca_prompt({"instruction": "No input column."}) == "### Instruction:\nNo input column.\n\n### Response:\n"


def test_sample_and_split():
    train, held_out, data = alpaca_rows(str(SAMPLE_DATA), 0, 4, 3407)
    sample = read_jsonl(SAMPLE_DATA)  # every row has an instruction and an output: all usable
    assert (data["rows"], data["kept"], data["train"], data["held_out"]) == (len(sample), len(sample), len(sample) - 4, 4)
    assert sorted(json.dumps(r, sort_keys=True) for r in train + held_out) == sorted(
        json.dumps(r, sort_keys=True) for r in sample)  # every row once, unchanged
    assert any(not row["input"] for row in sample)  # the no-input case alpaca_prompt handles is in the sample
    assert not {id(row) for row in train} & {id(row) for row in held_out}
    assert len(alpaca_rows(str(SAMPLE_DATA), 50, 4, 3407)[0]) == 50


@pytest.mark.parametrize("pad_to_multiple_of", [64, 1])
def test_batches_are_padded_to_a_multiple_of_the_configured_length(pad_to_multiple_of, tmp_path):
    rows = alpaca_rows(str(SAMPLE_DATA), 0, 4, 0)[0]
    cfg = Config(pad_to_multiple_of=pad_to_multiple_of)
    model, tokenizer = load_model(tiny_model("gpt2", rows), 256, "fp32", load_in_4bit=False,
                                  use_gradient_checkpointing=False)
    dataset = Dataset.from_list([{"prompt": alpaca_prompt(row), "completion": row["output"]} for row in rows[:16]])
    from trl import SFTTrainer
    from common.config import RunOptions
    session = SimpleNamespace(cfg=cfg, run=RunOptions(), recipe="gpt2_medium_qlora", rows_a_pass=4, accumulation=1,
                              report_to=["none"], folder=SimpleNamespace(checkpoints=tmp_path), hardware=detect("fp32"))
    trainer = SFTTrainer(model=add_lora(model, "lora", 2, cfg, cfg.seed), processing_class=tokenizer,
                         train_dataset=dataset, args=study_arguments(session, cfg.seed))
    widths = [(batch["input_ids"].shape[1], int(batch["attention_mask"].sum(1).max()))
              for batch in trainer.get_train_dataloader()]
    assert len(widths) == 4
    for padded, longest in widths:
        assert padded % pad_to_multiple_of == 0 and longest <= padded < longest + pad_to_multiple_of
    assert any(padded > longest for padded, longest in widths) == (pad_to_multiple_of > 1)


@pytest.mark.parametrize("argv, message", [
    (["--only", "both"], "--only both: use qlora or lora"),
    (["--pad-to-multiple-of", "0"], "--pad-to-multiple-of 0: use 1"),
    (["--ranks", "0,4"], "--ranks 0,4: give positive LoRA ranks"),
    (["--stop-after-step", "3"], "not supported by this study"),
])
def test_bad_options_are_one_line_errors(argv, message, tmp_path):
    with pytest.raises(UserError, match=message):
        main(["--smoke", *argv, "--output-dir", str(tmp_path)])


def test_data_without_alpaca_columns_is_a_one_line_error(tmp_path):
    bad = tmp_path / "chat.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n')
    expected = r"chat.jsonl: expected Alpaca columns instruction, input, output; found \['answer', 'question'\]"
    with pytest.raises(UserError, match=expected):
        main(["--smoke", "--data", str(bad), "--output-dir", str(tmp_path)])
    few = tmp_path / "few.jsonl"
    few.write_text('{"instruction": "i", "input": "", "output": "o"}\n' * 3)
    with pytest.raises(UserError, match="few.jsonl: 3 usable rows; need more than --eval-prompts 4"):
        main(["--smoke", "--data", str(few), "--output-dir", str(tmp_path)])
