"""GPT-2 Medium, QLoRA vs 16-bit LoRA at ranks 2-16 on Alpaca: when does 4-bit quantization preserve quality?

Card: GPT-2 Medium (355M), LoRA on c_attn (alpha 16, dropout 0.05) at ranks 2, 4, 8, 16, each trained twice from one
seed: on an NF4 base (QLoRA) and on a 16-bit base; 1,000 Stanford Alpaca rows, ### Instruction / Input / Response.
Beyond the card: QLoRA at the largest rank once more from another seed, the yardstick for the cosines.
Launch: ./run.sh gpt2_medium_qlora          offline check on CPU: ./run.sh gpt2_medium_qlora --smoke
One GPU only (no --gpus): the study trains its runs one after another in one process and compares their weights, and
GPT-2 Medium's 200-step runs take minutes on any GPU; more GPUs would only add start-up and synchronisation.
"""
import unsloth  # noqa: F401  (first: Unsloth patches transformers, TRL and PEFT on import)

import gc
import random
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import set_seed
from trl import SFTConfig, SFTTrainer
from unsloth import FastLanguageModel

from common import record
from common.callbacks import MetricsRecorder, readable_progress
from common.data import read_rows
from common.errors import UserError, run_main
from common.hardware import precision_of, peak_memory_gib, reset_peak_memory
from common.model import load_model, quantization_in_use
from common.outputs import optimizer_that_ran
from common.report import number
from common.session import base_model, start, trained_model, trainer_arguments

matplotlib.use("Agg")  # PNGs only: no display on a training box
import matplotlib.pyplot as plt  # noqa: E402

RECIPE = Path(__file__).stem  # the file's name: a copied recipe is its own recipe, with its own run folders
SAMPLE_DATA = Path(__file__).parent / "data" / "alpaca_sample.jsonl"
# The card's prompt format as a chat template, saved with each adapter: ./run.sh chat and the GGUF's Modelfile render a
# conversation as the model was trained (one instruction, its response, end of text).
ALPACA_CHAT_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}"
                        "{{ '### Instruction:\\n' + message['content'] + '\\n\\n### Response:\\n' }}"
                        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}"
                        "{% endfor %}")
SIDES = {"qlora": "4-bit base, LoRA via Unsloth's get_peft_model", "lora": "16-bit base, LoRA via PEFT's get_peft_model"}


@dataclass
class Config:
    """GPT-2 Medium: QLoRA vs 16-bit LoRA at ranks 2, 4, 8, 16 on Alpaca.

    One GPU only (no --gpus): the study trains its runs one after another in one process and compares their weights."""
    model_name: str = "gpt2-medium"  # card: 355M parameters, 24 layers, hidden 1024, 16 heads, context 1024
    max_seq_length: int = 512  # Alpaca rows are short: half the card's 1024 context truncates almost none
    ranks: tuple[int, ...] = (2, 4, 8, 16)  # card: the ranks compared; --ranks 2,4 runs a subset
    only: str = ""  # qlora|lora runs one side of each comparison; empty runs both
    lora_alpha: int = 16  # card: fixed, so the update's scale alpha/r shrinks as the rank grows
    lora_dropout: float = 0.05  # card: 0.05
    target_modules: tuple[str, ...] = ("c_attn",)  # card: GPT-2's fused Q/K/V projection (a Conv1D)
    data: str = "tatsu-lab/alpaca"  # card: Stanford Alpaca, columns instruction, input, output
    max_samples: int = 1000  # card: 1,000 training rows (0: all)
    eval_prompts: int = 16  # held out from training: both models answer and embed these
    per_device_train_batch_size: int = 4  # card: batch 4
    gradient_accumulation_steps: int = 1  # card: no accumulation
    learning_rate: float = 2e-4  # card: 2e-4
    lr_scheduler_type: str = "linear"  # the card names none: the Trainer's default, decaying to 0 at max_steps
    max_steps: int = 200  # card: 200 steps a run (800 rows seen)
    optim: str = "adamw_torch"  # card: AdamW; 32-bit on both sides, so the optimiser is not a variable of the study
    pad_to_multiple_of: int = 64  # each new padded length costs ~0.35 s once (H100): 64 leaves 8 lengths under 512
    max_new_tokens: int = 32  # greedy continuation length compared token by token
    timing_warmup_steps: int = 5  # the first steps carry Unsloth's compile and CUDA warm-up: left out of the median
    final_loss_window: int = 10  # final train loss = mean of the last 10 steps (one batch of 4 is noisy)
    cosine_threshold: float = 0.95  # card: QLoRA preserves quality if its cosine to 16-bit LoRA clears this
    loss_tolerance: float = 0.05  # optimal rank: the smallest whose final loss is within this of the best rank's
    seed: int = 3407  # one seed for every run: LoRA init, dropout and data order are the same on both sides


SMOKE = dict(data=str(SAMPLE_DATA), ranks=(2, 4), max_steps=4, eval_prompts=4, max_new_tokens=8,
             timing_warmup_steps=1, final_loss_window=3, learning_rate=2e-3)


def main(argv=None):
    session = start(RECIPE, Config, argv, SMOKE, chat_format=False, checks=[check_options],
                    one_process="its study trains several runs one after another and compares their weights")
    cfg = session.cfg
    with session.folder:
        # 1. Data: Alpaca rows in the card's prompt format as TRL prompt/completion pairs, so the loss (and every
        #    comparison below) is about the response; the held-out prompts are never trained on.
        train_rows, held_out, data = alpaca_rows(cfg.data, cfg.max_samples, cfg.eval_prompts, cfg.seed)
        print(f"data: {data['report']}; train {data['train']:,}, held-out prompts {data['held_out']}")
        model_name = base_model(session, "gpt2", lambda: train_rows + held_out)
        train_dataset = Dataset.from_list([{"prompt": alpaca_prompt(row), "completion": row["output"]}
                                           for row in train_rows])
        prompts = [alpaca_prompt(r) for r in held_out]

        # 2. The study: every rank on both bases, one model in memory at a time, same seed, data order and steps.
        #    Then, as the yardstick for the cosines, QLoRA once more at the largest rank with another seed.
        runs, probes, curves = [], {}, {}
        (session.folder.path / "metrics").mkdir()
        sides = [cfg.only] if cfg.only else list(SIDES)
        plan = [(side, rank, cfg.seed) for rank in cfg.ranks for side in sides]
        plan += [("qlora", max(cfg.ranks), cfg.seed + 1)] if "qlora" in sides else []
        for side, rank, seed in plan:
            summary, probes[side, rank, seed], records = train_and_probe(session, model_name, side, rank, seed,
                                                                         train_dataset, prompts)
            if seed == cfg.seed:
                runs.append(summary)
                curves[f"{side} r{rank}"] = records
        seed_reference = seed_to_seed(probes, cfg) if "qlora" in sides else None

        # 3. Compare the sides rank by rank, answer the card, plot, and write results.md last.
        comparisons = [compare(rank, runs, probes, cfg) for rank in cfg.ranks] if len(sides) == 2 else []
        card = card_answers(cfg, runs, comparisons)
        plot_vs_rank(session.folder.path / "memory_vs_rank.png", cfg.ranks, "Peak GPU memory while training", "GiB",
                     {side: [r["peak_gpu_memory_gib"] for r in runs if r["side"] == side] for side in sides},
                     empty="no GPU: peak memory is only measured on CUDA")
        plot_vs_rank(session.folder.path / "cosine_vs_rank.png", cfg.ranks, "QLoRA against 16-bit LoRA, held-out "
                     "prompts", "similarity", {"mean-pooled cosine": [c["mean_pooled_cosine"] for c in comparisons],
                                               "token match rate": [c["token_match_rate"] for c in comparisons]},
                     empty="one side only (--only): nothing to compare", threshold=cfg.cosine_threshold)
        # The adapter that chat and export use: the card's side (QLoRA, unless --only lora) at the optimal rank.
        kept = next(r for r in runs if r["side"] == sides[0] and r["rank"] == (card["optimal_rank"] or cfg.ranks[-1]))
        shutil.copytree(session.folder.path / kept["adapter"], session.folder.adapter)
        session.folder.write_json("study.json", {"card": card, "ranks": comparisons, "runs": runs,
                                                 "seed_reference": seed_reference})
        session.record.load_in_4bit = kept["side"] == "qlora"
        session.record.adapters = [record.Adapter("adapter", session.record.base_model, kept["side"] == "qlora")] + [
            record.Adapter(r["adapter"], session.record.base_model, r["side"] == "qlora") for r in runs]
        print(results_table(cfg, runs, comparisons))
        print(f"done: optimal rank {card['optimal_rank']}; results in {session.folder.path}")
        session.finish(None, None, None, data, results_markdown(cfg, session, data, runs, comparisons, card,
                                                                seed_reference),
                       loss_curves=curves, save_adapter=False, precision=kept["precision"],
                       throughput={key: kept[key] for key in ("train_seconds", "tokens_trained", "median_step_time_s",
                                                              "tokens_per_s", "peak_gpu_memory_gib")},
                       optimizer=runs[-1]["optimizer"], runs=runs, card=card, seed_reference=seed_reference,
                       adapter_kept=kept["adapter"], load_in_4bit=kept["side"] == "qlora")


def train_and_probe(session, model_name, side, rank, seed, train_dataset, prompts):
    """One run of the study: load the base through Unsloth (4-bit for QLoRA, 16-bit for the baseline), LoRA on
    c_attn, train, read the peak before generation can raise it, probe the held-out prompts, keep the adapter, and
    let the model go before the next run. Returns (summary, probe, metrics records)."""
    cfg, folder = session.cfg, session.folder
    name = f"{side}-r{rank}" + ("" if seed == cfg.seed else f"-seed{seed}")
    before = free_gpu_memory()
    set_seed(seed)
    model, tokenizer = load_model(model_name, cfg.max_seq_length, session.hardware.precision,
                                  load_in_4bit=side == "qlora", target_modules=cfg.target_modules,
                                  use_gradient_checkpointing=False)
    tokenizer.chat_template = ALPACA_CHAT_TEMPLATE
    model = add_lora(model, side, rank, cfg, seed)
    recorder = MetricsRecorder(folder.path / "metrics" / f"{name}.jsonl")
    session.log_to(name)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=train_dataset, callbacks=[recorder],
                         args=study_arguments(session, seed))
    recorder.count_tokens_of(trainer)
    readable_progress(trainer)
    reset_peak_memory()
    trainer.train()
    peak = peak_memory_gib()
    probed = probe(model, tokenizer, prompts, cfg.max_new_tokens)
    adapter = folder.path / "adapters" / name
    model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    summary = summarize_run(side, rank, seed, cfg, model, trainer, recorder, peak, before, adapter, folder)
    summary["cosine_to_base"] = mean_pooled_cosine(probed[1], probed[2])
    return summary, probed, recorder.records


def study_arguments(session, seed: int) -> SFTConfig:
    """Every run of the study trains the same way: the Config's rate, steps, batch and padding, this run's seed."""
    return trainer_arguments(
        session, SFTConfig, seed=seed,
        completion_only_loss=True,  # loss on the response, as the card's prompt format intends
        gradient_checkpointing=False,  # TRL's default is on: off on both sides, so memory is comparable
        padding_free=False,  # padded batches on both sides: Unsloth would otherwise choose per model
        save_strategy="no")  # the adapter is saved after training; no run here needs a checkpoint


def check_options(cfg, run):
    if cfg.only not in ("", *SIDES):
        raise UserError(f"--only {cfg.only}: use qlora or lora, or leave it out to run both sides")
    if not cfg.ranks or any(rank <= 0 for rank in cfg.ranks):
        raise UserError(f"--ranks {','.join(map(str, cfg.ranks))}: give positive LoRA ranks, e.g. --ranks 2,4")
    if cfg.pad_to_multiple_of < 1:
        raise UserError(f"--pad-to-multiple-of {cfg.pad_to_multiple_of}: use 1 (pad each batch to its longest row) "
                        "or more, e.g. 64")
    if run.resume or run.stop_after_step:
        raise UserError("--resume and --stop-after-step are not supported by this study: its runs are short (200 "
                        "steps) and compared as whole runs; start it again")


def alpaca_prompt(row: dict) -> str:
    """The card's prompt: ### Instruction, ### Input only when the row has one, then ### Response for the model."""
    parts = [f"### Instruction:\n{row['instruction'].strip()}"]
    if str(row.get("input") or "").strip():
        parts.append(f"### Input:\n{row['input'].strip()}")
    return "\n\n".join(parts + ["### Response:\n"])


def alpaca_rows(source: str, max_samples: int, eval_prompts: int, seed: int):
    """(train rows, held-out rows, summary): one seeded shuffle, held-out rows first, then up to max_samples."""
    rows = read_rows(source)
    columns = set().union(*(row.keys() for row in rows[:100])) if rows else set()
    if not {"instruction", "output"} <= columns:
        raise UserError(f"{source}: expected Alpaca columns instruction, input, output; found {sorted(columns)}")
    usable = [row for row in rows if str(row.get("instruction") or "").strip()
              and str(row.get("output") or "").strip()]
    if len(usable) <= eval_prompts:
        raise UserError(f"{source}: {len(usable)} usable rows; need more than --eval-prompts {eval_prompts}")
    random.Random(seed).shuffle(usable)
    held_out, train = usable[:eval_prompts], usable[eval_prompts:]
    train = train[:max_samples] if max_samples else train
    report = f"kept {len(usable):,} / {len(rows):,}; dropped: no instruction or output {len(rows) - len(usable):,}"
    return train, held_out, {"source": source, "rows": len(rows), "kept": len(usable), "train": len(train),
                             "held_out": len(held_out), "report": report}


def add_lora(model, side: str, rank: int, cfg, seed: int):
    """The same adapter on both sides: c_attn(x) + (alpha / r) * B A dropout(x), A drawn from the seed, B zero.

    QLoRA goes through Unsloth: loading in 4-bit turned GPT-2's Conv1D c_attn into a bitsandbytes Linear4bit, which
    Unsloth's get_peft_model accepts. The 16-bit baseline goes through PEFT directly: there c_attn stays a Conv1D, which
    Unsloth 2026.10.9's get_peft_model rejects on GPU ("No layers to finetune?"); PEFT wraps it with fan_in_fan_out=True
    (Conv1D stores its weight transposed), which changes how a merge reads the weight, not the adapter's math.
    """
    if side == "qlora":
        return FastLanguageModel.get_peft_model(
            model, r=rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
            target_modules=list(cfg.target_modules), use_gradient_checkpointing=False, random_state=seed)
    set_seed(seed)  # what Unsloth's random_state does on the QLoRA side, so both draw the same A
    return get_peft_model(model, LoraConfig(
        r=rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
        target_modules=list(cfg.target_modules), fan_in_fan_out=True, task_type="CAUSAL_LM"))


@torch.no_grad()
def probe(model, tokenizer, prompts: list[str], max_new_tokens: int):
    """One trained model on the held-out prompts: greedy continuations (token ids up to and including the first
    end-of-text), each prompt's mean-pooled last hidden state (after GPT-2's final layer norm), and the same with the
    adapter off (the model's own base)."""
    FastLanguageModel.for_inference(model)
    eos = tokenizer.eos_token_id
    tokenizer.padding_side = "left"  # generation continues from each prompt's own last token
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=eos,
                               eos_token_id=eos)[:, batch["input_ids"].shape[1]:].tolist()
    continuations = [ids[:ids.index(eos) + 1] if eos in ids else ids for ids in generated]
    tokenizer.padding_side = "right"  # padding after a prompt leaves its positions, so its hidden states, unchanged
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    hidden = model.get_base_model().transformer(**batch).last_hidden_state  # the body, without the LM head
    with model.disable_adapter():
        base_hidden = model.get_base_model().transformer(**batch).last_hidden_state
    return continuations, mean_pool(hidden, batch["attention_mask"]), mean_pool(base_hidden, batch["attention_mask"])


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, sequence, hidden) -> (batch, hidden): the mean over each row's real tokens, padding left out."""
    mask = attention_mask.unsqueeze(-1).float()
    return ((hidden.float() * mask).sum(1) / mask.sum(1)).cpu()


def mean_pooled_cosine(first: torch.Tensor, second: torch.Tensor) -> float:
    """Mean over prompts of the cosine similarity between two models' mean-pooled embeddings (batch, hidden)."""
    return torch.nn.functional.cosine_similarity(first.float(), second.float(), dim=-1).mean().item()


def token_match_rate(first: list[list[int]], second: list[list[int]]) -> float:
    """Fraction of positions where two models' greedy tokens agree, pooled over prompts. Continuations are compared
    up to the longer one: a position only one model produced (the other had stopped) counts as a mismatch."""
    positions = matches = 0
    for a, b in zip(first, second, strict=True):
        positions += max(len(a), len(b))
        matches += sum(x == y for x, y in zip(a, b))
    return matches / positions if positions else 1.0


def compare(rank: int, runs: list[dict], probes: dict, cfg) -> dict:
    qlora, lora = (next(r for r in runs if r["side"] == side and r["rank"] == rank) for side in SIDES)
    (q_tokens, q_pooled, _), (l_tokens, l_pooled, _) = probes["qlora", rank, cfg.seed], probes["lora", rank, cfg.seed]
    cosine = mean_pooled_cosine(q_pooled, l_pooled)
    memory = qlora["peak_gpu_memory_gib"], lora["peak_gpu_memory_gib"]
    return {"rank": rank, "memory_reduction_pct": None if None in memory else 100 * (1 - memory[0] / memory[1]),
            "token_match_rate": token_match_rate(q_tokens, l_tokens), "mean_pooled_cosine": cosine,
            "clears_threshold": cosine >= cfg.cosine_threshold}


def seed_to_seed(probes: dict, cfg) -> dict:
    """QLoRA at the largest rank against itself trained from another seed: how far apart two runs land by chance."""
    rank, seeds = max(cfg.ranks), [cfg.seed, cfg.seed + 1]
    (tokens, pooled, _), (other_tokens, other_pooled, _) = (probes["qlora", rank, seed] for seed in seeds)
    return {"rank": rank, "seeds": seeds, "mean_pooled_cosine": mean_pooled_cosine(pooled, other_pooled),
            "token_match_rate": token_match_rate(tokens, other_tokens)}


def card_answers(cfg, runs: list[dict], comparisons: list[dict]) -> dict:
    """The card's three answers; the optimal rank is the smallest whose final loss is within loss_tolerance of the
    best rank's and (when both sides ran) whose cosine clears the threshold."""
    side = "qlora" if any(r["side"] == "qlora" for r in runs) else "lora"
    loss = {r["rank"]: r["final_loss"] for r in runs if r["side"] == side}
    clears = {c["rank"]: c["clears_threshold"] for c in comparisons}
    rule = (f"smallest rank whose {side} final loss is within {cfg.loss_tolerance} of the best rank's"
            + (f" and whose cosine to 16-bit LoRA is >= {cfg.cosine_threshold}" if comparisons else ""))
    fits = [rank for rank in cfg.ranks
            if loss[rank] <= min(loss.values()) + cfg.loss_tolerance and clears.get(rank, True)]
    reductions = [c["memory_reduction_pct"] for c in comparisons if c["memory_reduction_pct"] is not None]
    return {"memory_reduction_pct": [min(reductions), max(reductions)] if reductions else None,
            "cosine": [min(c["mean_pooled_cosine"] for c in comparisons),
                       max(c["mean_pooled_cosine"] for c in comparisons)] if comparisons else None,
            "ranks_clearing_threshold": [rank for rank, ok in clears.items() if ok],
            "optimal_rank": min(fits) if fits else None, "rule": rule}


def summarize_run(side, rank, seed, cfg, model, trainer, recorder, peak, before, adapter, folder) -> dict:
    losses = [record["loss"] for record in recorder.records if "loss" in record]
    summary = {
        "side": side, "rank": rank, "seed": seed, "path": SIDES[side], "quantization": quantization_in_use(model),
        "steps": trainer.state.global_step,
        "trainable_parameters": model.get_nb_trainable_parameters()[0],
        "final_loss": statistics.mean(losses[-cfg.final_loss_window:]),
        "median_step_time_s": after_warmup(recorder.step_times, cfg.timing_warmup_steps),
        "tokens_per_s": after_warmup(recorder.tokens_per_s, cfg.timing_warmup_steps),
        # What earlier runs left allocated (Unsloth keeps a few caches) is subtracted: each run's peak is its own.
        "peak_gpu_memory_gib": None if peak is None else peak - before, "gpu_memory_before_load_gib": before,
        "train_seconds": recorder.train_seconds, "tokens_trained": recorder.tokens_seen,
        "precision": precision_of(model),
        "optimizer": optimizer_that_ran(trainer), "adapter": str(adapter.relative_to(folder.path))}
    print(f"{side} r{rank} (seed {seed}): final loss {summary['final_loss']:.4f}, median step "
          f"{number(summary['median_step_time_s'], ' s', 3)}, peak GPU memory "
          f"{number(summary['peak_gpu_memory_gib'], ' GiB')}")
    return summary


def after_warmup(values: list[float], warmup: int) -> float | None:
    kept = values[warmup:] or values
    return statistics.median(kept) if kept else None


def free_gpu_memory() -> float | None:
    """Collect the previous run's model and optimiser; returns what is still allocated on the GPU (GiB), None on CPU."""
    if not torch.cuda.is_available():
        return None
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated() / 2**30


def plot_vs_rank(path: Path, ranks, title: str, ylabel: str, series: dict, empty: str, threshold=None):
    figure, axes = plt.subplots(figsize=(6, 4))
    drawn = False
    for label, values in series.items():
        points = [(rank, value) for rank, value in zip(ranks, values) if value is not None]
        if points:
            axes.plot(*zip(*points), marker="o", label=label)
            drawn = True
    if drawn and threshold is not None:
        axes.axhline(threshold, linestyle="--", color="gray", label=f"threshold {threshold}")
    if not drawn:
        axes.text(0.5, 0.5, empty, ha="center", va="center", transform=axes.transAxes)
    axes.set_xscale("log", base=2)
    axes.set_xticks(list(ranks), [str(rank) for rank in ranks])
    axes.set(title=title, xlabel="LoRA rank", ylabel=ylabel)
    axes.set_ylim(bottom=0 if threshold is None else None)
    if drawn:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def results_table(cfg, runs: list[dict], comparisons: list[dict]) -> str:
    by = {(r["side"], r["rank"]): r for r in runs}
    compared = {c["rank"]: c for c in comparisons}
    lines = ["| rank | peak GiB qlora / lora | memory reduction | median step s qlora / lora | final loss qlora / lora "
             "| token match | cosine | cosine >= threshold |", "|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for rank in cfg.ranks:
        both = [by.get((side, rank), {}) for side in SIDES]
        c = compared.get(rank, {})
        pairs = [" / ".join(number(r.get(key), "", digits) for r in both)
                 for key, digits in (("peak_gpu_memory_gib", 2), ("median_step_time_s", 3), ("final_loss", 4))]
        clears = {True: "yes", False: "no"}.get(c.get("clears_threshold"), "n/a")
        lines.append(f"| {rank} | {pairs[0]} | {number(c.get('memory_reduction_pct'), '%', 1)} | {pairs[1]} | {pairs[2]} "
                     f"| {number(c.get('token_match_rate'), '', 3)} | {number(c.get('mean_pooled_cosine'), '', 4)} | {clears} |")
    return "\n".join(lines)


def results_markdown(cfg, session, data, runs: list[dict], comparisons: list[dict], card: dict,
                     seed_reference: dict | None) -> str:
    memory, cosine, ranks = card["memory_reduction_pct"], card["cosine"], ", ".join(map(str, cfg.ranks))
    if memory:
        memory_answer = f"{memory[0]:.1f}% to {memory[1]:.1f}% less peak GPU memory over ranks {ranks}"
    else:
        memory_answer = "n/a: " + ("no GPU, and peak GPU memory is only measured on CUDA" if session.hardware.gpu_name is None
                                   else "needs both sides (--only ran one)")
    if cosine:
        cleared = card["ranks_clearing_threshold"]
        verdict = ("clears it at every rank" if len(cleared) == len(comparisons) else
                   f"clears it at ranks {', '.join(map(str, cleared))} only" if cleared else "clears it at no rank")
        cosine_answer = f"{cosine[0]:.4f} to {cosine[1]:.4f}: {verdict}"
    else:
        cosine_answer = "n/a: needs both sides (--only ran one)"
    optimal = card["optimal_rank"] if card["optimal_rank"] is not None else "none"
    quantization = next((r["quantization"] for r in runs if r["quantization"]), None)
    qlora_base = ("4-bit base as loaded: {quant_type}, block {blocksize}, double quantization {double_quant}, "
                  "compute {compute_dtype}".format(**quantization) if quantization else SIDES["qlora"])
    yardstick = ["## What a cosine means here", "",
                 "Mean-pooled cosines between GPT-2 variants sit close to 1 whatever they learned; read the card's "
                 "against these:", "",
                 "- each trained side against its own base (adapter off): " + ", ".join(
                     f"{r['side']} r{r['rank']} {r['cosine_to_base']:.4f}" for r in runs)]
    if seed_reference:
        yardstick.append(f"- QLoRA r{seed_reference['rank']} against itself from seed {seed_reference['seeds'][1]} "
                         f"instead of {seed_reference['seeds'][0]}: cosine {seed_reference['mean_pooled_cosine']:.4f}, "
                         f"token match {seed_reference['token_match_rate']:.3f}. A QLoRA vs 16-bit cosine at or above "
                         "this says quantization moves the model no more than the seed does.")
    return "\n".join([
        f"# {RECIPE}: when does 4-bit quantization preserve quality?", "",
        f"- model: {trained_model(session)}; {session.hardware.gpu_name or 'CPU'}, {runs[0]['precision']}; LoRA on "
        f"{', '.join(cfg.target_modules)}, alpha {cfg.lora_alpha}, dropout {cfg.lora_dropout}",
        f"- data: {data['source']} - {data['report']}; train {data['train']:,}, held-out prompts {data['held_out']}",
        f"- every run: seed {cfg.seed}, {cfg.max_steps} steps at batch {cfg.per_device_train_batch_size}, {cfg.optim}, "
        f"learning rate {cfg.learning_rate}, loss on the response only",
        f"- qlora: {qlora_base}; lora: {SIDES['lora']}; both compute in {runs[0]['precision']}", "",
        "## The card's table", "", "| the card asks | measured |", "|:---|:---|",
        f"| memory reduction, QLoRA vs 16-bit LoRA | {memory_answer} |",
        f"| cosine similarity vs 16-bit LoRA (threshold {cfg.cosine_threshold}) | {cosine_answer} |",
        f"| optimal rank | {optimal} ({card['rule']}) |", "",
        "## Per rank", "", results_table(cfg, runs, comparisons), "",
        "- peak GPU memory: torch.cuda.max_memory_allocated during training, less what was allocated before the run "
        "loaded its model; memory reduction = 1 - QLoRA peak / 16-bit LoRA peak",
        f"- median step: training steps after the first {cfg.timing_warmup_steps}; final loss: mean of the last "
        f"{cfg.final_loss_window} steps' training loss",
        f"- token match: greedy continuations ({cfg.max_new_tokens} new tokens at most, up to end-of-text) of the "
        f"{data['held_out']} held-out prompts compared position by position up to the longer one; a position only one "
        "model reached counts as a mismatch",
        "- cosine: each held-out prompt's last hidden states, mean-pooled over its tokens, QLoRA against 16-bit LoRA, "
        "averaged over prompts", "", *yardstick, "",
        "![peak GPU memory vs rank](memory_vs_rank.png)", "", "![cosine and token match vs rank](cosine_vs_rank.png)",
    ])


if __name__ == "__main__":
    run_main(main)
