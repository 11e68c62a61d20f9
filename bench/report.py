"""BENCHMARKS.md from the results bench/benchmark.py collects: the tables, each row scored pass / FAIL against the
repository's targets, the sessions that measured them and bench/notes.md. It reads results only (no GPU, no torch),
so `python -m bench.benchmark --report-only` regenerates the file anywhere."""
from pathlib import Path

from bench.plan import RECIPES, REGIMES

# Hand-written, copied in under the generated tables with its own headings: what explains the tables, and the
# measurements made outside this harness (the GPU test suite, exports).
NOTES = Path(__file__).resolve().parent / "notes.md"

# The repository's targets on fixed-length rows, (tokens/s ratio, memory ratio) over the plain script: what raw Unsloth
# reached against a plain transformers + PEFT + bitsandbytes script on an H100.
TARGETS = {"llama-3-8b": (1.59, 0.65), "llama-3.1-8b": (1.59, 0.65), "tinyllama-1.1b": (1.41, 0.53),
           "llama-3.2-1b": (1.07, 0.51), "gpt2-medium": (1.66, 0.47)}
CHAT_SPEEDUP = 2.0  # the repository's target on variable-length chat rows, over the padded plain script's tokens/s
SCALING_TARGET = 1.85  # 2 GPUs against 1 at the same effective batch: tokens/s, with per-GPU peak memory no higher
AUTO_BUDGET_CHAT_TARGET = 1.5  # --token-budget auto against card on chat rows, one GPU; fixed rows: no slower
NO_OVERHEAD = 0.95  # a recipe at this share of raw Unsloth's tokens/s or more adds nothing beyond run-to-run noise


def variant_key(gpus: int, budget: str) -> str:
    """A recipe run's key among the "variants" sides of results.json: written by the measuring, read by the tables."""
    return f"gpus={gpus},token_budget={budget}"


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


def measuring_sessions(sessions: list[dict], rows: list[dict]) -> list[dict]:
    """The sessions that measured the rows the tables show, in order: the first session whose time span holds a row's
    measured_utc; for a row that failed before it was timed, the last session that ran its recipe. Sessions whose rows
    were all measured again later are left out (results.json and git keep them)."""
    kept = set()
    for row in rows:
        measured = row.get("measured_utc")
        if measured:
            found = [i for i, s in enumerate(sessions)
                     if s.get("started_utc", "") <= measured <= (s.get("finished_utc") or measured)][:1]
        else:
            found = [i for i, s in enumerate(sessions) if row.get("recipe") in (s.get("recipes_done") or [])][-1:]
        kept.update(found)
    return [session for i, session in enumerate(sessions) if i in kept]


WHERE_FILES_WENT = ("--work-dir", "--results", "--out")  # where the measuring machine wrote: nothing of what ran


def shown_command(command: str) -> str:
    """The benchmark command as it measured: the options that only placed its files on that machine left out."""
    words, shown = command.split(), []
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word in WHERE_FILES_WENT:
            skip = True
        elif not word.startswith(tuple(f"{option}=" for option in WHERE_FILES_WENT)):
            shown.append(word)
    return " ".join(shown)


def machine(session: dict) -> str:
    """A measuring machine as what it is: GPU model, NVIDIA driver, and the software (torch with its CUDA, the
    attention kernels present or not)."""
    driver = session.get("nvidia_driver")
    return f"{session['gpu'] or 'CPU'}{', driver ' + driver if driver else ''}; {software(session)}"


def markdown(results: dict) -> str:
    """BENCHMARKS.md: every table, the sessions that measured them and the notes."""
    runs, sessions, variants = results["runs"], results["sessions"], results.get("variants", {})
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
             "Generated by `bench/report.py` from the results `bench/benchmark.py` measured (`bench/results.json`); "
             "do not edit by hand (analysis, and the figures measured outside this harness, go in `bench/notes.md`, "
             "copied in after the tables).",
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
    measured = measuring_sessions(sessions, [*runs.values(), *variants.values()])
    machines = list(dict.fromkeys(machine(session) for session in measured))
    lines += ["## Runs", "",
              "The benchmark sessions that measured the rows above; rows measured again later replace a session's "
              "(git history keeps the earlier reports).", ""]
    if len(machines) == 1:
        lines += [f"Every session ran on: {machines[0]}.", ""]
    if any((session["git_commit"] or "").endswith("-dirty") for session in measured):
        lines += ["A commit ending in `-dirty`: tracked files in the working tree differed from that commit when the "
                  "benchmark ran.", ""]
    for session in measured:
        done = session.get("recipes_done")
        lines.append(f"- {session['finished_utc']}: `{shown_command(session['command'])}` ({session['wall_s']:.0f} s"
                     f"{'' if len(machines) == 1 else '; ' + machine(session)}; commit {session['git_commit']}"
                     f"{'; finished ' + ', '.join(done) if done is not None else ''})")
    if NOTES.exists() and not smoke:
        lines += ["", NOTES.read_text().strip()]
    return "\n".join(lines) + "\n"

