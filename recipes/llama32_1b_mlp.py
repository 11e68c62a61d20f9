"""Llama-3.2-1B-Instruct, LoRA on the MLP only (attention frozen), on an organisation's own Q&A content.

Card: 4-bit Llama-3.2-1B-Instruct, LoRA r16/alpha16 on gate, up and down projections; an institute's own Q&A
(private: --data takes yours); 60 steps at 2e-4, loss on answers. Beyond the card: held-out questions answered
before and after training; a manifest check that only MLP modules carry adapters and attention stayed bit-identical.
Launch: ./run.sh llama32_1b_mlp --data my_qa.jsonl     offline check on CPU: ./run.sh llama32_1b_mlp --smoke
(run.sh exports PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, the card's expandable CUDA segments)
Several GPUs: ./run.sh llama32_1b_mlp --data my_qa.jsonl --gpus 2 (the card's effective batch of 8 kept: 4 accumulation
steps become 2 a GPU)
"""
import unsloth  # noqa: F401  (first: Unsloth patches transformers, TRL and PEFT on import)

import hashlib
from dataclasses import dataclass
from pathlib import Path

from peft.tuners.lora import LoraLayer
from safetensors.torch import save as safetensors_bytes
from transformers import set_seed
from trl import SFTConfig, SFTTrainer
from unsloth import FastLanguageModel

from common import distributed
from common.batching import check_token_budget, pass_budget, settle_batching, token_budget_batches
from common.callbacks import MetricsRecorder, StopOnRequest
from common.chat import conversation_dataset, generate_reply, mask_to_assistant_turns, set_chat_template
from common.config import parse
from common.data import prepare_chat_data, read_rows
from common.errors import UserError, run_main
from common.hardware import detect, precision_of, reset_peak_memory, training_precision_flags
from common.model import load_model
from common.outputs import RunFolder, manifest, optimizer_that_ran
from common.report import loggers, per_gpu, print_summary
from common.smoke import tiny_model

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
    cfg, run = parse(Config, argv, smoke=SMOKE)
    if not cfg.data:
        raise UserError(f"{RECIPE} trains on your own Q&A: give --data, e.g. --data my_qa.jsonl with rows like "
                        '{"question": "...", "answer": "..."} (the bundled sample: --data recipes/data/repo_qa_sample.jsonl)')
    distributed.start()  # under torchrun (--gpus N): one process a GPU, rank 0 writes the run folder
    hardware = detect(run.precision)
    accumulation = distributed.accumulation_per_rank(cfg.gradient_accumulation_steps, run.scale_batch)
    check_token_budget(cfg.token_budget, cfg.max_seq_length)
    set_seed(cfg.seed)
    folder = RunFolder.reopen(run.resume) if run.resume else RunFolder.create(RECIPE, run.output_dir)
    with folder:
        folder.write_config(cfg, run)
        print(f"run folder: {folder.path}  (gpu={hardware.gpu_name or 'none'}, precision={hardware.precision})")

        # 1. Load the 4-bit base model and the Llama 3.1 chat template; fingerprint attention as loaded.
        if run.smoke:
            with distributed.main_first():
                cfg.model_name = tiny_model("llama-3.1", read_rows(cfg.data), folder=folder.smoke_base)
        model, tokenizer = load_model(cfg.model_name, cfg.max_seq_length, hardware.precision, cfg.load_in_4bit)
        tokenizer = set_chat_template(tokenizer, cfg.chat_template)
        attention_before = attention_fingerprints(model)

        # 2. LoRA adapters on the MLP projections only; Unsloth's gradient checkpointing offloads activations.
        model = FastLanguageModel.get_peft_model(
            model, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
            target_modules=list(cfg.target_modules), use_gradient_checkpointing="unsloth", random_state=cfg.seed)

        # 3. Data: standardise Q&A rows to messages with the domain's system prompt; hold a few questions out.
        train_rows, held_out, data = domain_conversations(cfg, tokenizer)
        questions = [question_and_reference(messages) for messages in held_out]
        print(f"data: {data['report']}; train {data['train']:,}, held out {data['eval']:,}")

        # 4. Train with loss on answers only; the held-out questions give a loss before and after training. A step's
        #    8 rows run as passes of at most --token-budget tokens: short ones share a pass (common/batching.py); with N
        #    GPUs each takes 8 / N of them.
        stop = StopOnRequest(run.stop_after_step)  # --stop-after-step, or SIGTERM / Ctrl-C: a checkpoint, then STOPPED
        budget = pass_budget(cfg.token_budget, model, cfg.per_device_train_batch_size, accumulation,
                             cfg.max_seq_length, hardware.precision)
        with token_budget_batches(cfg.per_device_train_batch_size, accumulation, budget["tokens_a_pass"]) as batches:
            trainer = SFTTrainer(
                model=model,
                processing_class=tokenizer,
                train_dataset=conversation_dataset(train_rows),
                eval_dataset=conversation_dataset(held_out),
                callbacks=[stop],
                args=SFTConfig(
                    output_dir=str(folder.checkpoints),
                    max_length=cfg.max_seq_length,
                    **batches,
                    per_device_eval_batch_size=cfg.per_device_train_batch_size,
                    learning_rate=cfg.learning_rate,
                    warmup_steps=cfg.warmup_steps,
                    lr_scheduler_type=cfg.lr_scheduler_type,
                    max_steps=cfg.max_steps,
                    optim=cfg.optim,
                    weight_decay=cfg.weight_decay,
                    eval_strategy="no",  # choice: a 60-step run; the held-out loss is taken before and after instead
                    save_strategy="steps",
                    save_steps=cfg.save_steps,
                    save_total_limit=1,  # the latest is all --resume needs
                    logging_steps=1,
                    seed=cfg.seed,
                    data_seed=cfg.seed,
                    report_to=loggers(run.report_to, folder.path / "tensorboard"),
                    **training_precision_flags(hardware.precision),
                ),
            )
        trainer = mask_to_assistant_turns(trainer, cfg.chat_template)
        batching = settle_batching(trainer, cfg.per_device_train_batch_size, accumulation)
        # LoRA's B matrices start at zero, so before training the adapted model answers exactly as the base model.
        loss_before = trainer.evaluate(metric_key_prefix="before")["before_loss"]
        answers_before = answer(model, tokenizer, questions, cfg.max_new_tokens)
        FastLanguageModel.for_training(model)
        # metrics.jsonl logs training from here on; a resumed run continues the lines kept up to its checkpoint.
        recorder = MetricsRecorder(folder.metrics)
        trainer.add_callback(recorder)
        recorder.count_tokens_of(trainer)
        reset_peak_memory()
        trainer.train(resume_from_checkpoint=folder.last_checkpoint() if run.resume else None)
        if trainer.state.global_step < cfg.max_steps or stop.signal:
            folder.mark_stopped(trainer.state.global_step, RECIPE, stop.signal)
            return

        # 5. Evaluate: held-out loss and answers after training; adapters only on the MLP; attention bit-identical.
        loss_after = trainer.evaluate(metric_key_prefix="after")["after_loss"]
        distributed.only_main_continues()
        answers_after = answer(model, tokenizer, questions, cfg.max_new_tokens)
        check = mlp_only_check(model, attention_before)
        print(f"check: {len(check['lora_modules'])} LoRA modules, only on MLP: {check['lora_only_on_mlp']}; "
              f"{check['attention_weights_checked']} attention weights, bit-identical: {check['attention_frozen']}")

        # 6. Save the adapter, the manifest and the human summary (results.md last: it marks the run complete).
        folder.save_adapter(model, tokenizer)
        throughput = recorder.summary()
        samples = [(prompt[-1]["content"], reference, before, after)
                   for (prompt, reference), before, after in zip(questions, answers_before, answers_after)]
        folder.write_json("manifest.json", manifest(
            RECIPE, hardware, cfg.seed, data, precision_of(model), optimizer=optimizer_that_ran(trainer),
            batching=batching, token_budget=budget,
            batch=distributed.batch_layout(cfg.per_device_train_batch_size, accumulation), held_out_loss_before=loss_before, held_out_loss_after=loss_after,
            held_out_questions=[s[0] for s in samples], **check, **throughput))
        folder.write_results(results_markdown(data, recorder.records, (loss_before, loss_after), check, throughput,
                                              samples), loss_curves={"": recorder.records})
        print(f"done: held-out loss {loss_before:.4f} -> {loss_after:.4f}; results in {folder.path}")
        print_summary(RECIPE, folder.path, throughput, recorder.records)


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


def question_and_reference(messages: list[dict]) -> tuple[list[dict], str]:
    """The conversation up to its first answer (system prompt and question), and that answer."""
    first_answer = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:first_answer], messages[first_answer]["content"]


def answer(model, tokenizer, questions: list[tuple[list[dict], str]], max_new_tokens: int) -> list[str]:
    FastLanguageModel.for_inference(model)
    return [generate_reply(model, tokenizer, prompt, max_new_tokens) for prompt, _ in questions]


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


def results_markdown(data, records, held_out_losses, check, throughput, samples) -> str:
    losses = [r["loss"] for r in records if "loss" in r]
    only_mlp = "yes" if check["lora_only_on_mlp"] else "NO"
    frozen = "yes" if check["attention_frozen"] else "NO, changed: " + ", ".join(check["attention_weights_changed"])
    lines = [f"# {RECIPE}: Llama-3.2-1B-Instruct, LoRA on the MLP only", "",
             f"- data: {data['source']} - {data['report']}; train {data['train']:,}, held out {data['eval']:,}",
             f"- training loss: {losses[0]:.4f} at the first step, {losses[-1]:.4f} at the last",
             "- held-out answer loss: {:.4f} before training, {:.4f} after".format(*held_out_losses),
             f"- LoRA adapters on {len(check['lora_modules'])} modules, all MLP: {only_mlp}; "
             f"{check['attention_weights_checked']} attention weights bit-identical after training: {frozen}",
             f"- median step time {fmt(throughput['median_step_time_s'], 's')}, "
             f"{fmt(throughput['tokens_per_s'], ' tokens/s')}, "
             f"peak GPU memory {fmt(throughput['peak_gpu_memory_gib'], ' GiB')}{per_gpu(throughput)}",
             "",
             "## Held-out questions, answered before and after fine-tuning", "",
             "| question | reference answer | before | after |", "|---|---|---|---|"]
    for row in samples:
        lines.append("| " + " | ".join(cell(text) for text in row) + " |")
    return "\n".join(lines)


def cell(text: str) -> str:
    return (text or "(empty)").replace("|", "\\|").replace("\n", "<br>")


def fmt(value, unit: str) -> str:
    return "n/a" if value is None else f"{value:,.2f}{unit}"


if __name__ == "__main__":
    run_main(main)
