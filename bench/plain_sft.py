"""The plain script the recipes are measured against: transformers + PEFT + bitsandbytes, written the usual way.

An NF4 base with double quantization and bf16 compute (BitsAndBytesConfig), a PEFT LoRA adapter, gradient checkpointing,
transformers' Trainer with the recipe's optimiser (adamw_8bit: bitsandbytes' 8-bit AdamW) and every batch padded to its
longest row. No Unsloth, no TRL. Timed and counted by the recipes' own MetricsRecorder: both sides are measured alike.
No prepare_model_for_kbit_training: its fp32 copies of the embeddings and lm_head would cost this side memory and time
that the recipes do not pay, and flatter the ratios.

Each --data file (rows of {"text": the rendered training text}) is trained in turn on the one loaded base, each with a
fresh adapter, and writes <output-dir>/<file stem>/metrics.jsonl and result.json.

  python -m bench.plain_sft --model-name DIR --data fixed.jsonl chat.jsonl --output-dir DIR --max-seq-length 1024 ...
"""
import argparse
import gc
import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, Trainer, TrainingArguments

from common.callbacks import MetricsRecorder
from common.hardware import reset_peak_memory, torch_dtype, training_precision_flags
from common.outputs import optimizer_that_ran


def parse_args(argv=None, description: str = __doc__.splitlines()[0]):
    """The settings both reference scripts take (bench/unsloth_sft.py reads the same ones)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-seq-length", type=int, required=True)
    parser.add_argument("--per-device-train-batch-size", type=int, required=True)
    parser.add_argument("--gradient-accumulation-steps", type=int, required=True)
    parser.add_argument("--max-steps", type=int, required=True)
    parser.add_argument("--lora-r", type=int, required=True)
    parser.add_argument("--lora-alpha", type=int, required=True)
    parser.add_argument("--lora-dropout", type=float, required=True)
    parser.add_argument("--target-modules", required=True, help="comma-separated module names")
    parser.add_argument("--optim", required=True, help="a transformers optimiser name, e.g. adamw_8bit")
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), required=True)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--seed", type=int, default=3407)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    tokenizer, model, lora = load_base(args)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def padded_batches():
        padding = PaddingCount()
        return padding.counting(pad_to_longest(pad_id)), lambda: {"padding_fraction": padding.fraction()}
    train_each_file(args, "plain", tokenizer, model, lora, padded_batches)


def load_base(args, **from_pretrained):
    """The tokenizer, the base (NF4 with double quantization and the run's compute dtype, or 16-bit) on the GPU, and
    the LoRA config: shared with bench/fast_hf_sft.py, which passes its attention implementation."""
    dtype = torch_dtype(args.precision)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype) if args.load_in_4bit else None
    model = AutoModelForCausalLM.from_pretrained(args.model_name, quantization_config=quantization, dtype=dtype,
                                                 device_map={"": 0} if torch.cuda.is_available() else None,
                                                 **from_pretrained)
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, bias="none",
                      target_modules=args.target_modules.split(","), task_type="CAUSAL_LM",
                      fan_in_fan_out=model.config.model_type == "gpt2")  # GPT-2's Conv1D stores its weight transposed
    return tokenizer, model, lora


def train_each_file(args, side: str, tokenizer, model, lora, batches, **training_arguments):
    """Each --data file in turn on the one loaded base, each with a fresh adapter, optimiser and peak reading; writes
    <output-dir>/<file stem>/metrics.jsonl and result.json. `batches()` gives a file's data collator and a function
    returning the side's own result.json fields once it trained; `training_arguments` adds to TrainingArguments."""
    for data in map(Path, args.data):
        texts = [json.loads(line)["text"] for line in data.read_text().splitlines() if line.strip()]
        rows = [{"input_ids": ids} for ids in tokenizer(texts, add_special_tokens=False, truncation=True,
                                                        max_length=args.max_seq_length)["input_ids"]]
        out = Path(args.output_dir) / data.stem
        out.mkdir(parents=True, exist_ok=True)
        peft_model = get_peft_model(model, lora)
        recorder = MetricsRecorder(out / "metrics.jsonl")
        collate, side_fields = batches()
        trainer = Trainer(
            model=peft_model,
            train_dataset=rows,
            data_collator=collate,
            callbacks=[recorder],
            args=TrainingArguments(
                output_dir=str(out / "trainer"),
                per_device_train_batch_size=args.per_device_train_batch_size,
                gradient_accumulation_steps=args.gradient_accumulation_steps,
                max_steps=args.max_steps,
                learning_rate=args.learning_rate,
                optim=args.optim,
                gradient_checkpointing=args.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},  # PEFT's advice: frozen inputs need no grads
                logging_steps=1,
                save_strategy="no",
                seed=args.seed,
                report_to="none",
                **training_arguments,
                **training_precision_flags(args.precision),
            ),
        )
        recorder.count_tokens_of(trainer)
        reset_peak_memory()
        trainer.train()
        (out / "result.json").write_text(json.dumps({
            "data": str(data), "rows": len(rows), **side_fields(), "optimizer": optimizer_that_ran(trainer),
            "trainable_parameters": peft_model.get_nb_trainable_parameters()[0],
            **recorder.summary()}, indent=2) + "\n")
        print(f"{side} {data.stem}: {json.dumps(recorder.summary())}", flush=True)
        model = peft_model.unload()  # the base without this adapter, for the next file's fresh one
        del trainer, peft_model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def pad_to_longest(pad_id: int):
    """Right-pad each batch to its longest row; padding is masked out of attention and loss."""
    def collate(features):
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), pad_id)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, feature in enumerate(features):
            ids[row, :len(feature["input_ids"])] = torch.tensor(feature["input_ids"])
            mask[row, :len(feature["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    return collate


class PaddingCount:
    """Share of the batches' token positions that are padding: what the plain script computes and throws away."""

    def __init__(self):
        self.positions = self.padding = 0

    def counting(self, collate):
        def counted(features):
            batch = collate(features)
            self.positions += batch["attention_mask"].numel()
            self.padding += int((batch["attention_mask"] == 0).sum())
            return batch
        return counted

    def fraction(self) -> float | None:
        return self.padding / self.positions if self.positions else None


if __name__ == "__main__":
    main()
