"""Gemma-3-4B-it, LoRA on the language model's attention and MLP, FineTome-100k in the Gemma 3 chat template.

Notebook: Unsloth's `Gemma3_(4B).ipynb`: 4-bit gemma-3-4b-it, LoRA r8/alpha8 on the text layers only (the vision
tower frozen); FineTome-100k; loss on the model's turns; 30 steps of batch 2 x 4. Gemma 3 has no system role: the
gemma-3 template puts a system message at the start of the first user turn, followed by a blank line.
Launch: ./run.sh gemma3_4b          offline check on CPU: ./run.sh gemma3_4b --smoke
"""
import unsloth  # noqa: F401  (first: Unsloth patches transformers, TRL and PEFT on import)

from dataclasses import dataclass
from pathlib import Path

from trl import SFTConfig, SFTTrainer
from unsloth import FastModel

from common import distributed
from common.chat import conversation_dataset, mask_to_assistant_turns, set_chat_template
from common.data import chat_data, read_rows
from common.errors import run_main
from common.model import load_model
from common.report import throughput_line
from common.session import answer_prompts, base_model, start, trainer_arguments

RECIPE = Path(__file__).stem  # the file's name: a copied recipe is its own recipe, with its own run folders
SAMPLE_DATA = Path(__file__).parent / "data" / "finetome_sample.jsonl"  # FineTome's shape (from/value, system turns)


@dataclass
class Config:
    """Gemma-3-4B-it LoRA on FineTome-100k."""
    model_name: str = "unsloth/gemma-3-4b-it"  # notebook: model_name = "unsloth/gemma-3-4b-it"
    max_seq_length: int = 2048  # notebook: max_seq_length = 2048; longer conversations are dropped (long_conversations)
    load_in_4bit: bool = True  # notebook: load_in_4bit = True ("4 bit quantization to reduce memory")
    finetune_vision_layers: bool = False  # notebook: finetune_vision_layers = False ("Turn off for just text!")
    finetune_language_layers: bool = True  # notebook: finetune_language_layers = True ("Should leave on!")
    finetune_attention_modules: bool = True  # notebook: finetune_attention_modules = True (q, k, v, o)
    finetune_mlp_modules: bool = True  # notebook: finetune_mlp_modules = True (gate, up, down; "leave on always")
    lora_r: int = 8  # notebook: r = 8 ("Larger = higher accuracy, but might overfit")
    lora_alpha: int = 8  # notebook: lora_alpha = 8 ("Recommended alpha == r at least")
    lora_dropout: float = 0.0  # notebook: lora_dropout = 0
    data: str = "mlabonne/FineTome-100k"  # notebook: load_dataset("mlabonne/FineTome-100k"), standardize_data_formats
    chat_template: str = "gemma-3"  # notebook: chat_template = "gemma-3"; no system role: system text opens user turn 1
    max_samples: int = 0  # notebook: load_dataset(..., split = "train"), every row (0: all)
    long_conversations: str = "drop"  # choice: drop, not truncate: a cut conversation loses its last <end_of_turn>
    eval_fraction: float = 0.01  # choice: the notebook evaluates nothing; 1% held out gives a loss to compare runs by
    per_device_train_batch_size: int = 2  # notebook: per_device_train_batch_size = 2
    gradient_accumulation_steps: int = 4  # notebook: gradient_accumulation_steps = 4 (effective batch 8)
    token_budget: str = "auto"  # choice: card|auto|N tokens a pass; auto: fewest passes a 24 GiB+ GPU holds, same rows
    learning_rate: float = 2e-4  # notebook: learning_rate = 2e-4 ("Reduce to 2e-5 for long training runs")
    warmup_steps: int = 5  # notebook: warmup_steps = 5
    lr_scheduler_type: str = "linear"  # notebook: lr_scheduler_type = "linear"
    max_steps: int = 30  # notebook: max_steps = 30 (a short demonstration: 240 conversations)
    optim: str = "adamw_8bit"  # notebook: optim = "adamw_8bit"
    weight_decay: float = 0.001  # notebook: weight_decay = 0.001
    per_device_eval_batch_size: int = 2  # choice: the training batch: evaluation needs no extra memory
    max_eval_samples: int = 200  # choice: a stable loss at a fraction of the training time
    sample_prompts: int = 3  # choice: held-out conversations answered after training, written to results.md
    max_new_tokens: int = 64  # notebook: max_new_tokens = 64 in its inference cells
    seed: int = 3407  # notebook: seed = 3407, random_state = 3407 (data order, LoRA init; here the split too)


SMOKE = dict(data=str(SAMPLE_DATA), max_seq_length=512, eval_fraction=0.2, gradient_accumulation_steps=1,
             warmup_steps=2, max_steps=8, learning_rate=2e-3, max_eval_samples=8, sample_prompts=2, max_new_tokens=16)


def main(argv=None):
    session = start(RECIPE, Config, argv, SMOKE)  # flags and inputs checked, GPUs joined, seed set, run folder opened
    cfg = session.cfg
    with session.folder:
        # 1. Load the 4-bit base model (--smoke: a tiny Gemma 3 text model) and the Gemma 3 chat template.
        model_name = base_model(session, "gemma-3", lambda: read_rows(cfg.data))
        model, tokenizer = load_model(model_name, cfg.max_seq_length, session.hardware.precision, cfg.load_in_4bit)
        tokenizer = set_chat_template(tokenizer, cfg.chat_template)

        # 2. LoRA chosen by layer family, as the notebook does: Unsloth keeps the vision tower out by its module names.
        model = FastModel.get_peft_model(
            model, finetune_vision_layers=cfg.finetune_vision_layers,
            finetune_language_layers=cfg.finetune_language_layers,
            finetune_attention_modules=cfg.finetune_attention_modules, finetune_mlp_modules=cfg.finetune_mlp_modules,
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
            use_gradient_checkpointing="unsloth", random_state=cfg.seed)

        # 3. Data: standardise to messages, drop what does not fit, hold out eval_fraction.
        train_rows, eval_rows, data = chat_data(cfg, tokenizer)

        # 4. Train with loss on the model's turns only (the notebook's train_on_responses_only).
        trainer = SFTTrainer(
            model=model, processing_class=tokenizer, train_dataset=conversation_dataset(train_rows),
            eval_dataset=conversation_dataset(eval_rows[:cfg.max_eval_samples]),
            args=trainer_arguments(session, SFTConfig))
        trainer = mask_to_assistant_turns(trainer, cfg.chat_template)
        if not session.train(trainer):
            return

        # 5. Evaluate once on the held-out conversations and answer a few of their prompts.
        final_eval = trainer.evaluate(metric_key_prefix="final")
        distributed.only_main_continues()
        samples = answer_prompts(model, tokenizer, eval_rows[:cfg.sample_prompts], cfg.max_new_tokens)

        # 6. Save the adapter, the run's record and results.md (last: it marks the run complete).
        print(f"done: eval loss {final_eval['final_loss']:.4f}; results in {session.folder.path}")
        session.finish(model, tokenizer, trainer, data, results_markdown(data, session.recorder, final_eval, samples),
                       final_eval_loss=final_eval["final_loss"])


def results_markdown(data, recorder, final_eval, samples) -> str:
    losses = [r["loss"] for r in recorder.records if "loss" in r]
    lines = [f"# {RECIPE}: Gemma-3-4B-it LoRA on {data['source']}", "",
             f"- data: {data['source']} - {data['report']}; train {data['train']:,}, eval {data['eval']:,}",
             f"- training loss: {losses[0]:.4f} at the first step, {losses[-1]:.4f} at the last",
             f"- eval loss after training: {final_eval['final_loss']:.4f}",
             throughput_line(recorder.summary()), "", "## Held-out prompts, answered by the trained model", ""]
    for question, answer in samples:
        lines += [f"**Prompt:** {question}", "", f"**Answer:** {answer or '(empty)'}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    run_main(main)
