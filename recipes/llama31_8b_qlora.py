"""Llama-3.1-8B QLoRA: a frozen 4-bit base, small LoRA adapters; a rank sweep and a memory estimate from config.json.

Card: Llama-3.1-8B (instruct or base) quantized to 4-bit and frozen; LoRA A/B adapters at rank 8, alpha 2 x rank, on
q,k,v,o; chat data in any format the toolkit reads; "start at rank 8, double until returns diminish" as --rank-sweep.
Launch: ./run.sh llama31_8b_qlora     offline check on CPU: ./run.sh llama31_8b_qlora --smoke
Several GPUs: ./run.sh llama31_8b_qlora --gpus 2 (effective batch 8 kept: 4 accumulation steps become 2 a GPU);
--rank-sweep runs in one process (it trains one rank after another and compares them).
"""
import unsloth  # noqa: F401  (first: Unsloth patches transformers, TRL and PEFT on import)

import gc
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from transformers import set_seed
from trl import SFTConfig, SFTTrainer
from unsloth import FastLanguageModel

from common import distributed
from common.chat import conversation_dataset, mask_to_assistant_turns, set_chat_template
from common.data import chat_data, read_rows
from common.errors import UserError, run_main
from common.model import load_model
from common.outputs import RunFolder
from common.report import number, throughput_line
from common.session import answer_prompts, base_model, keep_best_by_eval_loss, start, trainer_arguments

RECIPE = Path(__file__).stem  # the file's name: a copied recipe is its own recipe, with its own run folders
SAMPLE_DATA = Path(__file__).parent / "data" / "finetome_sample.jsonl"

# The card: the base model for one fixed prompt format (single-task tuning), the instruct model for multi-purpose use.
# variant: (Unsloth's pre-quantized checkpoint, chat template)
VARIANTS = {
    "instruct": ("unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit", "llama-3.1"),
    "base": ("unsloth/Meta-Llama-3.1-8B-bnb-4bit", "alpaca"),
}
# Llama-3.1-8B's published config.json, the fields --estimate-memory reads: used when the hub cannot be reached.
LLAMA31_8B_CONFIG = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False}
OPTIONAL_CONFIG_KEYS = ("num_key_value_heads", "tie_word_embeddings")  # absent: no grouped-query attention, untied
BYTES_PER_PARAMETER = {"fp32": 4, "bf16": 2, "8-bit": 1, "4-bit": 0.5}
# What each trained rank reports, in manifest.json and in the sweep's table.
RESULT_KEYS = ("rank", "lora_alpha", "trainable_parameters", "adapter_mb", "eval_loss", "best_step", "batching",
               "token_budget", "batch", "median_step_time_s", "tokens_per_s", "peak_gpu_memory_gib")


@dataclass
class Config:
    """Llama-3.1-8B QLoRA (instruct or base), with --rank-sweep and --estimate-memory.

    --gpus N trains one rank on N GPUs; --rank-sweep runs in one process (one rank after another, compared)."""
    variant: str = "instruct"  # card: instruct (Llama 3.1 chat) for many tasks; base (plain Alpaca format) for one
    model_name: str = "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit"  # card: instruct; --variant base: the base's
    chat_template: str = "llama-3.1"  # card: instruct's Llama 3.1 template; --variant base: alpaca; loss on replies
    load_in_4bit: bool = True  # card: QLoRA, the frozen base in 4-bit NF4 (about 5.6 GB for 8B instead of 16)
    max_seq_length: int = 2048  # choice (not on the card): Unsloth's notebooks' length; longer chats: --long-conversations
    lora_r: int = 8  # card: start at rank 8; --rank-sweep replaces it by the ranks swept
    lora_alpha: int = 16  # card: alpha = 2 x rank; a swept rank keeps the ratio lora_alpha / lora_r
    lora_dropout: float = 0.0  # 0 lets Unsloth use its fused LoRA kernels
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # card: the attention projections
    data: str = "mlabonne/FineTome-100k"  # chat data, any format common.data reads (ShareGPT, messages, Alpaca, Q&A)
    max_samples: int = 10_000  # choice (not on the card): 10k conversations tune a style; 0 uses every row
    long_conversations: str = "split"  # choice: long chat logs kept as windows of whole turns; drop: only whole ones fit
    eval_fraction: float = 0.05  # held out, seeded: the rank sweep compares ranks on this split
    per_device_train_batch_size: int = 2  # Unsloth's notebook value: fits a 16 GB T4 in 4-bit
    gradient_accumulation_steps: int = 4  # effective batch 8, as in Unsloth's notebooks
    token_budget: str = "auto"  # choice: card|auto|N tokens a pass; auto: fewest passes a 24 GiB+ GPU holds, same rows
    learning_rate: float = 2e-4  # the QLoRA paper's rate for 7-13B models
    warmup_steps: int = 10  # a short linear warmup: the adapters start at zero (B = 0)
    lr_scheduler_type: str = "linear"  # linear decay after warmup, Unsloth's notebook default
    max_steps: int = 300  # choice (not on the card): a few hundred steps; each rank of a sweep trains all of them
    optim: str = "adamw_8bit"  # 8-bit AdamW states (bitsandbytes): the adapters' optimizer in a quarter of the memory
    weight_decay: float = 0.01  # light regularisation of the adapters
    eval_steps: int = 50  # evaluate (and checkpoint) every 50 steps; the best checkpoint is kept
    per_device_eval_batch_size: int = 2  # same rows per forward as training: eval needs no extra memory
    max_eval_samples: int = 200  # eval loss on 200 held-out conversations: enough to rank ranks, cheap per evaluation
    sample_prompts: int = 3  # held-out conversations answered after training, written to results.md
    max_new_tokens: int = 128  # length cap for those answers
    rank_sweep: tuple[int, ...] = ()  # card: start at 8, double while it pays: e.g. 8,16,32,64; empty: no sweep
    min_gain: float = 0.01  # the sweep stops doubling when eval loss improves by less than this fraction (1%)
    estimate_memory: bool = False  # print the card's memory arithmetic from config.json and exit: no weights, no run
    seed: int = 3407  # Unsloth's customary seed: data split, shuffling, LoRA init (the same for every swept rank)


SMOKE = dict(data=str(SAMPLE_DATA), max_seq_length=512, max_samples=0, gradient_accumulation_steps=1, warmup_steps=1,
             max_steps=4, learning_rate=2e-3, eval_steps=2, max_eval_samples=4, sample_prompts=1, max_new_tokens=8)


def main(argv=None):
    session = start(RECIPE, Config, argv, SMOKE, checks=[check_flags, memory_estimate_only])
    cfg = session.cfg
    with session.folder:
        model_name = base_model(session, "llama-3.1", lambda: read_rows(cfg.data))

        # Steps 1-5 once per rank: one run at --lora-r, or, with --rank-sweep, the card's doubling rule.
        ranks = list(cfg.rank_sweep) or [cfg.lora_r]
        swept, results = len(ranks) > 1, []
        for rank in ranks:
            rank_folder = RunFolder(session.folder.path / "sweep" / f"r{rank}") if swept else session.folder
            rank_folder.path.mkdir(parents=True, exist_ok=True)
            results.append(train_at_rank(session, model_name, rank, rank_folder, swept))
            if results[-1] is None:
                return
            if swept:
                shutil.rmtree(rank_folder.checkpoints)  # a swept rank is never resumed: its best weights are saved
            gc.collect()  # the next rank loads a fresh base model: release this one first
            torch.cuda.empty_cache()
            chosen = chosen_rank(ranks, [r["eval_loss"] for r in results], cfg.min_gain)
            if chosen is not None:
                break
        kept = next(r for r in results if r["rank"] == chosen)

        # 6. The kept adapter, the run's record and results.md (last: it marks the run complete).
        if swept:
            shutil.copytree(session.folder.path / "sweep" / f"r{chosen}" / "adapter", session.folder.adapter)
            plot_sweep(results, chosen, session.folder.path / "sweep.png")
        print(f"done: rank {chosen}, eval loss {kept['eval_loss']:.4f}; results in {session.folder.path}")
        session.finish(kept.pop("model"), None, kept.pop("trainer"), kept["data"],
                       results_markdown(cfg, results, chosen, swept),
                       loss_curves={f"r{r['rank']}" if swept else "": r["records"] for r in results},
                       save_adapter=False, throughput=kept["throughput"],
                       **{key: kept[key] for key in RESULT_KEYS},
                       sweep=[{key: r[key] for key in RESULT_KEYS} for r in results] if swept else None)


def train_at_rank(session, model_name, rank, folder, swept) -> dict | None:
    """The card's steps for one LoRA rank, written into `folder`; None when --stop-after-step or a signal ended the
    session."""
    cfg = session.cfg
    set_seed(cfg.seed)  # every rank of a sweep sees the same data order and LoRA initialisation

    # 1. Load the frozen 4-bit base and the variant's prompt format.
    model, tokenizer = load_model(model_name, cfg.max_seq_length, session.hardware.precision, cfg.load_in_4bit,
                                  target_modules=cfg.target_modules)
    tokenizer = set_chat_template(tokenizer, cfg.chat_template)

    # 2. LoRA adapters A (r x in) and B (out x r) on the targets; Unsloth's gradient checkpointing offloads activations
    alpha = lora_alpha_for(rank, cfg)
    model = FastLanguageModel.get_peft_model(
        model, r=rank, lora_alpha=alpha, lora_dropout=cfg.lora_dropout, bias="none",
        target_modules=list(cfg.target_modules), use_gradient_checkpointing="unsloth", random_state=cfg.seed)

    # 3. Data: standardise to messages, split train/eval, cut conversations longer than max_seq_length into windows.
    train_rows, eval_rows, data = chat_data(cfg, tokenizer, f"rank {rank}: data")

    # 4. Train with the loss on the replies only; checkpoint at every evaluation, keep the best by eval loss. A sweep
    #    cannot resume: a signal ends it at once.
    trainer = SFTTrainer(
        model=model, processing_class=tokenizer, train_dataset=conversation_dataset(train_rows),
        eval_dataset=conversation_dataset(eval_rows[:cfg.max_eval_samples]),
        args=trainer_arguments(session, SFTConfig, output_dir=str(folder.checkpoints), **keep_best_by_eval_loss(cfg)))
    trainer = mask_to_assistant_turns(trainer, cfg.chat_template)
    if not session.train(trainer, folder=folder, signals=not swept):
        return None

    # 5. Evaluate the kept (best) checkpoint, answer a few held-out prompts, save the adapter.
    final_eval = trainer.evaluate(metric_key_prefix="final")
    distributed.only_main_continues()
    samples = answer_prompts(model, tokenizer, eval_rows[:cfg.sample_prompts], cfg.max_new_tokens)
    folder.save_adapter(model, tokenizer)
    throughput = session.recorder.summary()
    result = dict(rank=rank, lora_alpha=alpha, trainable_parameters=model.get_nb_trainable_parameters()[0],
                  adapter_mb=(folder.adapter / "adapter_model.safetensors").stat().st_size / 1e6,
                  eval_loss=final_eval["final_loss"], best_step=session.best_step(trainer), data=data,
                  samples=samples, records=session.recorder.records, throughput=throughput,
                  model=model, trainer=trainer, **session.batching, **throughput)
    print(f"rank {rank}: eval loss {result['eval_loss']:.4f}, {result['trainable_parameters']:,} trainable parameters, "
          f"adapter {result['adapter_mb']:.2f} MB")
    return result


def check_flags(cfg, run):
    """The variant's checkpoint and template where the flags left the card's; ranks that a sweep can double; one
    process for a sweep."""
    if cfg.variant not in VARIANTS:
        raise UserError(f"--variant {cfg.variant}: use one of {', '.join(VARIANTS)}")
    instruct, chosen = VARIANTS["instruct"], VARIANTS[cfg.variant]
    cfg.model_name = chosen[0] if cfg.model_name == instruct[0] else cfg.model_name  # a --model-name given stays
    cfg.chat_template = chosen[1] if cfg.chat_template == instruct[1] else cfg.chat_template
    ranks = list(cfg.rank_sweep) or [cfg.lora_r]
    if min(ranks) < 1 or ranks != sorted(set(ranks)):
        flag = "--rank-sweep" if cfg.rank_sweep else "--lora-r"
        raise UserError(f"{flag} {','.join(map(str, ranks))}: ranks must be positive and increasing, e.g. 8,16,32,64")
    if len(ranks) > 1 and (run.resume or run.stop_after_step):
        raise UserError("--resume and --stop-after-step work on a single run, not on a --rank-sweep; rerun the sweep")
    if len(ranks) > 1:
        distributed.refuse(f"{RECIPE} --rank-sweep", "it trains one rank after another and compares them")
    if cfg.eval_steps > cfg.max_steps:
        raise UserError(f"--eval-steps {cfg.eval_steps} is above --max-steps {cfg.max_steps}: no checkpoint to keep")


def memory_estimate_only(cfg, run):
    """--estimate-memory: the card's arithmetic, printed; no weights are loaded and no run folder is written."""
    if cfg.estimate_memory:
        print(memory_estimate(cfg.model_name, list(cfg.rank_sweep) or [cfg.lora_r], cfg))
        raise SystemExit(0)


def lora_alpha_for(rank: int, cfg) -> int:
    """The card's alpha = 2 x rank, as the ratio lora_alpha / lora_r (16 / 8) applied to each swept rank."""
    return round(rank * cfg.lora_alpha / cfg.lora_r)


def relative_gain(previous_loss: float, loss: float) -> float:
    """How much a doubling of the rank lowered eval loss, as a fraction of the loss before it."""
    return (previous_loss - loss) / previous_loss


def chosen_rank(ranks: list[int], eval_losses: list[float], min_gain: float) -> int | None:
    """The card's rule, given the eval losses of the ranks trained so far (in order): a doubling that improves eval
    loss by less than min_gain is not worth its memory, so keep the rank before it. None: train the next rank."""
    for i in range(1, len(eval_losses)):
        if relative_gain(eval_losses[i - 1], eval_losses[i]) < min_gain:
            return ranks[i - 1]
    return ranks[len(eval_losses) - 1] if len(eval_losses) == len(ranks) else None


def plot_sweep(results: list[dict], chosen: int, path: Path):
    figure = Figure(figsize=(5, 3.5))  # a bare Figure renders PNG through Agg: no display, no pyplot state
    axes = figure.subplots()
    ranks, losses = [r["rank"] for r in results], [r["eval_loss"] for r in results]
    axes.plot(ranks, losses, marker="o")
    axes.plot([chosen], [losses[ranks.index(chosen)]], "o", markersize=12, fillstyle="none", label=f"chosen r={chosen}")
    axes.set_xscale("log", base=2)
    axes.set_xticks(ranks, [str(rank) for rank in ranks])
    axes.set(xlabel="LoRA rank", ylabel="eval loss", title="Eval loss vs LoRA rank")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def read_model_config(model_name: str) -> tuple[dict, str]:
    """config.json and where it came from: a local folder, the hub (or its cache), or, for the card's own checkpoints
    when the hub cannot be reached, the built-in copy of Llama-3.1-8B's published values."""
    local = Path(model_name).expanduser()
    if local.exists() or model_name.startswith(("/", ".", "~")):
        if not (local / "config.json").is_file():
            raise UserError(f"--model-name {model_name}: no config.json there; pass a model folder or a hub id")
        return json.loads((local / "config.json").read_text()), str(local / "config.json")
    from huggingface_hub import hf_hub_download
    try:
        return json.loads(Path(hf_hub_download(model_name, "config.json")).read_text()), f"{model_name} on the hub"
    except (OSError, ValueError) as error:  # offline, unknown or gated repository, or not a repository id at all
        if model_name not in [checkpoint for checkpoint, *_ in VARIANTS.values()]:
            raise UserError(f"could not read config.json of {model_name!r} ({type(error).__name__}); "
                            f"pass a local model folder with --model-name") from None
        return LLAMA31_8B_CONFIG, f"built-in copy of Llama-3.1-8B's published values (hub: {type(error).__name__})"


def linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer of a Llama decoder block; grouped-query attention shrinks k and v."""
    hidden, heads, mlp = config["hidden_size"], config["num_attention_heads"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // heads
    query, key_value = heads * head_dim, config.get("num_key_value_heads", heads) * head_dim
    return {"q_proj": (hidden, query), "k_proj": (hidden, key_value), "v_proj": (hidden, key_value),
            "o_proj": (query, hidden), "gate_proj": (hidden, mlp), "up_proj": (hidden, mlp), "down_proj": (mlp, hidden)}


def parameter_counts(config: dict) -> tuple[int, int]:
    """(all parameters, those in the decoder's linear layers: the ones 4-bit quantization applies to)."""
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    linear = layers * sum(i * o for i, o in linear_shapes(config).values())
    embeddings = config["vocab_size"] * hidden * (1 if config.get("tie_word_embeddings") else 2)  # input + lm_head
    return linear + embeddings + (2 * layers + 1) * hidden, linear  # + two RMSNorms a block and the final one


def lora_parameter_count(config: dict, rank: int, targets: tuple[str, ...]) -> int:
    """A (r x in) plus B (out x r) for every targeted layer of every block."""
    shapes = linear_shapes(config)
    return config["num_hidden_layers"] * rank * sum(sum(shapes[name]) for name in targets)


def memory_estimate(model_name: str, ranks: list[int], cfg) -> str:
    """The card's arithmetic, parameters x bytes, from the model's config.json (1 GB = 10^9 bytes)."""
    config, source = read_model_config(model_name)
    missing = [key for key in LLAMA31_8B_CONFIG if key not in config and key not in OPTIONAL_CONFIG_KEYS]
    if missing:
        raise UserError(f"{source}: no {', '.join(missing)}: --estimate-memory reads Llama-style configs")
    total, linear = parameter_counts(config)
    tied = "tied" if config.get("tie_word_embeddings") else "untied"
    lines = [f"memory estimate for {model_name}, from {source}",
             f"  hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, {config['num_attention_heads']} "
             f"heads ({config.get('num_key_value_heads', config['num_attention_heads'])} KV), MLP "
             f"{config['intermediate_size']}, vocab {config['vocab_size']:,}, {tied} embeddings",
             f"  parameters: {total:,} ({total / 1e9:.2f} B)"]
    lines += [f"  weights in {name:<5}  {total * size / 1e9:6.2f} GB" for name, size in BYTES_PER_PARAMETER.items()]
    lines.append(f"  4-bit as QLoRA loads it: {(linear / 2 + (total - linear) * 2) / 1e9:.2f} GB "
                 f"(linear layers in 4-bit; embeddings, lm_head and norms stay 16-bit)")
    for rank in ranks:
        count = lora_parameter_count(config, rank, tuple(cfg.target_modules))
        alpha, targets = lora_alpha_for(rank, cfg), ", ".join(cfg.target_modules)
        lines.append(f"  LoRA r={rank} alpha={alpha} on {targets}: "
                     f"{count:,} parameters, {count * 4 / 1e6:.1f} MB in fp32, {count * 2 / 1e6:.1f} MB in 16-bit")
    lines.append("  not counted: activations (batch x sequence length), the adapters' gradients and optimizer states")
    return "\n".join(lines)


def results_markdown(cfg, results, chosen, swept) -> str:
    kept = next(r for r in results if r["rank"] == chosen)
    data, targets = kept["data"], ", ".join(cfg.target_modules)
    lines = [f"# {RECIPE}: Llama-3.1-8B QLoRA, {cfg.variant} variant", "",
             f"- model: {cfg.model_name}, {'4-bit' if cfg.load_in_4bit else '16-bit'}; prompt format "
             f"{cfg.chat_template}, loss on the replies only",
             f"- data: {data['source']} - {data['report']}; train {data['train']:,}, eval {data['eval']:,}",
             f"- LoRA r {chosen}, alpha {kept['lora_alpha']} on {targets}: {kept['trainable_parameters']:,} trainable "
             f"parameters, adapter {kept['adapter_mb']:.2f} MB",
             f"- kept checkpoint: step {kept['best_step']} (lowest eval loss); eval loss {kept['eval_loss']:.4f}",
             throughput_line(kept["throughput"])]
    if swept:
        lines += ["", f"## Rank sweep: double the rank while eval loss improves by at least {cfg.min_gain:.1%}", "",
                  "| rank | alpha | trainable parameters | adapter MB | eval loss | gain | peak memory GiB | s/step "
                  "| tokens/s |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for previous, r in zip([None] + results, results):
            gain = f"{relative_gain(previous['eval_loss'], r['eval_loss']):.2%}" if previous else "-"
            lines.append(f"| {r['rank']} | {r['lora_alpha']} | {r['trainable_parameters']:,} | {r['adapter_mb']:.2f} | "
                         f"{r['eval_loss']:.4f} | {gain} | {number(r['peak_gpu_memory_gib'])} | "
                         f"{number(r['median_step_time_s'])} | {number(r['tokens_per_s'])} |")
        why = (f"doubling to {results[-1]['rank']} gained less than {cfg.min_gain:.1%}" if results[-1]["rank"] != chosen
               else "every doubling gained enough: the largest rank swept; a larger one may still help")
        lines += ["", f"**Chosen rank: {chosen}** ({why}); its adapter is in adapter/.", "",
                  "![eval loss vs rank](sweep.png)"]
    lines += ["", "## Held-out prompts, answered by the trained model", ""]
    for question, answer in kept["samples"]:
        lines += [f"**Prompt:** {question}", "", f"**Answer:** {answer or '(empty)'}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    run_main(main)
