"""Llama-3.2-1B-Instruct, LoRA on the MLP only (attention frozen), on an organisation's own Q&A content.

Card: 4-bit Llama-3.2-1B-Instruct, LoRA r16/alpha16 on gate, up and down projections; an institute's own Q&A
(private: --data takes yours); 60 steps at 2e-4, loss on answers. Beyond the card: held-out questions answered
before and after training; a manifest check that only MLP modules carry adapters and attention stayed bit-identical.
Launch: ./run.sh llama32_1b_mlp --data my_qa.jsonl     offline check on CPU: ./run.sh llama32_1b_mlp --smoke
Several GPUs: ./run.sh llama32_1b_mlp --data my_qa.jsonl --gpus 2 (the card's effective batch of 8 kept: 4 accumulation
steps become 2 a GPU)
"""
import os

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # card: expandable CUDA segments
import unsloth  # noqa: E402, F401  (first of the libraries: Unsloth patches transformers, TRL and PEFT on import)

import hashlib  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

from peft.tuners.lora import LoraLayer  # noqa: E402
from safetensors.torch import save as safetensors_bytes  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402
from unsloth import FastLanguageModel  # noqa: E402

from common import distributed  # noqa: E402
from common.chat import conversation_dataset, mask_to_assistant_turns, set_chat_template  # noqa: E402
from common.data import prepare_chat_data, read_rows  # noqa: E402
from common.errors import UserError, run_main  # noqa: E402
from common.model import load_model  # noqa: E402
from common.report import throughput_line  # noqa: E402
from common.session import answer_prompts, base_model, start, trainer_arguments  # noqa: E402

RECIPE = Path(__file__).stem  # the file's name: a copied recipe is its own recipe, with its own run folders
SAMPLE_DATA = Path(__file__).parent / "data" / "repo_qa_sample.jsonl"
MLP = ("gate_proj", "up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class Config:
    """Llama-3.2-1B-Instruct, MLP-only LoRA for domain Q&A."""
    model_name: str = "unsloth/Llama-3.2-1B-Instruct-bnb-4bit"  # the card's checkpoint, pre-quantized by Unsloth
    load_in_4bit: bool = True  # card: 4-bit bitsandbytes base (about 1.5 GiB while training)
    max_seq_length: int = 2048  # card: longer Q&A conversations are dropped, not truncated
    lora_r: int = 16  # card: rank 16 on the three MLP projections
    lora_alpha: int = 16  # card: alpha 16, equal to the rank (scale 1)
    lora_dropout: float = 0.0  # card: 0 (also lets Unsloth use its fused LoRA kernels)
    target_modules: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")  # card: MLP only, attention frozen
    data: str = ""  # required: the card's data is private; your question/answer, instruction/output or messages file
    system_prompt: str = ""  # choice: none unless given (names your domain); a row's own "system" field comes first
    chat_template: str = "llama-3.1"  # choice: the Llama 3.1 template Llama-3.2-1B-Instruct was tuned with
    held_out_questions: int = 5  # seeded, never trained on: answered before and after training in results.md
    per_device_train_batch_size: int = 2  # card: 2 rows a step
    gradient_accumulation_steps: int = 4  # card: effective batch 8
    token_budget: str = "auto"  # choice: card|auto|N tokens a pass; auto: fewest passes a 24 GiB+ GPU holds, same rows
    learning_rate: float = 2e-4  # card: 2e-4
    warmup_steps: int = 5  # card: 5 steps of linear warmup
    lr_scheduler_type: str = "linear"  # card: linear decay to zero at max_steps
    max_steps: int = 60  # card: 60 optimizer steps (480 conversations seen)
    optim: str = "adamw_8bit"  # card: 8-bit AdamW states (bitsandbytes) save memory
    weight_decay: float = 0.01  # card: 0.01
    save_steps: int = 20  # a checkpoint every 20 steps, to --resume an interrupted run
    max_new_tokens: int = 128  # length cap for the held-out answers
    seed: int = 3407  # Unsloth's customary seed: held-out split, shuffling, LoRA init


SMOKE = dict(data=str(SAMPLE_DATA), system_prompt="You answer questions about the fine-tuning recipes repository.",
             gradient_accumulation_steps=1, warmup_steps=2, max_steps=12, learning_rate=2e-2, save_steps=6,
             held_out_questions=3, max_new_tokens=16)


def main(argv=None):
    session = start(RECIPE, Config, argv, SMOKE, checks=[needs_data])  # inputs checked, run folder opened
    cfg = session.cfg
    with session.folder:
        # 1. Load the 4-bit base model and the Llama 3.1 chat template; fingerprint attention as loaded.
        model_name = base_model(session, "llama-3.1", lambda: read_rows(cfg.data))
        model, tokenizer = load_model(model_name, cfg.max_seq_length, session.hardware.precision, cfg.load_in_4bit,
                                      target_modules=cfg.target_modules)
        tokenizer = set_chat_template(tokenizer, cfg.chat_template)
        attention_before = attention_fingerprints(model)

        # 2. LoRA adapters on the MLP projections only; Unsloth's gradient checkpointing offloads activations.
        model = FastLanguageModel.get_peft_model(
            model, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
            target_modules=list(cfg.target_modules), use_gradient_checkpointing="unsloth", random_state=cfg.seed)

        # 3. Data: standardise Q&A rows to messages with the domain's system prompt; hold a few questions out.
        train_rows, held_out, data = domain_conversations(cfg, tokenizer)
        print(f"data: {data['report']}; train {data['train']:,}, held out {data['eval']:,}")

        # 4. Train with loss on answers only; the held-out questions give a loss and answers before and after.
        trainer = SFTTrainer(
            model=model, processing_class=tokenizer, train_dataset=conversation_dataset(train_rows),
            eval_dataset=conversation_dataset(held_out),
            args=trainer_arguments(session, SFTConfig, per_device_eval_batch_size=cfg.per_device_train_batch_size,
                                   eval_strategy="no",  # choice: a 60-step run; held-out loss before and after instead
                                   save_total_limit=1))  # the latest checkpoint is all --resume needs
        trainer = mask_to_assistant_turns(trainer, cfg.chat_template)
        # LoRA's B matrices start at zero, so before training the adapted model answers exactly as the base model.
        loss_before = trainer.evaluate(metric_key_prefix="before")["before_loss"]
        answers_before = answer_prompts(model, tokenizer, held_out, cfg.max_new_tokens)
        FastLanguageModel.for_training(model)
        if not session.train(trainer):
            return

        # 5. Evaluate: held-out loss and answers after training; adapters only on the MLP; attention bit-identical.
        loss_after = trainer.evaluate(metric_key_prefix="after")["after_loss"]
        distributed.only_main_continues()
        answers_after = answer_prompts(model, tokenizer, held_out, cfg.max_new_tokens)
        check = mlp_only_check(model, attention_before)
        print(f"check: {len(check['lora_modules'])} LoRA modules, only on MLP: {check['lora_only_on_mlp']}; "
              f"{check['attention_weights_checked']} attention weights, bit-identical: {check['attention_frozen']}")

        # 6. Save the adapter, the run's record and results.md (last: it marks the run complete).
        samples = [(question, reference(messages), before, after) for messages, (question, before), (_, after)
                   in zip(held_out, answers_before, answers_after)]
        print(f"done: held-out loss {loss_before:.4f} -> {loss_after:.4f}; results in {session.folder.path}")
        session.finish(model, tokenizer, trainer, data,
                       results_markdown(data, session.recorder, (loss_before, loss_after), check, samples),
                       held_out_loss_before=loss_before, held_out_loss_after=loss_after,
                       held_out_questions=[s[0] for s in samples], **check)


def needs_data(cfg, run):
    if not cfg.data:
        raise UserError(f"{RECIPE} trains on your own Q&A: give --data, e.g. --data my_qa.jsonl with rows like "
                        '{"question": "...", "answer": "..."} (the bundled sample: --data recipes/data/repo_qa_sample.jsonl)')


def domain_conversations(cfg, tokenizer):
    """The Q&A rows as chat messages, shuffled with the seed; the last `held_out_questions` are kept out of training."""
    conversations, _, data = prepare_chat_data(cfg.data, tokenizer, cfg.max_seq_length, max_samples=0,
                                               eval_fraction=0.0, seed=cfg.seed, system_prompt=cfg.system_prompt)
    if not 0 < cfg.held_out_questions < len(conversations):
        raise UserError(f"--held-out-questions {cfg.held_out_questions}: use 1 to {len(conversations) - 1} "
                        f"for {cfg.data} ({data['report']})")
    train, held_out = conversations[:-cfg.held_out_questions], conversations[-cfg.held_out_questions:]
    data.update(train=len(train), eval=len(held_out))
    return train, held_out, data


def reference(messages: list[dict]) -> str:
    """The data's own answer to a held-out question: its first assistant turn."""
    return next(m["content"] for m in messages if m["role"] == "assistant")


def attention_fingerprints(model) -> dict[str, str]:
    """SHA-256 of each attention projection's saved state, keyed by its path in the base model. The saved state (4-bit:
    packed weight and quantization constants) is the canonical form; bitsandbytes may repack weights in CPU memory."""
    return {name.removeprefix("base_model.model."): hashlib.sha256(safetensors_bytes(module.state_dict())).hexdigest()
            for name, module in model.named_modules() if name.endswith(ATTENTION)}


def mlp_only_check(model, attention_before: dict[str, str]) -> dict:
    """The modules carrying LoRA adapters (the card: MLP only) and the attention weights that differ from their
    fingerprints taken at load (the card: none)."""
    adapters = sorted(name.removeprefix("base_model.model.") for name, module in model.named_modules()
                      if isinstance(module, LoraLayer))
    attention_after = attention_fingerprints(model)
    changed = sorted(name for name, digest in attention_before.items() if attention_after.get(name) != digest)
    return {"lora_modules": adapters, "lora_only_on_mlp": bool(adapters) and all(n.endswith(MLP) for n in adapters),
            "attention_weights_checked": len(attention_before), "attention_weights_changed": changed,
            "attention_frozen": bool(attention_before) and not changed}


def results_markdown(data, recorder, held_out_losses, check, samples) -> str:
    losses = [r["loss"] for r in recorder.records if "loss" in r]
    only_mlp = "yes" if check["lora_only_on_mlp"] else "NO"
    frozen = "yes" if check["attention_frozen"] else "NO, changed: " + ", ".join(check["attention_weights_changed"])
    lines = [f"# {RECIPE}: Llama-3.2-1B-Instruct, LoRA on the MLP only", "",
             f"- data: {data['source']} - {data['report']}; train {data['train']:,}, held out {data['eval']:,}",
             f"- training loss: {losses[0]:.4f} at the first step, {losses[-1]:.4f} at the last",
             "- held-out answer loss: {:.4f} before training, {:.4f} after".format(*held_out_losses),
             f"- LoRA adapters on {len(check['lora_modules'])} modules, all MLP: {only_mlp}; "
             f"{check['attention_weights_checked']} attention weights bit-identical after training: {frozen}",
             throughput_line(recorder.summary()), "",
             "## Held-out questions, answered before and after fine-tuning", "",
             "| question | reference answer | before | after |", "|---|---|---|---|"]
    for row in samples:
        lines.append("| " + " | ".join(cell(text) for text in row) + " |")
    return "\n".join(lines)


def cell(text: str) -> str:
    return (text or "(empty)").replace("|", "\\|").replace("\n", "<br>")


if __name__ == "__main__":
    run_main(main)
