"""Each recipe against raw Unsloth, a plain transformers + PEFT + bitsandbytes script and a fast one, on one GPU.

Tokens/s, step time, memory and MFU. For each recipe in bench/plan.py and each data regime (fixed: every row just
under max_seq_length tokens; chat: the bundled bench/data/chat_lengths.jsonl, a realistic spread of lengths), separate
processes train on the same GPU one after the other: the recipe itself (`python -m recipes.<name>` on a random-init
model of its card's shape, built by bench/shapes.py), bench/plain_sft.py (padded batches), bench/fast_hf_sft.py
(the same with Liger kernels and padding-free batches: the strongest plain peer) and bench/unsloth_sft.py (raw
Unsloth) with the same shape, LoRA, batch, accumulation, sequence length, precision and optimiser, read from the
recipe's own Config. Every side is timed by common.callbacks.MetricsRecorder and summarised by the same arithmetic,
warm-up steps left out. Results merge into bench/results.json (kept in git, so a run of some recipes keeps the others'
rows; its paths are relative to the repository root); bench/report.py regenerates BENCHMARKS.md from every result
there. Models, data, run folders and logs: bench/out. The fast side needs liger-kernel on the GPU machine: after
requirements.txt, `pip install -r bench/requirements.txt`.

  python -m bench.benchmark                                        # every recipe, both regimes
  python -m bench.benchmark --recipes llama3_8b,llama31_8b_qlora   # a subset; merges with the results already there
  python -m bench.benchmark --report-only                          # regenerate BENCHMARKS.md from results.json
  python -m bench.benchmark --smoke                                # the whole harness on CPU, tiny models, temp dir
  python -m bench.benchmark --rebuild-chat-sample                  # rewrite bench/data/chat_lengths.jsonl
"""
import argparse
import importlib
import importlib.metadata
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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from bench import shapes
from bench.plan import AT_LAST_STEP, RECIPES, REGIMES, Bench
from bench.report import fast_table, fmt, markdown, raw_table, table, variant_key

REPO = Path(__file__).resolve().parent.parent
CHAT_SAMPLE = REPO / "bench" / "data" / "chat_lengths.jsonl"
RESULTS = REPO / "bench" / "results.json"  # every measured row; BENCHMARKS.md is generated from it
MARGIN = 8  # a row stays this many tokens under max_seq_length: no recipe drops or truncates it

# CPU-sized; accumulation 2 divides over the 2 processes of a --gpus 1,2 smoke run
SMOKE_FLAGS = dict(max_seq_length=256, per_device_train_batch_size=2, gradient_accumulation_steps=2)

# The chat sample: log-normal lengths around a few hundred tokens with a long tail, as in real chat exports.
CHAT_ROWS, CHAT_MEDIAN_WORDS, CHAT_SIGMA, CHAT_MIN_WORDS, CHAT_MAX_WORDS = 400, 220, 0.85, 16, 1900
EXCHANGES = (1, 1, 1, 2, 2, 3)  # most conversations are one question and answer; some run on


# ---- data ---------------------------------------------------------------------------------------------------------

def conversation(rng: random.Random, words: int, exchanges: int = 1) -> list[dict]:
    """`exchanges` question/answer pairs of `words` words in all, a fifth of each pair asking. The words are those the
    tokenizers of bench/shapes.py are trained on, about one token each."""
    vocabulary = shapes.WORDS
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
    run of that shape, as the GPU tests prepare it (pre-quantized for the Llama cards)."""
    def tiny(shape: str, folder: Path):
        from common.smoke import tiny_model
        shutil.copytree(tiny_model(shapes.FAMILY[shape], [{"text": " ".join(shapes.WORDS)}]), folder,
                        dirs_exist_ok=True)
    return shapes.prepared_model(shape, work / "models", build=tiny if smoke else shapes.build_model)


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


def recipe_lora_settings(cfg) -> tuple:
    """(LoRA rank, alpha, target modules, chat template, whether it has --token-budget), read from the recipe's
    Config fields; gpt2_medium_qlora's study names its ranks as a list (the harness runs one)."""
    rank = cfg.ranks[0] if hasattr(cfg, "ranks") else cfg.lora_r
    has_budget = hasattr(cfg, "token_budget")  # tinyllama_sentiment and gpt2 have no token budget
    return rank, cfg.lora_alpha, cfg.target_modules, getattr(cfg, "chat_template", None), has_budget


def recipe_settings(cfg, bench: Bench, rank: int, alpha: int, targets, template: str | None) -> dict:
    """What the plain side must match: the recipe's Config and its resolved LoRA and template."""
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
    has_budget: bool  # the recipe has --token-budget, which its variants set
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
    rank, alpha, targets, template, has_budget = recipe_lora_settings(cfg)
    settings = recipe_settings(cfg, bench, rank, alpha, targets, template)
    warmup = max(args.warmup_steps, getattr(cfg, "timing_warmup_steps", 0))  # gpt2_medium_qlora knows its compile
    model = model_folder(bench.shape, args.smoke, work)
    tokenizer = AutoTokenizer.from_pretrained(model)
    if settings["chat_template"]:
        tokenizer = get_chat_template(tokenizer, chat_template=settings["chat_template"])
    data = write_data(name, bench, module, cfg, tokenizer, args.regimes, steps, work / "data")
    print(f"{name}: " + "; ".join(f"{regime} {d['rows']} rows of {d['tokens_min']}-{d['tokens_max']} tokens (mean "
                                  f"{d['tokens_mean']:.0f})" for regime, d in data.items()), flush=True)
    return Prepared(bench, steps, warmup, has_budget, flags, settings, model, data)


def benchmark_recipe(name: str, args, precision: str, peak_flops: float, gpu: str | None, work: Path) -> dict:
    """Both regimes of one recipe, every side; returns {"<name>/<regime>": result}."""
    prepared = prepare(name, args, work)
    bench, steps, warmup, flags = prepared.bench, prepared.steps, prepared.warmup, prepared.flags
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


def measure_variants(name: str, args, gpu: str | None, work: Path) -> dict:
    """The recipe alone, run several ways on the same rows: on each GPU count of --gpus (the card's effective batch
    kept, as ./run.sh --gpus does) and at each --token-budgets setting on one GPU. Returns {"<name>/<regime>": result}
    for results.json's "variants"; the Scaling and Token budget tables are read from it."""
    prepared = prepare(name, args, work)
    wanted = {(1, budget) for budget in (args.token_budgets if prepared.has_budget else [])}
    wanted |= {(gpus, "auto" if prepared.has_budget else "default") for gpus in args.gpus}
    results = {}
    for regime in args.regimes:
        sides = {}
        for gpus, budget in sorted(wanted):
            flags = recipe_flags({**prepared.bench.flags, **({"token_budget": budget} if prepared.has_budget else {})},
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
        import unsloth  # noqa: F401  (before transformers is imported here, as in the recipes)
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
            args.out.write_text(markdown(results))
    args.out.write_text(markdown(results))
    print("\n".join(table(results["runs"]) + [""] + raw_table(results["runs"]) + [""] + fast_table(results["runs"])))
    print(f"\nwrote {args.out}" + ("" if args.report_only else f" and {results_file}"))


if __name__ == "__main__":
    main()
