"""Each recipe against raw Unsloth, a plain transformers + PEFT + bitsandbytes script and a fast one, on one GPU.

Tokens/s, step time, memory and MFU. For each recipe in RECIPES and each data regime (fixed: every row just under
max_seq_length tokens; chat: the bundled bench/data/chat_lengths.jsonl, a realistic spread of lengths), separate
processes train on the same GPU one after the other: the recipe itself (`python -m recipes.<name>` on a random-init
model of its card's shape, built by tests/gpu/conftest.py), bench/plain_sft.py (padded batches), bench/fast_hf_sft.py
(the same with Liger kernels and padding-free batches: the strongest plain peer) and bench/unsloth_sft.py (raw
Unsloth) with the same shape, LoRA, batch, accumulation, sequence length, precision and optimiser, read from the
recipe's own Config. Every side is timed by common.callbacks.MetricsRecorder and summarised by the same arithmetic,
warm-up steps left out. Results merge into bench/results.json (kept in git, so a run of some recipes keeps the others'
rows; its paths are relative to the repository root); BENCHMARKS.md is regenerated from every result there. Models,
data, run folders and logs: bench/out. The fast side needs liger-kernel on the GPU machine: after requirements.txt,
`pip install -r bench/requirements.txt`.

  python -m bench.benchmark                                        # every recipe, both regimes
  python -m bench.benchmark --recipes llama3_8b,llama31_8b_qlora   # a subset; merges with the results already there
  python -m bench.benchmark --report-only                          # regenerate BENCHMARKS.md from results.json
  python -m bench.benchmark --smoke                                # the whole harness on CPU, tiny models, temp dir
  python -m bench.benchmark --rebuild-chat-sample                  # rewrite bench/data/chat_lengths.jsonl
"""
import argparse
import functools
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHAT_SAMPLE = REPO / "bench" / "data" / "chat_lengths.jsonl"
NOTES = REPO / "bench" / "notes.md"  # hand-written analysis, copied into BENCHMARKS.md under the generated tables
RESULTS = REPO / "bench" / "results.json"  # every measured row; BENCHMARKS.md is generated from it
REGIMES = ("fixed", "chat")
MARGIN = 8  # a row stays this many tokens under max_seq_length: no recipe drops or truncates it
NO_EVAL = 1_000_000  # an evaluation / checkpoint cadence past the last step: none during the timed run
AT_LAST_STEP = "at last step"  # replaced by the step count: for a recipe that needs one evaluation to keep a checkpoint


@dataclass(frozen=True)
class Bench:
    shape: str  # tests/gpu/conftest.py's name for the card's architecture (random-init weights)
    data_format: str  # what the recipe's --data reads: messages, text_label or alpaca
    steps: int  # optimizer steps a side: a few timed after warm-up, inside the time budget
    flags: dict = field(default_factory=dict)  # recipe fields set here: evaluation and generation cut to a minimum
    metrics: str = "metrics.jsonl"  # the recipe's MetricsRecorder file (a glob) inside its run folder
    gradient_checkpointing: bool = True  # as the recipe's get_peft_model sets it; the plain side does the same


# One row a recipe. Sequence length, batch, accumulation, LoRA and optimiser are read from the recipe's Config.
# token_budget="card": the reference sides run the card's rows a pass, so the recipe runs passes of at most that many
# tokens too and the memory columns compare like with like; `auto` (the default on a big GPU) trades memory for speed
# and has its own table (--token-budgets card,auto).
RECIPES = {
    "llama3_8b": Bench("llama-3-8b", "messages", 8,
                       dict(eval_steps=NO_EVAL, max_eval_samples=2, sample_prompts=0, token_budget="card")),
    "llama32_1b_mlp": Bench("llama-3.2-1b", "messages", 14,
                            dict(save_steps=NO_EVAL, held_out_questions=1, max_new_tokens=1, token_budget="card")),
    "tinyllama_sentiment": Bench("tinyllama-1.1b", "text_label", 14, dict(eval_steps=NO_EVAL, max_eval_samples=2,
                                                                        max_test_samples=0, generation_samples=0)),
    # 60: each new padded length (a multiple of 64, at most 8 under 512) costs its first step about 0.35 s once; over 10
    # timed steps those one-off costs weighed more than in the card's 200-step run (chat rows: 1.71x the plain script
    # over 10 timed steps, 2.29x over 55, on one H100). Steps take 0.1-0.3 s: 60 of them cost a side seconds.
    "gpt2_medium_qlora": Bench("gpt2-medium", "alpaca", 60,
                               dict(ranks=8, only="qlora", eval_prompts=2, max_new_tokens=1, max_samples=0),
                               metrics="metrics/qlora-r8.jsonl", gradient_checkpointing=False),
    "llama31_8b_qlora": Bench("llama-3.1-8b", "messages", 8,
                              dict(eval_steps=AT_LAST_STEP, max_eval_samples=2, sample_prompts=0, max_new_tokens=1,
                                   token_budget="card")),
}
# The repository's targets on fixed-length rows, (tokens/s ratio, memory ratio) over the plain script: what raw Unsloth
# reached against a plain transformers + PEFT + bitsandbytes script on an H100.
TARGETS = {"llama-3-8b": (1.59, 0.65), "llama-3.1-8b": (1.59, 0.65), "tinyllama-1.1b": (1.41, 0.53),
           "llama-3.2-1b": (1.07, 0.51), "gpt2-medium": (1.66, 0.47)}
CHAT_SPEEDUP = 2.0  # the repository's target on variable-length chat rows, over the padded plain script's tokens/s
SCALING_TARGET = 1.85  # 2 GPUs against 1 at the same effective batch: tokens/s, with per-GPU peak memory no higher
AUTO_BUDGET_CHAT_TARGET = 1.5  # --token-budget auto against card on chat rows, one GPU; fixed rows: no slower
NO_OVERHEAD = 0.95  # a recipe at this share of raw Unsloth's tokens/s or more adds nothing beyond run-to-run noise
# CPU-sized; accumulation 2 divides over the 2 processes of a --gpus 1,2 smoke run
SMOKE_FLAGS = dict(max_seq_length=256, per_device_train_batch_size=2, gradient_accumulation_steps=2)

# The chat sample: log-normal lengths around a few hundred tokens with a long tail, as in real chat exports.
CHAT_ROWS, CHAT_MEDIAN_WORDS, CHAT_SIGMA, CHAT_MIN_WORDS, CHAT_MAX_WORDS = 400, 220, 0.85, 16, 1900
EXCHANGES = (1, 1, 1, 2, 2, 3)  # most conversations are one question and answer; some run on


# ---- data ---------------------------------------------------------------------------------------------------------

@functools.cache
def gpu_conftest():
    """tests/gpu/conftest.py, loaded by path: the card shapes, their model builder and the tokenizer's word list."""
    spec = importlib.util.spec_from_file_location("gpu_conftest", REPO / "tests" / "gpu" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def conversation(rng: random.Random, words: int, exchanges: int = 1) -> list[dict]:
    """`exchanges` question/answer pairs of `words` words in all, a fifth of each pair asking. The words are those the
    GPU tests' tokenizer is trained on, about one token each."""
    vocabulary = gpu_conftest().WORDS
    messages = []
    for i in range(exchanges):
        share = words // exchanges + (i < words % exchanges)
        asked = max(1, share // 5)
        messages += [{"role": "user", "content": " ".join(rng.choices(vocabulary, k=asked))},
                     {"role": "assistant", "content": " ".join(rng.choices(vocabulary, k=max(1, share - asked)))}]
    return messages


def chat_sample(rows: int = CHAT_ROWS, seed: int = 0) -> list[dict]:
    """The chat regime's conversations (bench/data/chat_lengths.jsonl is exactly this): word counts log-normal, median
    220, clipped to 16-1,900, so the longest still fit a 2048-token recipe."""
    rng = random.Random(seed)
    sample = []
    for _ in range(rows):
        words = round(rng.lognormvariate(math.log(CHAT_MEDIAN_WORDS), CHAT_SIGMA))
        words = min(CHAT_MAX_WORDS, max(CHAT_MIN_WORDS, words))
        sample.append({"messages": conversation(rng, words, rng.choice(EXCHANGES))})
    return sample


def fixed_conversation(seed: int, limit: int, length) -> list[dict]:
    """One question and answer whose training text is `limit` tokens or a few under."""
    words = limit
    while True:
        messages = conversation(random.Random(seed), words)
        over = length(messages) - limit
        if over <= 0:
            return messages
        words -= over
        if words < 2:
            raise SystemExit(f"the template alone is over {limit} tokens: no fixed-length row fits")


def recipe_row(data_format: str, messages: list[dict], index: int) -> dict:
    """A conversation in the shape the recipe's --data reads."""
    asked = " ".join(m["content"] for m in messages if m["role"] == "user")
    answered = " ".join(m["content"] for m in messages if m["role"] == "assistant")
    if data_format == "messages":
        return {"messages": messages}
    if data_format == "alpaca":
        return {"instruction": asked, "input": "", "output": answered}
    return {"text": f"{asked} {answered}", "label": index % 3, "split": "train"}  # text_label


def training_text(data_format: str, row: dict, tokenizer, module, cfg) -> str:
    """The text the recipe trains on for that row, as the plain script is given it."""
    if data_format == "messages":  # standardised as the recipe's prepare_chat_data does (system prompt and all)
        from common.data import to_conversations
        (messages,), _ = to_conversations([row], "bench", getattr(cfg, "system_prompt", None) or None)
        return tokenizer.apply_chat_template(messages, tokenize=False)
    if data_format == "alpaca":  # TRL ends a completion with the end-of-text token
        return module.alpaca_prompt(row) + row["output"] + tokenizer.eos_token
    messages = module.prompt_messages(row["text"]) + [{"role": "assistant", "content": module.LABELS[row["label"]]}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def write_data(name: str, bench: Bench, module, cfg, tokenizer, regimes, steps: int, folder: Path) -> dict:
    """Per regime: the recipe's --data file, the plain script's file of the same rows' texts, and their lengths."""
    def length(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def text_of(row: dict) -> str:
        return training_text(bench.data_format, row, tokenizer, module, cfg)

    limit = cfg.max_seq_length - MARGIN
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for regime in regimes:
        if regime == "fixed":
            rows_needed = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * (steps + 2)
            count = math.ceil(rows_needed * 1.25)  # recipes hold some rows out for evaluation
            conversations = [fixed_conversation(i, limit, lambda m, i=i: length(text_of(recipe_row(bench.data_format,
                                                                                                   m, i))))
                             for i in range(count)]
        else:
            conversations = [row["messages"] for row in read_jsonl(CHAT_SAMPLE)
                             if length(text_of(recipe_row(bench.data_format, row["messages"], 0))) <= limit]
        rows = [recipe_row(bench.data_format, messages, i) for i, messages in enumerate(conversations)]
        lengths = [length(text_of(row)) for row in rows]
        plain_file = folder / f"{name}-{regime}-plain.jsonl"
        write_jsonl(plain_file, [{"text": text_of(row)} for row in rows])
        if bench.data_format == "text_label":  # the recipe also scores validation and test rows: one of each suffices
            rows += [{**rows[0], "split": "validation"}, {**rows[1], "split": "test"}]
        recipe_file = folder / f"{name}-{regime}.jsonl"
        write_jsonl(recipe_file, rows)
        written[regime] = {"recipe_file": relative(recipe_file), "plain_file": relative(plain_file),
                           "rows": len(lengths), "tokens_min": min(lengths), "tokens_mean": statistics.mean(lengths),
                           "tokens_max": max(lengths)}
    return written


def relative(path) -> str:
    """A path as results.json stores it: relative to the repository root, so the file reads the same on any machine
    (a work dir outside the repository gets a ../ path)."""
    return os.path.relpath(path, REPO)


def read_jsonl(path) -> list[dict]:
    """A JSONL file; a relative path is read from the repository root, as results.json stores it."""
    return [json.loads(line) for line in (REPO / path).read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]):
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows))


# ---- models, settings and the two sides ---------------------------------------------------------------------------

def model_folder(shape: str, smoke: bool, work: Path) -> str:
    """A random-init model of the shape (tiny in --smoke) under work/models, built once and reused by every recipe and
    run of that shape, as tests/gpu/conftest.py prepares it for the GPU tests (pre-quantized for the Llama cards)."""
    conftest = gpu_conftest()

    def tiny(shape: str, folder: Path):
        from common.smoke import tiny_model
        shutil.copytree(tiny_model(conftest.FAMILY[shape], [{"text": " ".join(conftest.WORDS)}]), folder,
                        dirs_exist_ok=True)
    return conftest.prepared_model(shape, work / "models", build=tiny if smoke else conftest.build_model)


def parameter_count(folder: str) -> int:
    """N for MFU: every parameter of the base model (tied embeddings once), counted on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    return sum(p.numel() for p in model.parameters())


def measured_peak_flops(precision: str) -> float:
    """FLOP/s of a large square matmul in the training precision: MFU's denominator, measured rather than the
    datasheet's."""
    import torch
    from common.hardware import torch_dtype
    on_gpu = torch.cuda.is_available()
    size, repeats = (8192, 100) if on_gpu else (512, 10)
    a, b = (torch.randn(size, size, dtype=torch_dtype(precision), device="cuda" if on_gpu else "cpu") for _ in "ab")

    def multiply(times: int):
        for _ in range(times):
            a @ b
        if on_gpu:
            torch.cuda.synchronize()
    multiply(3)
    started = time.perf_counter()
    multiply(repeats)
    elapsed = time.perf_counter() - started
    del a, b
    if on_gpu:
        torch.cuda.empty_cache()
    return 2 * size**3 * repeats / elapsed


def recipe_flags(fields: dict, steps: int, smoke: bool) -> list[str]:
    """A recipe's command-line flags for Bench.flags-style fields."""
    values = {**fields, **(SMOKE_FLAGS if smoke else {})}
    flags = []
    for name, value in values.items():
        value = steps if value == AT_LAST_STEP else value
        text = (",".join(map(str, value)) if isinstance(value, (list, tuple)) else
                str(value).lower() if isinstance(value, bool) else str(value))
        flags += ["--" + name.replace("_", "-"), text]
    return flags


def recipe_settings(module, cfg, bench: Bench) -> dict:
    """What the plain side must match, as the recipe resolves it from its Config; where a recipe derives a value, its
    own helper derives it here too, so the card's numbers live in the recipe alone."""
    rank = cfg.ranks[0] if hasattr(cfg, "ranks") else cfg.lora_r  # gpt2_medium_qlora studies a list of ranks
    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else module.lora_alpha_for(rank, None)  # llama31: 2 x rank
    targets = cfg.target_modules if hasattr(cfg, "target_modules") else module.TARGETS[cfg.targets]  # llama31: a name
    template = getattr(cfg, "chat_template", None) or (
        module.VARIANTS[cfg.variant][1] if hasattr(cfg, "variant") else None)  # llama31: the variant's template
    return dict(max_seq_length=cfg.max_seq_length, per_device_train_batch_size=cfg.per_device_train_batch_size,
                gradient_accumulation_steps=cfg.gradient_accumulation_steps, lora_r=rank, lora_alpha=alpha,
                lora_dropout=cfg.lora_dropout, target_modules=list(targets), optim=cfg.optim,
                learning_rate=cfg.learning_rate, load_in_4bit=getattr(cfg, "load_in_4bit", True),
                gradient_checkpointing=bench.gradient_checkpointing, chat_template=template)


def run_logged(command: list[str], log: Path, timeout: int) -> tuple[int | None, float]:
    """Run a side as its own process (output to `log`); returns (exit code or None on timeout, wall seconds)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=output, stderr=subprocess.STDOUT)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # every descendant: torchrun starts its workers in sessions of their own, and they hold GPU memory until
            # they end (psutil comes with accelerate)
            import psutil
            for child in psutil.Process(process.pid).children(recursive=True):
                child.kill()
            process.kill()
            process.wait()
            code = None
    return code, time.perf_counter() - started


def failure(log: Path, code: int | None) -> str:
    if code is None:
        return f"timed out (log: {relative(log)})"
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    reason = next((line for line in reversed(lines) if line.startswith("error:")), lines[-1] if lines else "no output")
    return f"exit {code}: {reason.strip()[:240]} (log: {relative(log)})"


def timed_metrics(records: list[dict], warmup: int) -> dict:
    """Median step time, tokens/s and peak memory from MetricsRecorder's per-step records, steps up to `warmup` left
    out; tokens/s is the per-step rates' mean weighted by step time (all tokens over all time). Both sides alike."""
    steps = [r for r in records if "loss" in r and "step_time_s" in r]
    timed = [r for r in steps if r["step"] > warmup] or steps
    rated = [r for r in timed if r.get("tokens_per_s")]
    seconds = sum(r["step_time_s"] for r in rated)
    peaks = [r["peak_gpu_memory_gib"] for r in records if r.get("peak_gpu_memory_gib") is not None]
    per_gpu = [r["peak_gpu_memory_gib_per_gpu"] for r in records if r.get("peak_gpu_memory_gib_per_gpu")]
    return {"median_step_time_s": statistics.median(r["step_time_s"] for r in timed) if timed else None,
            "tokens_per_s": sum(r["tokens_per_s"] * r["step_time_s"] for r in rated) / seconds if seconds else None,
            "peak_gpu_memory_gib": max(peaks) if peaks else None, "timed_steps": len(timed),
            "step_times_s": [round(r["step_time_s"], 4) for r in timed],  # kept: a median hides a slow step
            "peak_gpu_memory_gib_per_gpu": [max(filter(None, column), default=None) for column in zip(*per_gpu)]
            if per_gpu else None}


def run_recipe_side(name: str, bench: Bench, flags: list[str], model: str, data: str, steps: int, warmup: int,
                    work: Path, regime: str, timeout: int, gpus: int = 1, label: str = "recipe") -> dict:
    """The recipe as a user runs it; with gpus > 1 under torchrun (common.launch), as ./run.sh --gpus does."""
    runs = work / "runs"
    before = set((runs / name).glob("*"))
    log = work / "logs" / f"{name}-{regime}-{label}.log"
    launcher = ["-m", "common.launch", "--standalone", "--nproc_per_node", str(gpus)] if gpus > 1 else []
    command = [sys.executable, *launcher, "-m", f"recipes.{name}", "--model-name", model, "--data", data,
               "--max-steps", str(steps), "--output-dir", str(runs), *flags]
    code, wall = run_logged(command, log, timeout)
    created = sorted(set((runs / name).glob("*")) - before)
    if code != 0 or not created or not (created[-1] / "results.md").exists():
        return {"error": failure(log, code), "wall_s": wall, "log": relative(log)}
    folder = created[-1]
    metrics = next(folder.glob(bench.metrics), None)
    if metrics is None:
        return {"error": f"no {bench.metrics} in {relative(folder)}: update the metrics glob of RECIPES['{name}']",
                "wall_s": wall, "log": relative(log)}
    manifest = json.loads((folder / "manifest.json").read_text())
    logged = log.read_text(errors="replace")
    return {**timed_metrics(read_jsonl(metrics), warmup), "wall_s": wall, "log": relative(log),
            "run_folder": relative(folder), "optimizer": manifest.get("optimizer"),
            "batching": batching_logged(logged),
            "manifest": {key: manifest.get(key) for key in ("median_step_time_s", "tokens_per_s",
                                                            "peak_gpu_memory_gib", "token_budget", "batch")}}


def batching_logged(log: str) -> str:
    """How Unsloth batched the recipe's rows, from what it printed: a refused token budget (common/batching.py),
    padding-free, packing, padded (and why); 'not logged' where the recipe turned padding-free off itself
    (gpt2_medium_qlora) or Unsloth said nothing (CPU)."""
    unsplit = re.search(r"UNSLOTH_TOKEN_BUDGET (?:not splitting|ignored):? ?(.*?)\.?$", log, re.MULTILINE)
    if unsplit:  # a step's rows then ran as one pass: more memory than the card's batch
        return f"token budget refused ({unsplit.group(1)})"
    padded = re.search(r"Padded batches \+ per-block compile chosen over padding-free \((.*?)\)\. ", log)
    if padded:
        return f"padded ({padded.group(1)})"
    if re.search(r"Padding-free (auto-)?enabled", log):
        return "padding-free"
    return "packing" if "Packing enabled" in log else "not logged"


# The sides run from the same settings: the plain script, the fast one (Liger kernels, padding-free) and raw Unsloth.
REFERENCE_SCRIPTS = {"plain": "bench.plain_sft", "fast": "bench.fast_hf_sft", "raw": "bench.unsloth_sft"}


def run_reference_side(side: str, name: str, settings: dict, model: str, data: dict, steps: int, warmup: int,
                       work: Path, precision: str, timeout: int) -> dict:
    """The plain script, the fast one or raw Unsloth (`side`: a REFERENCE_SCRIPTS key), both regimes in one process
    (one import); each regime gets a fresh adapter, optimiser and peak reading."""
    out = work / side / name
    shutil.rmtree(out, ignore_errors=True)  # MetricsRecorder appends: an earlier run's steps would join the timings
    log = work / "logs" / f"{name}-{side}.log"
    switch = {True: "--", False: "--no-"}
    command = [sys.executable, "-m", REFERENCE_SCRIPTS[side], "--model-name", model, "--output-dir", str(out),
               "--data", *[entry["plain_file"] for entry in data.values()], "--max-steps", str(steps),
               "--precision", precision, "--target-modules", ",".join(settings["target_modules"]),
               switch[settings["gradient_checkpointing"]] + "gradient-checkpointing",
               switch[settings["load_in_4bit"]] + "load-in-4bit"]
    for key in ("max_seq_length", "per_device_train_batch_size", "gradient_accumulation_steps", "lora_r", "lora_alpha",
                "lora_dropout", "optim", "learning_rate"):
        command += ["--" + key.replace("_", "-"), str(settings[key])]
    code, wall = run_logged(command, log, timeout)
    batching = batching_logged(log.read_text(errors="replace")) if side == "raw" and code == 0 else None
    sides = {}
    for regime, entry in data.items():
        folder = out / Path(entry["plain_file"]).stem
        if code != 0 or not (folder / "result.json").exists():
            sides[regime] = {"error": failure(log, code), "wall_s": wall, "log": relative(log)}
            continue
        result = json.loads((folder / "result.json").read_text())
        sides[regime] = {**timed_metrics(read_jsonl(folder / "metrics.jsonl"), warmup), "wall_s": wall,
                         "log": relative(log), "optimizer": result["optimizer"]}
        if side == "plain":
            sides[regime]["padding_fraction"] = result["padding_fraction"]
        elif side == "fast":
            sides[regime].update({key: result[key] for key in ("liger", "liger_reason", "collator")})
        else:  # Unsloth prints its batching choice
            sides[regime]["batching"] = batching
    return sides


@dataclass
class Prepared:
    """One recipe made ready to measure: its bench row, settings resolved from its Config, model and data files."""
    bench: Bench
    steps: int
    warmup: int
    cfg: object
    flags: list[str]
    settings: dict
    model: str
    data: dict


def prepare(name: str, args, work: Path) -> Prepared:
    from common.config import parse
    from transformers import AutoTokenizer
    from unsloth import get_chat_template
    bench = RECIPES[name]
    steps = args.steps or bench.steps
    module = importlib.import_module(f"recipes.{name}")
    flags = recipe_flags(bench.flags, steps, args.smoke)
    cfg, _ = parse(module.Config, flags)
    settings = recipe_settings(module, cfg, bench)
    warmup = max(args.warmup_steps, getattr(cfg, "timing_warmup_steps", 0))  # gpt2_medium_qlora knows its compile
    model = model_folder(bench.shape, args.smoke, work)
    tokenizer = AutoTokenizer.from_pretrained(model)
    if settings["chat_template"]:
        tokenizer = get_chat_template(tokenizer, chat_template=settings["chat_template"])
    data = write_data(name, bench, module, cfg, tokenizer, args.regimes, steps, work / "data")
    print(f"{name}: " + "; ".join(f"{regime} {d['rows']} rows of {d['tokens_min']}-{d['tokens_max']} tokens (mean "
                                  f"{d['tokens_mean']:.0f})" for regime, d in data.items()), flush=True)
    return Prepared(bench, steps, warmup, cfg, flags, settings, model, data)


def benchmark_recipe(name: str, args, precision: str, peak_flops: float, gpu: str | None, work: Path) -> dict:
    """Both regimes of one recipe, every side; returns {"<name>/<regime>": result}."""
    prepared = prepare(name, args, work)
    bench, steps, warmup, cfg, flags = prepared.bench, prepared.steps, prepared.warmup, prepared.cfg, prepared.flags
    settings, model, data = prepared.settings, prepared.model, prepared.data
    recipe_sides = {}
    for regime in args.regimes:
        recipe_sides[regime] = run_recipe_side(name, bench, flags, model, data[regime]["recipe_file"], steps, warmup,
                                               work, regime, args.side_timeout)
        print(f"{name} {regime} recipe: {side_line(recipe_sides[regime])}", flush=True)
    reference = {side: run_reference_side(side, name, settings, model, data, steps, warmup, work, precision,
                                          args.side_timeout) for side in REFERENCE_SCRIPTS}
    parameters = parameter_count(model)
    results = {}
    for regime in args.regimes:
        for side in REFERENCE_SCRIPTS:
            print(f"{name} {regime} {side}: {side_line(reference[side][regime])}", flush=True)
        results[f"{name}/{regime}"] = {
            "recipe": name, "regime": regime, "shape": bench.shape, "parameters": parameters, "gpu": gpu,
            "peak_flops": peak_flops, "precision": precision, "steps": steps, "warmup_steps": warmup,
            "settings": settings, "data": data[regime], "recipe_side": recipe_sides[regime],
            "plain_side": reference["plain"][regime], "fast_side": reference["fast"][regime],
            "raw_side": reference["raw"][regime], "smoke": args.smoke,
            "measured_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return results


def variant_key(gpus: int, budget: str) -> str:
    return f"gpus={gpus},token_budget={budget}"


def measure_variants(name: str, args, gpu: str | None, work: Path) -> dict:
    """The recipe alone, run several ways on the same rows: on each GPU count of --gpus (the card's effective batch
    kept, as ./run.sh --gpus does) and at each --token-budgets setting on one GPU. Returns {"<name>/<regime>": result}
    for results.json's "variants"; the Scaling and Token budget tables are read from it."""
    prepared = prepare(name, args, work)
    has_budget = hasattr(prepared.cfg, "token_budget")  # tinyllama_sentiment and gpt2 have no token budget
    wanted = {(1, budget) for budget in (args.token_budgets if has_budget else [])}
    wanted |= {(gpus, "auto" if has_budget else "default") for gpus in args.gpus}
    results = {}
    for regime in args.regimes:
        sides = {}
        for gpus, budget in sorted(wanted):
            flags = recipe_flags({**prepared.bench.flags, **({"token_budget": budget} if has_budget else {})},
                                 prepared.steps, args.smoke)
            side = run_recipe_side(name, prepared.bench, flags, prepared.model, prepared.data[regime]["recipe_file"],
                                   prepared.steps, prepared.warmup, work, regime, args.side_timeout, gpus=gpus,
                                   label=f"gpus{gpus}-{budget}")
            sides[variant_key(gpus, budget)] = side
            print(f"{name} {regime} {gpus} GPU(s), token budget {budget}: {side_line(side)}", flush=True)
        results[f"{name}/{regime}"] = {
            "recipe": name, "regime": regime, "shape": prepared.bench.shape, "gpu": gpu, "steps": prepared.steps,
            "warmup_steps": prepared.warmup, "data": prepared.data[regime], "sides": sides,
            "effective_batch": prepared.settings["per_device_train_batch_size"]
            * prepared.settings["gradient_accumulation_steps"],
            "measured_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return results


def recorded_command(argv: list[str]) -> str:
    """The command line as results.json keeps it: an absolute path in it (--work-dir, --out) relative to the repository
    root, like every other path there."""
    words = []
    for word in argv:
        option, equals, value = word.partition("=")
        if equals and os.path.isabs(value):
            word = f"{option}={relative(value)}"
        elif os.path.isabs(word):
            word = relative(word)
        words.append(word)
    return " ".join(["python -m bench.benchmark", *words])


def nvidia_driver() -> str | None:
    """The NVIDIA driver's version (None without a GPU): torch reports the CUDA runtime it was built with, not this."""
    import torch
    if not torch.cuda.is_available():
        return None
    try:
        queried = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=60).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return queried[0] if queried else None


def installed(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def side_line(side: dict) -> str:
    if "error" in side:
        return f"FAILED {side['error']}"
    return (f"{fmt(side['tokens_per_s'], ',.0f')} tokens/s, median step {fmt(side['median_step_time_s'], '.3f')} s, "
            f"peak {fmt(side['peak_gpu_memory_gib'], '.2f')} GiB ({side['wall_s']:.0f} s wall)")


# ---- the table ----------------------------------------------------------------------------------------------------

def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def mfu(parameters: int, tokens_per_s: float | None, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: 6 N FLOP a trained token (forward 2N, backward 4N) over the measured peak."""
    return 6 * parameters * tokens_per_s / peak_flops if tokens_per_s and peak_flops else None


def verdict(regime: str, shape: str, speed: float | None, memory: float | None) -> str:
    """pass / FAIL against TARGETS and CHAT_SPEEDUP; n/a when a number is missing (a failed side, no memory on CPU)."""
    if regime == "chat":
        return "n/a" if speed is None else "pass" if speed >= CHAT_SPEEDUP else "FAIL"
    if speed is None or memory is None:
        return "n/a"
    target_speed, target_memory = TARGETS[shape]
    return "pass" if speed >= target_speed and memory <= target_memory else "FAIL"


def target_text(regime: str, shape: str) -> tuple[str, str]:
    if regime == "chat":
        return f">= {CHAT_SPEEDUP:.2f}x", "-"
    return f">= {TARGETS[shape][0]:.2f}x", f"<= {TARGETS[shape][1]:.2f}x"


def fmt(value, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def ordered(runs: dict) -> list[dict]:
    order = {(name, regime): i for i, (name, regime) in
             enumerate((name, regime) for name in RECIPES for regime in REGIMES)}
    return sorted(runs.values(), key=lambda r: order.get((r["recipe"], r["regime"]), len(order)))


def failure_row(run: dict, sides: dict, columns: int) -> str | None:
    """A table row naming the first side that failed and why, its other cells empty; None when every side ran."""
    side, error = next(((side, values["error"]) for side, values in sides.items() if "error" in values), (None, None))
    if side is None:
        return None
    return (f"| {run['recipe']} | {run['regime']} | {side} side failed: {error.replace('|', '/')} |"
            + " |" * (columns - 4) + " error |")


def table(runs: dict) -> list[str]:
    lines = ["| recipe | data | tokens/s recipe / plain | x tokens/s | target | median step s recipe / plain "
             "| peak GiB recipe / plain | x memory | target | MFU recipe / plain | plain padding | result |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for run in ordered(runs):
        ours, plain = run["recipe_side"], run["plain_side"]
        failed = failure_row(run, {"recipe": ours, "plain": plain}, columns=12)
        if failed:
            lines.append(failed)
            continue
        speed = ratio(ours["tokens_per_s"], plain["tokens_per_s"])
        memory = ratio(ours["peak_gpu_memory_gib"], plain["peak_gpu_memory_gib"])
        speed_target, memory_target = target_text(run["regime"], run["shape"])
        utilisation = [mfu(run["parameters"], side["tokens_per_s"], run["peak_flops"]) for side in (ours, plain)]
        lines.append(
            f"| {run['recipe']} | {run['regime']} | {fmt(ours['tokens_per_s'], ',.0f')} / "
            f"{fmt(plain['tokens_per_s'], ',.0f')} | {fmt(speed, '.2f', 'x')} | {speed_target} | "
            f"{fmt(ours['median_step_time_s'], '.3f')} / {fmt(plain['median_step_time_s'], '.3f')} | "
            f"{fmt(ours['peak_gpu_memory_gib'], '.2f')} / {fmt(plain['peak_gpu_memory_gib'], '.2f')} | "
            f"{fmt(memory, '.2f', 'x')} | {memory_target} | {fmt(utilisation[0], '.1%')} / "
            f"{fmt(utilisation[1], '.1%')} | {fmt(plain.get('padding_fraction'), '.0%')} | "
            f"{verdict(run['regime'], run['shape'], speed, memory)} |")
    return lines


def raw_table(runs: dict) -> list[str]:
    """Each recipe against raw Unsloth (bench/unsloth_sft.py) on the same rows and settings: what the repository adds
    or costs over Unsloth, and raw Unsloth's own ratio to the plain script on this machine next to the target."""
    lines = ["| recipe | data | tokens/s recipe / raw Unsloth / plain | recipe / raw | raw / plain | target "
             "| median step s recipe / raw | peak GiB recipe / raw | raw batches | no overhead |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|:---:|"]
    for run in ordered(runs):
        ours, raw, plain = run["recipe_side"], run.get("raw_side"), run["plain_side"]
        if raw is None:
            continue  # measured before raw Unsloth was a side
        failed = failure_row(run, {"recipe": ours, "raw": raw, "plain": plain}, columns=10)
        if failed:
            lines.append(failed)
            continue
        over_raw = ratio(ours["tokens_per_s"], raw["tokens_per_s"])
        verdict_text = "n/a" if over_raw is None else "pass" if over_raw >= NO_OVERHEAD else "FAIL"
        lines.append(
            f"| {run['recipe']} | {run['regime']} | {fmt(ours['tokens_per_s'], ',.0f')} / "
            f"{fmt(raw['tokens_per_s'], ',.0f')} / {fmt(plain['tokens_per_s'], ',.0f')} | "
            f"{fmt(over_raw, '.2f', 'x')} | {fmt(ratio(raw['tokens_per_s'], plain['tokens_per_s']), '.2f', 'x')} | "
            f"{target_text(run['regime'], run['shape'])[0]} | "
            f"{fmt(ours['median_step_time_s'], '.3f')} / {fmt(raw['median_step_time_s'], '.3f')} | "
            f"{fmt(ours['peak_gpu_memory_gib'], '.2f')} / {fmt(raw['peak_gpu_memory_gib'], '.2f')} | "
            f"{raw.get('batching', '-')} | {verdict_text} |")
    return lines


def recorded_budget(side: dict) -> dict:
    """The --token-budget a recipe run recorded in its manifest; empty for recipes without one, and for failed runs."""
    return (side.get("manifest") or {}).get("token_budget") or {}


def variant_sides(run: dict, first: str, second: str) -> tuple[dict, dict] | None:
    """The two runs a table compares; where every run of the recipe failed (before any could start, say), the error
    stands in for both so the row says why."""
    sides = run["sides"]
    if first in sides and second in sides:
        return sides[first], sides[second]
    if sides and all("error" in side for side in sides.values()):
        failed = next(iter(sides.values()))
        return failed, failed
    return None


def scaling_table(variants: dict) -> list[str]:
    """1 GPU against 2 at the card's effective batch (accumulation halved on each of 2): tokens/s of all GPUs
    together, and the highest per-GPU peak."""
    lines = ["| recipe | data | effective batch | tokens/s 1 GPU / 2 GPUs | speed-up | target | median step s 1 / 2 "
             "| peak GiB a GPU 1 / 2 | result |", "|---|---|---:|---:|---:|---:|---:|---:|:---:|"]
    for run in ordered(variants):
        budget = "auto" if variant_key(1, "auto") in run["sides"] else "default"
        pair = variant_sides(run, variant_key(1, budget), variant_key(2, budget))
        if pair is None:
            continue
        one, two = pair
        failed = failure_row(run, {"1 GPU": one, "2 GPUs": two}, columns=9)
        if failed:
            lines.append(failed)
            continue
        speed_up = ratio(two["tokens_per_s"], one["tokens_per_s"])
        peak_two = max(filter(None, two.get("peak_gpu_memory_gib_per_gpu") or [two["peak_gpu_memory_gib"]]),
                       default=None)
        result = ("n/a" if speed_up is None or peak_two is None or one["peak_gpu_memory_gib"] is None else
                  "pass" if speed_up >= SCALING_TARGET and peak_two <= one["peak_gpu_memory_gib"] else "FAIL")
        lines.append(
            f"| {run['recipe']} | {run['regime']} | {run['effective_batch']} | {fmt(one['tokens_per_s'], ',.0f')} / "
            f"{fmt(two['tokens_per_s'], ',.0f')} | {fmt(speed_up, '.2f', 'x')} | >= {SCALING_TARGET:.2f}x | "
            f"{fmt(one['median_step_time_s'], '.3f')} / {fmt(two['median_step_time_s'], '.3f')} | "
            f"{fmt(one['peak_gpu_memory_gib'], '.2f')} / {fmt(peak_two, '.2f')} | {result} |")
    return lines


def budget_table(variants: dict) -> list[str]:
    """--token-budget card against auto on one GPU, the same rows: what sizing passes to the GPU's memory gains."""
    lines = ["| recipe | data | tokens/s card / auto | auto / card | target | median step s card / auto "
             "| peak GiB card / auto | tokens a pass card / auto | result |",
             "|---|---|---:|---:|---:|---:|---:|---:|:---:|"]
    for run in ordered(variants):
        pair = variant_sides(run, variant_key(1, "card"), variant_key(1, "auto"))
        if pair is None:
            continue
        card, auto = pair
        failed = failure_row(run, {"card": card, "auto": auto}, columns=9)
        if failed:
            lines.append(failed)
            continue
        gain = ratio(auto["tokens_per_s"], card["tokens_per_s"])
        target = AUTO_BUDGET_CHAT_TARGET if run["regime"] == "chat" else NO_OVERHEAD
        passes = [recorded_budget(side).get("tokens_a_pass") for side in pair]
        lines.append(
            f"| {run['recipe']} | {run['regime']} | {fmt(card['tokens_per_s'], ',.0f')} / "
            f"{fmt(auto['tokens_per_s'], ',.0f')} | {fmt(gain, '.2f', 'x')} | >= {target:.2f}x | "
            f"{fmt(card['median_step_time_s'], '.3f')} / {fmt(auto['median_step_time_s'], '.3f')} | "
            f"{fmt(card['peak_gpu_memory_gib'], '.2f')} / {fmt(auto['peak_gpu_memory_gib'], '.2f')} | "
            f"{fmt(passes[0], ',')} / {fmt(passes[1], ',')} | "
            f"{'n/a' if gain is None else 'pass' if gain >= target else 'FAIL'} |")
    return lines


def fast_verdict(speed: float | None, memory: float | None) -> str:
    """pass: at least the fast script's tokens/s at no more than its peak memory; n/a when a number is missing (a failed
    side, no memory on CPU)."""
    if speed is None or memory is None:
        return "n/a"
    return "pass" if speed >= 1 and memory <= 1 else "FAIL"


def fast_table(runs: dict) -> list[str]:
    """Each recipe against the fast transformers script (bench/fast_hf_sft.py: Liger kernels, padding-free batches) on
    the same rows and settings: the strongest plain peer."""
    lines = ["| recipe | data | tokens/s recipe / fast | recipe / fast | peak GiB recipe / fast | recipe / fast memory "
             "| median step s recipe / fast | fast side's Liger kernels | result |",
             "|---|---|---:|---:|---:|---:|---:|---|:---:|"]
    for run in ordered(runs):
        ours, fast = run["recipe_side"], run.get("fast_side")
        if fast is None:
            continue  # measured before the fast script was a side
        failed = failure_row(run, {"recipe": ours, "fast": fast}, columns=9)
        if failed:
            lines.append(failed)
            continue
        speed = ratio(ours["tokens_per_s"], fast["tokens_per_s"])
        memory = ratio(ours["peak_gpu_memory_gib"], fast["peak_gpu_memory_gib"])
        kernels = ", ".join(fast["liger"]) or f"none ({fast['liger_reason']})"
        lines.append(
            f"| {run['recipe']} | {run['regime']} | {fmt(ours['tokens_per_s'], ',.0f')} / "
            f"{fmt(fast['tokens_per_s'], ',.0f')} | {fmt(speed, '.2f', 'x')} | "
            f"{fmt(ours['peak_gpu_memory_gib'], '.2f')} / {fmt(fast['peak_gpu_memory_gib'], '.2f')} | "
            f"{fmt(memory, '.2f', 'x')} | {fmt(ours['median_step_time_s'], '.3f')} / "
            f"{fmt(fast['median_step_time_s'], '.3f')} | {kernels.replace('|', '/')} | {fast_verdict(speed, memory)} |")
    return lines


def billions(parameters: int) -> str:
    return f"{parameters / 1e9:.2f} B" if parameters >= 1e8 else f"{parameters:,}"


def settings_table(runs: dict) -> list[str]:
    lines = ["| recipe | data | model shape (N parameters) | seq | batch x accum | LoRA | optimiser | grad. ckpt | "
             "rows: tokens min / mean / max | steps (timed) | recipe batches | measured on |",
             "|---|---|---|---:|---:|---|---|:---:|---:|---:|---|---|"]
    for run in (run for run in ordered(runs) if "settings" in run):
        s, d, ours = run["settings"], run["data"], run["recipe_side"]
        budget = recorded_budget(ours)
        batches = ours.get("batching", "-") + (f", passes of at most {budget['tokens_a_pass']:,} tokens "
                                                f"({budget['setting']})" if budget else "")
        lines.append(
            f"| {run['recipe']} | {run['regime']} | {run['shape']} ({billions(run['parameters'])}) | "
            f"{s['max_seq_length']} | {s['per_device_train_batch_size']} x {s['gradient_accumulation_steps']} | "
            f"r{s['lora_r']}/a{s['lora_alpha']} on {','.join(s['target_modules'])} | {s['optim']} | "
            f"{'yes' if s['gradient_checkpointing'] else 'no'} | {d['tokens_min']} / {d['tokens_mean']:.0f} / "
            f"{d['tokens_max']} ({d['rows']} rows) | {run['steps']} ({ours.get('timed_steps', '-')} after "
            f"{run['warmup_steps']}) | {batches} | {(run['gpu'] or 'CPU').removeprefix('NVIDIA ')}, "
            f"{run['measured_utc'][:10]} |")
    return lines


def software(session: dict) -> str:
    """The session's packages, torch with its CUDA; one recorded as missing reads "no <name>", so a run without
    xformers or flash_attn says so (older sessions did not record them)."""
    cuda = session.get("torch_cuda")
    return ", ".join(f"no {name}" if not version else
                     f"{name} {version}" + (f" (CUDA {cuda})" if name == "torch" and cuda else "")
                     for name, version in session["packages"].items())


def report(results: dict) -> str:
    runs, sessions = results["runs"], results["sessions"]
    smoke = any(run.get("smoke") for run in runs.values())
    peaks = {}  # one GPU model, one line: its measured peak varies a few percent from machine to machine
    for run in runs.values():
        if "peak_flops" in run:
            peaks.setdefault((run["gpu"] or "CPU", run["precision"]), []).append(run["peak_flops"] / 1e12)
    gpus = []
    for (gpu, precision), measured in sorted(peaks.items()):
        low, high = f"{min(measured):,.4g}", f"{max(measured):,.4g}"
        gpus.append(f"{gpu} (measured peak {low if low == high else f'{low} to {high}'} TFLOP/s in {precision})")
    lines = ["# Benchmarks: recipes vs the plain transformers + PEFT + bitsandbytes script", "",
             "Generated by `bench/benchmark.py`; do not edit by hand (analysis goes in `bench/notes.md`, copied "
             "below).",
             ""]
    if smoke:
        lines += ["**Smoke run on CPU with tiny models: these numbers only show the harness works.**", ""]
    lines += [f"- GPU: {'; '.join(gpus)}",
              "- each recipe ran through its own code path (`python -m recipes.<name>`; those with a token budget at "
              "`--token-budget card`: passes of at most the card's rows, as the other sides run), "
              "`bench/plain_sft.py` (transformers Trainer + PEFT LoRA + bitsandbytes NF4 with double quantization, "
              "the recipe's optimiser, batches padded to their longest row), `bench/unsloth_sft.py` (raw Unsloth) and "
              "`bench/fast_hf_sft.py` (the plain script with Liger kernels and padding-free batches) as separate "
              "processes on the same GPU, on a random-init model of the card's shape with the recipe's sequence "
              "length, batch, accumulation, LoRA, precision and optimiser",
              "- tokens/s counts non-padding tokens as the collator builds each batch "
              "(common.callbacks.MetricsRecorder on every side), over the steps after warm-up; median step time over "
              "the same steps; peak GPU memory is torch.cuda.max_memory_allocated during training; "
              "MFU = 6 N tokens/s / measured peak, N the base model's parameters",
              "- data: fixed = every row just under the recipe's max_seq_length; chat = "
              "`bench/data/chat_lengths.jsonl` (log-normal lengths, long tail), rows longer than max_seq_length "
              "left out on both sides",
              f"- targets, the repository's own goals, taken from a measurement of raw Unsloth against a plain "
              f"transformers + PEFT + bitsandbytes script on an H100: on fixed rows, at least the tokens/s ratio and "
              f"at most the memory ratio raw Unsloth reached there, Llama-3-8B {TARGETS['llama-3-8b'][0]}x / "
              f"{TARGETS['llama-3-8b'][1]}x (also for Llama-3.1-8B, same shape), "
              f"TinyLlama {TARGETS['tinyllama-1.1b'][0]}x / "
              f"{TARGETS['tinyllama-1.1b'][1]}x, Llama-3.2-1B {TARGETS['llama-3.2-1b'][0]}x / "
              f"{TARGETS['llama-3.2-1b'][1]}x, GPT-2 M {TARGETS['gpt2-medium'][0]}x / {TARGETS['gpt2-medium'][1]}x; "
              f"on chat rows, at least {CHAT_SPEEDUP:.0f}x the padded plain script's tokens/s", "",
              "## Results", "", *table(runs), "",
              "## Recipes against raw Unsloth", "",
              "The same rows and settings through `bench/unsloth_sft.py`, the script of Unsloth's notebooks "
              "(FastLanguageModel, get_peft_model, TRL's SFTTrainer with Unsloth's defaults) with none of this "
              "repository's code in its training path, run in the same session. `no overhead` passes at "
              f"{NO_OVERHEAD:.2f}x raw Unsloth's tokens/s or more; `raw / plain` is raw Unsloth's ratio to the plain "
              "script on this machine, the same measurement the fixed-row targets come from, shown next to them.",
              "", *raw_table(runs), "",
              "## Recipes against the fast HF script", "",
              "The same rows and settings through `bench/fast_hf_sft.py`, the strongest plain peer: the plain script "
              "with Liger's Triton kernels (RoPE, RMSNorm, SwiGLU and the fused linear cross-entropy, on Llama shapes "
              "and a GPU; liger-kernel has no GPT-2 patch) and padding-free batches (transformers' "
              "DataCollatorWithFlattening: a batch's rows as one row, SDPA masking each row from the others), run in "
              "the same session. The target: every recipe at least the fast script's tokens/s at no more than its "
              "peak memory. Rows measured before the fast script was a side are left out.",
              "", *fast_table(runs), "",
              "## Settings", "", *settings_table(runs), ""]
    variants = results.get("variants", {})
    if variants:
        scaling = scaling_table(variants)
        lines += ["## Scaling: 1 GPU against 2", "",
                  "The recipe alone (`python -m bench.benchmark --gpus 1,2`), on one GPU and on two under torchrun "
                  "(`./run.sh <recipe> --gpus 2`), the same rows and the card's effective batch (each GPU accumulates "
                  "half the steps). tokens/s counts both GPUs' tokens; the peak is the higher GPU's. Target: at least "
                  f"{SCALING_TARGET:.2f}x the tokens/s of one GPU, with no GPU above one GPU's peak.", "",
                  *(scaling if len(scaling) > 2 else  # a header and nothing under it
                    ["Not measured yet: no run on a machine with 2 GPUs is in bench/results.json."]), "",
                  "## Token budget: card against auto on one GPU", "",
                  "The recipe alone (`python -m bench.benchmark --token-budgets card,auto`) on the same rows: `card` "
                  "runs a step's rows in passes of at most the card's rows a pass x max_seq_length tokens; `auto` "
                  "sizes passes to the GPU's free memory, measured before training. Target: at least "
                  f"{AUTO_BUDGET_CHAT_TARGET:.2f}x card's tokens/s on chat rows, no slower on fixed rows (at least "
                  f"{NO_OVERHEAD:.2f}x, run-to-run noise).", "", *budget_table(variants), ""]
    lines += ["## Runs", ""]
    if any((session["git_commit"] or "").endswith("-dirty") for session in sessions):
        lines += ["A commit ending in `-dirty`: tracked files in the working tree differed from that commit when the "
                  "benchmark ran.", ""]
    for session in sessions:
        done, driver = session.get("recipes_done"), session.get("nvidia_driver")
        lines.append(f"- {session['finished_utc']}: `{session['command']}` ({session['wall_s']:.0f} s; "
                     f"{session['gpu'] or 'CPU'}{', driver ' + driver if driver else ''}; commit "
                     f"{session['git_commit']}{'; finished ' + ', '.join(done) if done is not None else ''}); "
                     f"{software(session)}")
    if NOTES.exists() and not smoke:
        lines += ["", "## Notes", "", NOTES.read_text().strip()]
    return "\n".join(lines) + "\n"


# ---- main ---------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__[__doc__.index("  python -m bench.benchmark"):])
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated, from: " + ", ".join(RECIPES))
    parser.add_argument("--regimes", default=",".join(REGIMES), help="comma-separated: fixed, chat")
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps a side (default: each recipe's row)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the timings")
    parser.add_argument("--work-dir", default="", help="models, data, run folders and logs (bench/out)")
    parser.add_argument("--results", default="", help="the results file to merge into (bench/results.json; "
                                                      "with --smoke or --work-dir, results.json there)")
    parser.add_argument("--out", default="", help="the markdown report (BENCHMARKS.md in the repository root)")
    parser.add_argument("--side-timeout", type=int, default=300, help="seconds one side may run before it is stopped")
    parser.add_argument("--gpus", default="", help="e.g. 1,2: the recipe alone on each number of GPUs (the Scaling "
                                                   "table); the reference sides are not run")
    parser.add_argument("--token-budgets", default="", help="e.g. card,auto: the recipe alone at each --token-budget "
                                                            "on one GPU (the Token budget table)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models, 3 steps, a temp work dir")
    parser.add_argument("--report-only", action="store_true", help="regenerate the report from results.json")
    parser.add_argument("--rebuild-chat-sample", action="store_true", help=f"rewrite {CHAT_SAMPLE.relative_to(REPO)}")
    args = parser.parse_args(argv)
    try:
        args.gpus = sorted({int(n) for n in args.gpus.split(",") if n})
    except ValueError:
        parser.error(f"--gpus expects numbers of GPUs, e.g. 1,2; got {args.gpus!r}")
    args.token_budgets = [b for b in args.token_budgets.split(",") if b]
    args.recipes = [r for r in args.recipes.split(",") if r]
    args.regimes = [r for r in args.regimes.split(",") if r]
    unknown = [r for r in args.recipes if r not in RECIPES] + [r for r in args.regimes if r not in REGIMES]
    if unknown:
        parser.error(f"unknown recipe or regime: {', '.join(unknown)}")
    if not args.recipes or not args.regimes:
        parser.error("--recipes and --regimes each need at least one name")
    if args.smoke:
        args.steps, args.warmup_steps = args.steps or 3, min(args.warmup_steps, 1)
    work = Path(args.work_dir or (tempfile.mkdtemp(prefix="bench-smoke-") if args.smoke else REPO / "bench" / "out"))
    args.results = Path(args.results or (work / "results.json" if args.smoke or args.work_dir else RESULTS))
    args.work_dir, args.out = work, Path(args.out or (work / "BENCHMARKS.md" if args.smoke else REPO / "BENCHMARKS.md"))
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.rebuild_chat_sample:
        write_jsonl(CHAT_SAMPLE, chat_sample())
        print(f"wrote {CHAT_SAMPLE} ({CHAT_SAMPLE.stat().st_size / 1e6:.2f} MB)")
        return
    results_file = args.results
    results = json.loads(results_file.read_text()) if results_file.exists() else {"runs": {}, "sessions": []}
    if not args.report_only:
        import torch
        from common.hardware import detect
        from common.outputs import git_commit, package_versions
        started, started_utc = time.perf_counter(), datetime.now(timezone.utc)
        gpu_conftest()  # Unsloth first (tests/gpu/conftest.py imports it), before transformers is imported here
        hardware = detect()
        peak_flops = measured_peak_flops(hardware.precision)
        print(f"{hardware.gpu_name or 'CPU'}: measured peak {peak_flops / 1e12:,.4g} TFLOP/s ({hardware.precision}); "
              f"work dir {args.work_dir}", flush=True)
        # flash_attn next to xformers: either gives Unsloth's padding-free batches one attention call a layer
        session = {"command": recorded_command(sys.argv[1:] if argv is None else argv),
                   "started_utc": started_utc.isoformat(timespec="seconds"), "recipes_done": [],
                   "gpu": hardware.gpu_name, "nvidia_driver": nvidia_driver(), "git_commit": git_commit(),
                   "packages": {**package_versions(), "flash_attn": installed("flash-attn")},
                   "torch_cuda": torch.version.cuda}
        results["sessions"].append(session)  # updated after each recipe: a run cut short still names itself
        variants_only = bool(args.gpus or args.token_budgets)  # the Scaling / Token budget tables: no reference sides
        for name in args.recipes:
            try:
                if variants_only:
                    results.setdefault("variants", {}).update(measure_variants(name, args, hardware.gpu_name,
                                                                               args.work_dir))
                else:
                    results["runs"].update(benchmark_recipe(name, args, hardware.precision, peak_flops,
                                                            hardware.gpu_name, args.work_dir))
            except Exception as error:  # a recipe changed under the table (a renamed field): report it, go on
                reason = {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
                print(f"{name}: FAILED {reason['error']}", flush=True)
                failed = {"recipe": name, "shape": RECIPES[name].shape}
                if variants_only:
                    results.setdefault("variants", {}).update({f"{name}/{regime}": {
                        **failed, "regime": regime, "effective_batch": None,
                        "sides": {variant_key(gpus, "failed"): reason for gpus in args.gpus or [1]}}
                        for regime in args.regimes})
                else:
                    results["runs"].update({f"{name}/{regime}": {**failed, "regime": regime, "recipe_side": reason,
                                                                 "plain_side": reason, "fast_side": reason,
                                                                 "raw_side": reason}
                                            for regime in args.regimes})
            print(f"{time.perf_counter() - started:.0f} s since the start", flush=True)
            session.update(recipes_done=session["recipes_done"] + [name], wall_s=time.perf_counter() - started,
                           finished_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"))
            results_file.parent.mkdir(parents=True, exist_ok=True)
            results_file.write_text(json.dumps(results, indent=2) + "\n")  # after each recipe: a cut run keeps them
            args.out.write_text(report(results))
    report_text = report(results)
    args.out.write_text(report_text)
    print("\n".join(table(results["runs"]) + [""] + raw_table(results["runs"]) + [""] + fast_table(results["runs"])))
    print(f"\nwrote {args.out}" + ("" if args.report_only else f" and {results_file}"))


if __name__ == "__main__":
    main()
