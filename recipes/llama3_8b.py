"""Llama-3-8B-Instruct, LoRA on the attention projections, FineTome-100k in the Llama 3 chat template.

Card: 4-bit Llama-3-8B-Instruct, LoRA r8/alpha16 on q,k,v,o; 50k FineTome conversations split 80/20; loss on
assistant turns; eval every 100 steps, the best checkpoint by eval loss is kept.
Launch: ./run.sh llama3_8b          offline check on CPU: ./run.sh llama3_8b --smoke
Several GPUs: ./run.sh llama3_8b --gpus 2 (the card's effective batch of 16 kept: 8 accumulation steps become 4 a GPU)
"""
import unsloth  # noqa: F401  (first: Unsloth patches transformers, TRL and PEFT on import)

from dataclasses import dataclass
from pathlib import Path

from trl import SFTConfig, SFTTrainer
from unsloth import FastLanguageModel

from common import distributed
from common.callbacks import MovingAverageEvalLoss
from common.chat import conversation_dataset, mask_to_assistant_turns, set_chat_template
from common.data import chat_data, read_rows
from common.errors import run_main
from common.model import load_model
from common.report import throughput_line
from common.session import answer_prompts, base_model, keep_best_by_eval_loss, start, trainer_arguments

RECIPE = Path(__file__).stem  # the file's name: a copied recipe is its own recipe, with its own run folders
SAMPLE_DATA = Path(__file__).parent / "data" / "finetome_sample.jsonl"


@dataclass
class Config:
    """Llama-3-8B-Instruct LoRA on FineTome-100k."""
    model_name: str = "unsloth/llama-3-8b-Instruct-bnb-4bit"  # the card's checkpoint, pre-quantized by Unsloth
    load_in_4bit: bool = True  # 4-bit bitsandbytes base: the 8B model fits a 16 GB T4
    max_seq_length: int = 1024  # card: 1024, with a length filter: longer conversations are dropped, not truncated
    attn_implementation: str = "eager"  # card: eager for stability; on a GPU Unsloth runs its own attention instead
    lora_r: int = 8  # card: r 8
    lora_alpha: int = 16  # card: alpha 16
    lora_dropout: float = 0.0  # card: 0 (also lets Unsloth use its fused LoRA kernels)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # card: attention only
    data: str = "mlabonne/FineTome-100k"  # card: ShareGPT-style conversations (human/gpt) with source and score
    chat_template: str = "llama-3"  # card: the model's own Llama 3 template
    max_samples: int = 50_000  # card: 50k of the 100k conversations
    long_conversations: str = "drop"  # card: drop what does not fit; split cuts long chats into windows of whole turns
    eval_fraction: float = 0.2  # card: 80% train / 20% eval, seeded
    per_device_train_batch_size: int = 2  # card: batch 2
    gradient_accumulation_steps: int = 8  # card: effective batch 16
    token_budget: str = "auto"  # choice: card|auto|N tokens a pass; auto: fewest passes a 24 GiB+ GPU holds, same rows
    learning_rate: float = 1e-4  # card: 1e-4
    warmup_steps: int = 100  # card: 100 steps of linear warmup
    lr_scheduler_type: str = "cosine"  # card: cosine decay after warmup
    max_steps: int = 700  # card: 700 optimizer steps (11,200 conversations seen)
    optim: str = "adamw_8bit"  # card: 8-bit AdamW states (bitsandbytes) save memory
    weight_decay: float = 0.0  # choice: the card names none; Unsloth's notebooks use 0.01, a negligible difference
    eval_steps: int = 100  # card: evaluate (and checkpoint) every 100 steps
    per_device_eval_batch_size: int = 2  # same rows per forward as training: eval needs no extra memory
    max_eval_samples: int = 500  # eval loss on 500 held-out conversations: 10k would cost more time than training
    moving_average_window: int = 3  # eval losses averaged to smooth a noisy curve
    sample_prompts: int = 3  # held-out conversations answered after training, written to results.md
    max_new_tokens: int = 128  # length cap for those answers
    seed: int = 3407  # Unsloth's customary seed: data split, shuffling, LoRA init


SMOKE = dict(data=str(SAMPLE_DATA), max_seq_length=512, max_samples=0, gradient_accumulation_steps=1, warmup_steps=2,
             max_steps=12, learning_rate=2e-3, eval_steps=4, max_eval_samples=8, sample_prompts=2, max_new_tokens=16)


def main(argv=None):
    session = start(RECIPE, Config, argv, SMOKE)  # flags and inputs checked, GPUs joined, seed set, run folder opened
    cfg = session.cfg
    with session.folder:
        # 1. Load the 4-bit base model (--smoke: a tiny one of its architecture) and the Llama 3 chat template.
        model_name = base_model(session, "llama-3", lambda: read_rows(cfg.data))
        model, tokenizer = load_model(model_name, cfg.max_seq_length, session.hardware.precision, cfg.load_in_4bit,
                                      target_modules=cfg.target_modules, attn_implementation=cfg.attn_implementation)
        tokenizer = set_chat_template(tokenizer, cfg.chat_template)

        # 2. LoRA adapters on the attention projections; Unsloth's gradient checkpointing offloads activations.
        model = FastLanguageModel.get_peft_model(
            model, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
            target_modules=list(cfg.target_modules), use_gradient_checkpointing="unsloth", random_state=cfg.seed)

        # 3. Data: standardise to messages, drop (or split) what does not fit, split 80/20.
        train_rows, eval_rows, data = chat_data(cfg, tokenizer)

        # 4. Train with loss on assistant turns only; checkpoint at every evaluation, keep the best by eval loss.
        trainer = SFTTrainer(
            model=model, processing_class=tokenizer, train_dataset=conversation_dataset(train_rows),
            eval_dataset=conversation_dataset(eval_rows[:cfg.max_eval_samples]),
            callbacks=[MovingAverageEvalLoss(cfg.moving_average_window, session.eval_losses())],
            args=trainer_arguments(session, SFTConfig, **keep_best_by_eval_loss(cfg)))
        trainer = mask_to_assistant_turns(trainer, cfg.chat_template)
        if not session.train(trainer):
            return

        # 5. Evaluate the kept (best) checkpoint and answer a few held-out prompts.
        final_eval = trainer.evaluate(metric_key_prefix="final")
        distributed.only_main_continues()
        best_step = session.best_step(trainer)
        samples = answer_prompts(model, tokenizer, eval_rows[:cfg.sample_prompts], cfg.max_new_tokens)

        # 6. Save the adapter, the run's record and results.md (last: it marks the run complete).
        figures = dict(best_step=best_step, best_eval_loss=trainer.state.best_metric,
                       final_eval_loss=final_eval["final_loss"])
        print(f"done: kept step {best_step} (eval loss {final_eval['final_loss']:.4f}); "
              f"results in {session.folder.path}")
        session.finish(model, tokenizer, trainer, data,
               results_markdown(cfg, data, session.recorder, best_step, final_eval, samples), **figures)


def results_markdown(cfg, data, recorder, best_step, final_eval, samples) -> str:
    evals = [r for r in recorder.records if "eval_loss" in r and "eval_loss_moving_avg" in r]
    lines = [f"# {RECIPE}: Llama-3-8B-Instruct LoRA on {data['source']}", "",
             f"- data: {data['source']} - {data['report']}; train {data['train']:,}, eval {data['eval']:,}",
             f"- kept checkpoint: step {best_step} (lowest eval loss); its eval loss now: "
             f"{final_eval['final_loss']:.4f}",
             throughput_line(recorder.summary()), "",
             f"| step | eval loss | moving average ({cfg.moving_average_window}) | kept |", "|---:|---:|---:|:---:|"]
    for entry in evals:
        kept = "yes" if entry["step"] == best_step else ""
        lines.append(f"| {entry['step']} | {entry['eval_loss']:.4f} | {entry['eval_loss_moving_avg']:.4f} | {kept} |")
    lines += ["", "## Held-out prompts, answered by the trained model", ""]
    for question, answer in samples:
        lines += [f"**Prompt:** {question}", "", f"**Answer:** {answer or '(empty)'}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    run_main(main)
