"""The benchmark harness: its arithmetic by hand, the committed report against the committed results, the bundled chat
sample, fixed-length rows, the fast side's packed batches, and a --smoke run of the whole harness on CPU (one recipe,
both regimes, every side as a separate process)."""
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import benchmark, fast_hf_sft, plan, report, shapes
from bench.plain_sft import pad_to_longest
from common.callbacks import MetricsRecorder
from tests.conftest import REPO


def test_mfu_ratio_and_verdict_by_hand():
    # 8e9 parameters at 5,000 tokens/s: 6 * 8e9 * 5e3 = 2.4e14 FLOP/s of a 7e14 peak.
    assert report.mfu(8_000_000_000, 5_000.0, 700e12) == pytest.approx(0.342857, rel=1e-5)
    assert report.mfu(8_000_000_000, None, 700e12) is None
    assert report.ratio(5_222.0, 3_293.0) == pytest.approx(1.58579, rel=1e-5)
    assert report.ratio(6.01, 9.18) == pytest.approx(0.65468, rel=1e-4)
    assert report.ratio(1.0, None) is None and report.ratio(1.0, 0.0) is None
    assert report.verdict("fixed", "llama-3-8b", 1.60, 0.64) == "pass"
    assert report.verdict("fixed", "llama-3-8b", 1.58, 0.64) == "FAIL"  # not fast enough
    assert report.verdict("fixed", "llama-3-8b", 1.60, 0.66) == "FAIL"  # not lean enough
    assert report.verdict("fixed", "gpt2-medium", 1.66, None) == "n/a"  # no GPU memory reading (CPU)
    assert report.verdict("chat", "llama-3.2-1b", 2.0, None) == "pass"  # chat: tokens/s only
    assert report.verdict("chat", "llama-3.2-1b", 1.99, 0.5) == "FAIL"


def test_the_committed_report_is_what_the_committed_results_give():
    results = json.loads((REPO / "bench" / "results.json").read_text())
    assert report.markdown(results) == (REPO / "BENCHMARKS.md").read_text(), (
        "regenerate with: python -m bench.benchmark --report-only")


def test_importing_the_harness_loads_neither_torch_nor_transformers():
    """--report-only stays instant, and a process that measures can still import Unsloth before transformers."""
    imported = subprocess.run([sys.executable, "-c", "import sys, bench.benchmark; "
                               "print(*sorted({'torch', 'transformers', 'unsloth'} & set(sys.modules)))"],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
    assert imported.returncode == 0 and imported.stdout.split() == [], imported.stdout + imported.stderr[-2000:]


def test_a_failed_side_is_one_row_naming_it_and_batching_is_read_from_unsloth_log():
    failed = {"error": "exit 2: error: unknown flag --ranks | see --help"}
    runs = {"gpt2_medium_qlora/chat": {"recipe": "gpt2_medium_qlora", "regime": "chat", "shape": "gpt2-medium",
                                       "recipe_side": failed, "plain_side": {"tokens_per_s": 1.0}}}
    header, _, row = report.table(runs)
    assert len(row.strip("|").split("|")) == len(header.strip("|").split("|")) == 12
    assert "recipe side failed: exit 2: error: unknown flag --ranks / see --help" in row and row.endswith("| error |")
    auto = "x\n🦥 Unsloth: Padding-free auto-enabled, enabling faster training.\n"
    assert benchmark.batching_logged(auto) == "padding-free"
    chosen = ("Unsloth: Padded batches + per-block compile chosen over padding-free (host bound (padded micro batch "
              "~12 ms of GPU work)). Set UNSLOTH_PADDING_CHOICE=padding_free to override.")
    assert benchmark.batching_logged(chosen) == "padded (host bound (padded micro batch ~12 ms of GPU work))"
    assert benchmark.batching_logged("nothing said") == "not logged"
    refused = auto + ("Unsloth: UNSLOTH_TOKEN_BUDGET not splitting: the loss is a per-micro-batch mean (no shared "
                      "num_items_in_batch, or label smoothing).\n")
    assert benchmark.batching_logged(refused) == ("token budget refused (the loss is a per-micro-batch mean (no shared "
                                                  "num_items_in_batch, or label smoothing))")


def test_raw_unsloth_table_scores_overhead_and_skips_rows_measured_without_it():
    side = lambda tokens, step, peak: {"tokens_per_s": tokens, "median_step_time_s": step, "peak_gpu_memory_gib": peak}
    runs = {
        "llama3_8b/fixed": {"recipe": "llama3_8b", "regime": "fixed", "shape": "llama-3-8b",
                            "recipe_side": side(4_800.0, 3.4, 6.0), "plain_side": side(3_200.0, 5.1, 8.9),
                            "raw_side": {**side(5_000.0, 3.3, 6.1), "batching": "padding-free"}},
        "llama3_8b/chat": {"recipe": "llama3_8b", "regime": "chat", "shape": "llama-3-8b",
                           "recipe_side": side(2_000.0, 2.0, 6.0), "plain_side": side(900.0, 6.0, 8.8),
                           "raw_side": {"error": "exit 1: CUDA out of memory | retry"}},
        "llama32_1b_mlp/fixed": {"recipe": "llama32_1b_mlp", "regime": "fixed", "shape": "llama-3.2-1b",
                                 "recipe_side": side(1.0, 1.0, 1.0), "plain_side": side(1.0, 1.0, 1.0)},
        "gpt2_medium_qlora/fixed": {"recipe": "gpt2_medium_qlora", "regime": "fixed", "shape": "gpt2-medium",
                                    "recipe_side": side(900.0, 0.1, 1.8), "plain_side": side(1_000.0, 0.1, 5.4),
                                    "raw_side": side(1_000.0, 0.1, 1.9)},
    }
    header, _, *rows = report.raw_table(runs)
    assert len(rows) == 3  # llama32_1b_mlp was measured before raw Unsloth was a side
    fixed, chat, gpt2 = ([cell.strip() for cell in row.strip("|").split("|")] for row in rows)
    assert len(fixed) == len(chat) == len(header.strip("|").split("|")) == 10
    # 4,800 / 5,000 = 0.96 of raw Unsloth: inside the noise allowance; raw 5,000 / plain 3,200 = 1.5625
    assert fixed[2:6] == ["4,800 / 5,000 / 3,200", "0.96x", "1.56x", ">= 1.59x"]
    assert fixed[6:] == ["3.400 / 3.300", "6.00 / 6.10", "padding-free", "pass"]
    assert chat[2] == "raw side failed: exit 1: CUDA out of memory / retry" and chat[-1] == "error"
    assert gpt2[3] == "0.90x" and gpt2[-1] == "FAIL"  # 10% slower than raw Unsloth


def test_fast_table_scores_speed_and_memory_and_skips_rows_measured_without_it():
    side = lambda tokens, step, peak: {"tokens_per_s": tokens, "median_step_time_s": step, "peak_gpu_memory_gib": peak}
    liger = {"liger": list(fast_hf_sft.LLAMA_KERNELS), "liger_reason": None, "collator": "DataCollatorWithFlattening"}
    run = lambda recipe, regime, shape, ours, fast: {"recipe": recipe, "regime": regime, "shape": shape,
                                                      "recipe_side": ours, "plain_side": side(1.0, 1.0, 1.0),
                                                      "fast_side": fast}
    runs = {
        "llama3_8b/fixed": run("llama3_8b", "fixed", "llama-3-8b", side(4_800.0, 3.4, 6.0),
                               {**side(4_000.0, 4.1, 7.5), **liger}),
        "llama3_8b/chat": run("llama3_8b", "chat", "llama-3-8b", side(2_000.0, 2.0, 6.0),
                              {**side(2_100.0, 1.9, 6.5), **liger}),
        "llama32_1b_mlp/fixed": {"recipe": "llama32_1b_mlp", "regime": "fixed", "shape": "llama-3.2-1b",
                                 "recipe_side": side(1.0, 1.0, 1.0), "plain_side": side(1.0, 1.0, 1.0)},
        "tinyllama_sentiment/fixed": run("tinyllama_sentiment", "fixed", "tinyllama-1.1b", side(9_000.0, 0.5, 1.6),
                                         {**side(9_000.0, 0.5, 1.5), **liger}),
        "gpt2_medium_qlora/fixed": run("gpt2_medium_qlora", "fixed", "gpt2-medium", side(9_000.0, 0.1, 1.8),
                                       {**side(6_000.0, 0.2, 2.4), "liger": [],
                                        "liger_reason": "liger-kernel has no patch for gpt2 models"}),
        "gpt2_medium_qlora/chat": run("gpt2_medium_qlora", "chat", "gpt2-medium", side(9_000.0, 0.1, 1.8),
                                      {"error": "exit 1: CUDA out of memory | retry"}),
        "llama31_8b_qlora/fixed": run("llama31_8b_qlora", "fixed", "llama-3.1-8b", side(5_000.0, 2.0, None),
                                      {**side(4_000.0, 2.5, None), **liger}),
    }
    header, _, *rows = report.fast_table(runs)
    assert len(rows) == 6  # llama32_1b_mlp was measured before the fast script was a side
    cells = {tuple(c[:2]): c for c in ([cell.strip() for cell in row.strip("|").split("|")] for row in rows)}
    assert all(len(c) == len(header.strip("|").split("|")) == 9 for c in cells.values())
    # 4,800 / 4,000 = 1.20x the tokens/s at 6.0 / 7.5 = 0.80x the memory
    assert cells["llama3_8b", "fixed"][2:] == ["4,800 / 4,000", "1.20x", "6.00 / 7.50", "0.80x", "3.400 / 4.100",
                                               "rope, rms_norm, swiglu, fused_linear_cross_entropy", "pass"]
    assert cells["llama3_8b", "chat"][3] == "0.95x" and cells["llama3_8b", "chat"][-1] == "FAIL"  # leaner, slower
    assert cells["tinyllama_sentiment", "fixed"][3:6:2] == ["1.00x", "1.07x"]  # as fast, 0.1 GiB more
    assert cells["tinyllama_sentiment", "fixed"][-1] == "FAIL"
    assert cells["gpt2_medium_qlora", "fixed"][7:] == ["none (liger-kernel has no patch for gpt2 models)", "pass"]
    assert cells["gpt2_medium_qlora", "chat"][2] == "fast side failed: exit 1: CUDA out of memory / retry"
    assert cells["gpt2_medium_qlora", "chat"][-1] == "error"
    assert cells["llama31_8b_qlora", "fixed"][5:] == ["n/a", "2.000 / 2.500", cells["llama3_8b", "fixed"][7], "n/a"]


@pytest.mark.parametrize("family", ["llama-3", "gpt2"])
def test_packed_rows_under_sdpa_attend_only_to_themselves(family):
    """The fast side's batches: rows concatenated into one, position_ids restarting, no attention mask, no KV cache (as
    the fast side trains). transformers 5.17 (masking_utils.find_packed_sequence_indices) turns the restarts into a
    block-diagonal causal mask, so each row's logits are what the row alone gives. Without the restarts, or with a
    cache (the packed-row check then does not run), the second row sees the first."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, bos_token_id=0,
                                           eos_token_id=0, attn_implementation=fast_hf_sft.ATTENTION))
    else:
        model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                             attn_implementation=fast_hf_sft.ATTENTION))
    model.eval()
    assert model.config._attn_implementation == "sdpa"
    rows = [torch.randint(0, 100, (length,)) for length in (5, 7)]
    batch = fast_hf_sft.padding_free_collator()([{"input_ids": row} for row in rows])
    assert "attention_mask" not in batch
    with torch.no_grad():
        alone = torch.cat([model(input_ids=row[None], use_cache=False).logits[0] for row in rows])
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        unseparated = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
        cached = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits[0]
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)
    for seeing_the_first_row in (unseparated, cached):  # the test can fail: the second row then reads the first
        assert not torch.allclose(seeing_the_first_row[5:], alone[5:], atol=1e-3)


def test_fast_side_batches_hold_no_padding_and_count_every_token(tmp_path, monkeypatch):
    features = [{"input_ids": [11, 12, 13]}, {"input_ids": [21, 22, 23, 24, 25]}, {"input_ids": [31, 32]}]
    collate = fast_hf_sft.padding_free_collator()
    batch = collate(features)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention mask: nothing is padding
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, 23, 24, 25, 31, 32]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 12, 13, -100, 22, 23, 24, 25, -100, 32]]  # no row predicts the next
    counted = {}
    for side, collator in (("fast", collate), ("plain", pad_to_longest(pad_id=0))):
        recorder = MetricsRecorder(tmp_path / f"{side}.jsonl")
        trainer = SimpleNamespace(data_collator=collator, model=SimpleNamespace(training=True))
        recorder.count_tokens_of(trainer)
        trainer.data_collator(features)
        counted[side] = recorder.tokens_seen
    assert counted == {"fast": 10, "plain": 10}  # input_ids.numel() on the fast side, the mask's sum on the plain one
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert fast_hf_sft.apply_liger("gpt2") == ([], "liger-kernel has no patch for gpt2 models")
    assert fast_hf_sft.apply_liger("llama") == ([], "no GPU: Liger's Triton kernels need CUDA")


def test_a_reference_side_run_again_in_the_same_work_dir_times_only_its_own_steps(tmp_path, monkeypatch):
    """MetricsRecorder appends to metrics.jsonl; a second benchmark run in the same work dir (a warm GPU machine) must
    not time the first run's steps as well."""
    def fake_run(command, log, timeout):  # what bench/plain_sft.py or bench/unsloth_sft.py leaves: 4 steps a file
        out = Path(command[command.index("--output-dir") + 1])
        for data in command[command.index("--data") + 1:command.index("--max-steps")]:
            folder = out / Path(data).stem
            folder.mkdir(parents=True, exist_ok=True)
            recorder = MetricsRecorder(folder / "metrics.jsonl")
            for step in range(1, 5):
                recorder.step_times.append(0.5)
                recorder.on_log(None, SimpleNamespace(global_step=step), None, logs={"loss": 1.0})
            (folder / "result.json").write_text(json.dumps({"optimizer": "adamw", "padding_fraction": 0.0, "liger": [],
                                                            "liger_reason": "no GPU", "collator": "Flattening"}))
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("Unsloth: Padding-free auto-enabled\n")
        return 0, 1.0

    monkeypatch.setattr(benchmark, "run_logged", fake_run)
    settings = dict(max_seq_length=64, per_device_train_batch_size=1, gradient_accumulation_steps=1, lora_r=8,
                    lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj"], optim="adamw_torch",
                    learning_rate=2e-4, load_in_4bit=True, gradient_checkpointing=True)
    data = {"fixed": {"plain_file": str(tmp_path / "r-fixed-plain.jsonl")}}
    for _ in range(2):
        for side in benchmark.REFERENCE_SCRIPTS:
            measured = benchmark.run_reference_side(side, "r", settings, "model", data, 4, 1, tmp_path, "bf16", 60)
            assert measured["fixed"]["timed_steps"] == 3 and measured["fixed"]["step_times_s"] == [0.5] * 3
            if side == "fast":  # what its result.json says of Liger and the collator
                assert {key: measured["fixed"][key] for key in ("liger", "liger_reason", "collator")} == {
                    "liger": [], "liger_reason": "no GPU", "collator": "Flattening"}
    assert measured["fixed"]["batching"] == "padding-free"  # raw Unsloth's choice, read from its log


def test_a_recipe_that_raises_is_an_error_row_in_every_table(tmp_path, monkeypatch):
    def renamed_field(name, *args):
        raise AttributeError("'Config' object has no attribute 'lora_r'")
    monkeypatch.setattr(benchmark, "benchmark_recipe", renamed_field)
    benchmark.main(["--smoke", "--recipes", "llama3_8b", "--regimes", "fixed", "--work-dir", str(tmp_path),
                    "--out", str(tmp_path / "BENCH.md")])
    markdown = (tmp_path / "BENCH.md").read_text()
    plain_table, raw_table = markdown.split("## Recipes against raw Unsloth")
    raw_table, fast_table = raw_table.split("## Recipes against the fast HF script")
    for section in (plain_table, raw_table, fast_table):
        row = next(line for line in section.splitlines() if line.startswith("| llama3_8b | fixed | "))
        assert "recipe side failed: AttributeError: 'Config' object has no attribute 'lora_r'" in row
        assert row.endswith("| error |")


def strings(value):
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            yield from strings(item)
    elif isinstance(value, str):
        yield value


def assert_no_absolute_path(results: dict):
    """results.json is kept in git: no string in it (a log, a data file, an error naming a log, the command line) may
    hold a path of the machine it ran on."""
    for text in strings(results):
        absolute = [word for word in re.split(r"[\s=():`,]+", text) if os.path.isabs(word)]
        assert not absolute, f"absolute path in {text!r}"


def test_timed_metrics_leave_out_warmup_and_weigh_rates_by_time():
    records = [{"step": 1, "loss": 9.0, "step_time_s": 30.0, "tokens_per_s": 10.0, "peak_gpu_memory_gib": 5.0},
               {"step": 2, "loss": 8.0, "step_time_s": 1.0, "tokens_per_s": 100.0, "peak_gpu_memory_gib": 6.0},
               {"step": 2, "eval_loss": 8.5},
               {"step": 3, "loss": 7.0, "step_time_s": 3.0, "tokens_per_s": 200.0, "peak_gpu_memory_gib": 6.5}]
    timed = benchmark.timed_metrics(records, warmup=1)
    assert timed["tokens_per_s"] == pytest.approx((100 * 1 + 200 * 3) / 4)  # 700 tokens in 4 s
    assert timed["median_step_time_s"] == pytest.approx(2.0)
    assert timed["peak_gpu_memory_gib"] == 6.5 and timed["timed_steps"] == 2
    assert timed["step_times_s"] == [1.0, 3.0]


def test_bundled_chat_sample_is_the_generator_output_with_a_long_tail():
    shipped = benchmark.read_jsonl(benchmark.CHAT_SAMPLE)
    assert shipped == benchmark.chat_sample(), "regenerate with: python -m bench.benchmark --rebuild-chat-sample"
    assert benchmark.CHAT_SAMPLE.stat().st_size < 1_000_000
    words = [sum(len(m["content"].split()) for m in row["messages"]) for row in shipped]
    assert 180 <= statistics.median(words) <= 260 and min(words) >= 16
    assert max(words) >= 1_000 and sum(w > 1_000 for w in words) >= 5  # the long tail padding wastes most on
    assert {m["role"] for row in shipped for m in row["messages"]} == {"user", "assistant"}


def test_fixed_rows_sit_just_under_the_sequence_length(tmp_path):
    from common.smoke import train_tokenizer
    from unsloth import get_chat_template
    import recipes.llama3_8b as recipe

    tokenizer = get_chat_template(train_tokenizer([" ".join(shapes.WORDS)] * 50, "llama-3"), chat_template="llama-3")
    cfg = recipe.Config(max_seq_length=300, per_device_train_batch_size=2, gradient_accumulation_steps=1)
    written = benchmark.write_data("llama3_8b", plan.RECIPES["llama3_8b"], recipe, cfg, tokenizer,
                                   ["fixed", "chat"], steps=2, folder=tmp_path)
    fixed, chat = written["fixed"], written["chat"]
    assert 300 - benchmark.MARGIN - 4 <= fixed["tokens_min"] <= fixed["tokens_max"] <= 300 - benchmark.MARGIN
    assert fixed["rows"] == 10  # 2 rows x 1 accumulation x (2 steps + 2), a quarter more for the eval split
    assert chat["tokens_min"] < chat["tokens_mean"] / 2 and chat["tokens_max"] <= 300 - benchmark.MARGIN
    assert chat["rows"] == len(benchmark.read_jsonl(chat["recipe_file"]))
    assert chat["rows"] == len(benchmark.read_jsonl(chat["plain_file"]))
    recipe_rows = benchmark.read_jsonl(fixed["recipe_file"])
    plain_rows = benchmark.read_jsonl(fixed["plain_file"])
    assert plain_rows[0]["text"] == tokenizer.apply_chat_template(recipe_rows[0]["messages"], tokenize=False)


def test_smoke_harness_writes_the_table_for_both_regimes(tmp_path):
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-m", "bench.benchmark", "--smoke", "--recipes", "llama3_8b",
                             "--work-dir", str(tmp_path), "--out", str(tmp_path / "BENCH.md")],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": pythonpath}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    runs = results["runs"]
    assert set(runs) == {"llama3_8b/fixed", "llama3_8b/chat"}
    assert_no_absolute_path(results)
    assert f"--work-dir {os.path.relpath(tmp_path, REPO)} " in results["sessions"][0]["command"]
    for run in runs.values():  # each stored path is found from the repository root
        paths = [run["data"]["recipe_file"], run["data"]["plain_file"], run["recipe_side"]["run_folder"],
                 *(run[side]["log"] for side in ("recipe_side", "plain_side", "fast_side", "raw_side"))]
        assert all((REPO / path).exists() for path in paths), paths
    markdown = (tmp_path / "BENCH.md").read_text()
    for regime in ("fixed", "chat"):
        run = runs[f"llama3_8b/{regime}"]
        ours, plain = run["recipe_side"], run["plain_side"]
        assert ours["tokens_per_s"] > 0 and plain["tokens_per_s"] > 0 and ours["timed_steps"] == 2
        assert ours["manifest"]["token_budget"] == {  # the card's rows a pass, as the reference sides run them
            "setting": "card", "tokens_a_pass": 2 * 256, "passes_a_full_step": 2}
        settings_row = next(line for line in markdown.split("## Settings")[1].splitlines()
                            if line.startswith(f"| llama3_8b | {regime} | "))
        assert settings_row.endswith(f", passes of at most 512 tokens (card) | CPU, {run['measured_utc'][:10]} |")
        assert "fused" in ours["optimizer"] and "bitsandbytes" in plain["optimizer"]  # Unsloth's CPU swap vs bnb
        assert (tmp_path / "runs" / "llama3_8b").is_dir() and (tmp_path / "logs" / "llama3_8b-plain.log").is_file()
        row = next(line for line in markdown.splitlines() if line.startswith(f"| llama3_8b | {regime} | "))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        speed = report.ratio(ours["tokens_per_s"], plain["tokens_per_s"])
        assert cells[2] == f"{ours['tokens_per_s']:,.0f} / {plain['tokens_per_s']:,.0f}"
        assert cells[3] == f"{speed:.2f}x" and cells[4] == (">= 1.59x" if regime == "fixed" else ">= 2.00x")
        assert re.fullmatch(r"\d+\.\d{3} / \d+\.\d{3}", cells[5])  # median step times
        assert re.fullmatch(r"\d+\.\d% / \d+\.\d%", cells[9])  # MFU, against the CPU's measured peak
        assert cells[-1] == ("n/a" if regime == "fixed" else "pass" if speed >= 2 else "FAIL")  # no memory on CPU
        raw = run["raw_side"]  # raw Unsloth (bench/unsloth_sft.py) on the same rows
        assert raw["tokens_per_s"] > 0 and raw["timed_steps"] == 2 and "fused" in raw["optimizer"]
        assert (tmp_path / "raw" / "llama3_8b" / f"llama3_8b-{regime}-plain" / "metrics.jsonl").is_file()
        raw_row = next(line for line in markdown.split("## Recipes against raw Unsloth")[1].splitlines()
                       if line.startswith(f"| llama3_8b | {regime} | "))
        cells = [cell.strip() for cell in raw_row.strip("|").split("|")]
        over_raw = report.ratio(ours["tokens_per_s"], raw["tokens_per_s"])
        assert cells[2] == f"{ours['tokens_per_s']:,.0f} / {raw['tokens_per_s']:,.0f} / {plain['tokens_per_s']:,.0f}"
        assert cells[3] == f"{over_raw:.2f}x"
        assert cells[4] == f"{report.ratio(raw['tokens_per_s'], plain['tokens_per_s']):.2f}x"
        assert cells[-1] == ("pass" if over_raw >= report.NO_OVERHEAD else "FAIL")
        fast = run["fast_side"]  # bench/fast_hf_sft.py: padding-free and SDPA; no Liger without a GPU
        assert fast["tokens_per_s"] > 0 and fast["timed_steps"] == 2 and "bitsandbytes" in fast["optimizer"]
        assert fast["liger"] == [] and fast["liger_reason"] == "no GPU: Liger's Triton kernels need CUDA"
        assert fast["collator"] == "DataCollatorWithFlattening"
        fast_result = json.loads((tmp_path / "fast" / "llama3_8b" / f"llama3_8b-{regime}-plain" / "result.json")
                                 .read_text())
        plain_result = json.loads((tmp_path / "plain" / "llama3_8b" / f"llama3_8b-{regime}-plain" / "result.json")
                                  .read_text())
        assert fast_result["tokens_trained"] == plain_result["tokens_trained"]  # the same rows' real tokens
        fast_row = next(line for line in markdown.split("## Recipes against the fast HF script")[1].splitlines()
                        if line.startswith(f"| llama3_8b | {regime} | "))
        cells = [cell.strip() for cell in fast_row.strip("|").split("|")]
        assert cells[2:4] == [f"{ours['tokens_per_s']:,.0f} / {fast['tokens_per_s']:,.0f}",
                              f"{report.ratio(ours['tokens_per_s'], fast['tokens_per_s']):.2f}x"]
        assert cells[7:] == ["none (no GPU: Liger's Triton kernels need CUDA)", "n/a"]  # no memory reading on CPU
    assert runs["llama3_8b/fixed"]["data"]["tokens_max"] <= 256 - benchmark.MARGIN  # --smoke: max_seq_length 256
    padding = {regime: runs[f"llama3_8b/{regime}"]["plain_side"]["padding_fraction"] for regime in ("fixed", "chat")}
    assert padding["fixed"] < 0.05 < padding["chat"]
    assert "Smoke run on CPU" in markdown and "`python -m bench.benchmark --smoke --recipes llama3_8b" in markdown


def test_each_variant_runs_the_recipe_with_its_own_token_budget_once(tmp_path, monkeypatch):
    bench = plan.RECIPES["llama3_8b"]
    prepared = benchmark.Prepared(bench, 4, 2, True, benchmark.recipe_flags(bench.flags, 4, False),
                                  {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 8}, "model",
                                  {"chat": {"recipe_file": "chat.jsonl"}})
    monkeypatch.setattr(benchmark, "prepare", lambda name, args, work: prepared)
    runs = []
    monkeypatch.setattr(benchmark, "run_recipe_side", lambda name, bench, flags, *rest, gpus, label: (
        runs.append((gpus, flags)) or {"error": "not run"}))
    args = SimpleNamespace(gpus=[2], token_budgets=["card", "auto"], regimes=["chat"], smoke=False, side_timeout=1)
    benchmark.measure_variants("llama3_8b", args, None, tmp_path)
    budgets = [(gpus, [flags[i + 1] for i, flag in enumerate(flags) if flag == "--token-budget"])
               for gpus, flags in runs]
    assert sorted(budgets) == [(1, ["auto"]), (1, ["card"]), (2, ["auto"])]


def test_scaling_and_token_budget_tables_by_hand():
    side = lambda tokens, peak, per_gpu=None, tokens_a_pass=None: {
        "tokens_per_s": tokens, "median_step_time_s": 1.0, "peak_gpu_memory_gib": peak,
        "peak_gpu_memory_gib_per_gpu": per_gpu, "manifest": {"token_budget": {"tokens_a_pass": tokens_a_pass}}}
    key = report.variant_key
    variants = {
        "llama3_8b/chat": {"recipe": "llama3_8b", "regime": "chat", "shape": "llama-3-8b", "effective_batch": 16,
                           "sides": {key(1, "card"): side(2_000.0, 6.0, tokens_a_pass=2048),
                                     key(1, "auto"): side(3_100.0, 9.0, tokens_a_pass=16384),
                                     key(2, "auto"): side(5_890.0, 9.0, [7.5, 7.1])}},
        "llama3_8b/fixed": {"recipe": "llama3_8b", "regime": "fixed", "shape": "llama-3-8b", "effective_batch": 16,
                            "sides": {key(1, "card"): side(5_000.0, 6.0, tokens_a_pass=2048),
                                      key(1, "auto"): side(4_700.0, 9.0, tokens_a_pass=16384),
                                      key(2, "auto"): side(9_000.0, 9.0, [9.5, 9.1])}},
        "tinyllama_sentiment/chat": {"recipe": "tinyllama_sentiment", "regime": "chat", "shape": "tinyllama-1.1b",
                                     "effective_batch": 32,
                                     "sides": {key(1, "default"): side(4_000.0, 1.4),
                                               key(2, "default"): {"error": "exit 2: error: no NCCL"}}},
    }
    scaling = report.scaling_table(variants)[2:]
    # 8B fixed: 9,000 / 4,700 = 1.91x but a GPU peaked at 9.5 GiB, above one GPU's 9.0: FAIL
    assert scaling[0] == ("| llama3_8b | fixed | 16 | 4,700 / 9,000 | 1.91x | >= 1.85x | 1.000 / 1.000 | 9.00 / 9.50 "
                          "| FAIL |")
    assert scaling[1].startswith("| llama3_8b | chat | 16 | 3,100 / 5,890 | 1.90x |") and scaling[1].endswith(
        "| 9.00 / 7.50 | pass |")
    assert scaling[2].startswith("| tinyllama_sentiment | chat | 2 GPUs side failed: exit 2: error: no NCCL |")
    budget = report.budget_table(variants)[2:]
    assert len(budget) == 2  # tinyllama has no token budget: no row
    # fixed rows: 4,700 / 5,000 = 0.94x, under the 0.95 noise floor: FAIL; chat: 1.55x against 1.5: pass
    assert budget[0] == ("| llama3_8b | fixed | 5,000 / 4,700 | 0.94x | >= 0.95x | 1.000 / 1.000 | 6.00 / 9.00 "
                         "| 2,048 / 16,384 | FAIL |")
    assert budget[1].startswith("| llama3_8b | chat | 2,000 / 3,100 | 1.55x | >= 1.50x |")
    assert budget[1].endswith("| 2,048 / 16,384 | pass |")
    markdown = report.markdown({"runs": {}, "sessions": [], "variants": variants})
    assert "## Scaling: 1 GPU against 2" in markdown and "## Token budget: card against auto on one GPU" in markdown


def test_a_side_past_its_timeout_is_stopped_with_every_process_it_started(tmp_path):
    """torchrun starts its workers in sessions of their own: a timed-out side must not leave them holding the GPU."""
    import psutil
    pid_file = tmp_path / "worker.pid"
    launcher = ("import subprocess, sys, time; "
                "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
                "start_new_session=True); "
                f"open({str(pid_file)!r}, 'w').write(str(worker.pid)); time.sleep(120)")
    code, wall = benchmark.run_logged([sys.executable, "-c", launcher], tmp_path / "side.log", timeout=5)
    assert code is None and wall < 60
    worker = int(pid_file.read_text())
    assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE
