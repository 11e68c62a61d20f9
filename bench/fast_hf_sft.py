"""The strongest plain peer: transformers + PEFT + bitsandbytes with Liger kernels and padding-free batches.

bench/plain_sft.py's script (NF4 base with double quantization, PEFT LoRA, gradient checkpointing as the recipe uses
it, transformers' Trainer with the recipe's optimiser, the same rows and steps) with what a careful transformers user
adds to it:
- Liger's Triton kernels for Llama (liger-kernel's apply_liger_kernel_to_llama: RoPE, RMSNorm, SwiGLU and the fused
  linear cross-entropy, which never materialises the logits), applied before the model is built. Not applied to GPT-2:
  liger-kernel 0.8.5 has no GPT-2 patch (no "gpt2" in its MODEL_TYPE_TO_APPLY_LIGER_FN). Not applied without a CUDA
  GPU (the benchmark's --smoke on CPU): Triton kernels need CUDA. result.json lists the kernels applied, and says why
  where the list is empty.
- Padding-free batches: transformers' DataCollatorWithFlattening concatenates a batch's rows into one [1, T] row with
  position_ids restarting at 0 for each row, and no padding.
- SDPA attention. With position_ids that restart and no attention mask, transformers 5.17 finds the rows
  (masking_utils.find_packed_sequence_indices) and builds a block-diagonal causal mask, so rows do not attend to one
  another; tests/test_bench.py checks that a packed row's logits are its logits alone.
Timed and counted by the recipes' own MetricsRecorder, as every other side: without an attention mask it counts
input_ids.numel(), every one a real token here.

Needs liger-kernel on a GPU machine: `pip install -r bench/requirements.txt`. Same arguments as bench/plain_sft.py;
each --data file trains a fresh adapter on the one loaded base and writes <output-dir>/<file stem>/metrics.jsonl and
result.json.

  python -m bench.fast_hf_sft --model-name DIR --data fixed.jsonl chat.jsonl --output-dir DIR --max-seq-length 1024 ...
"""
import gc
import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig,
                          DataCollatorWithFlattening, Trainer, TrainingArguments)

from bench.plain_sft import parse_args
from common.callbacks import MetricsRecorder
from common.hardware import reset_peak_memory, torch_dtype, training_precision_flags
from common.outputs import optimizer_that_ran

ATTENTION = "sdpa"  # packed rows get a block-diagonal causal mask from their position_ids (module docstring)
LLAMA_KERNELS = ("rope", "rms_norm", "swiglu", "fused_linear_cross_entropy")  # apply_liger_kernel_to_llama's switches


def apply_liger(model_type: str) -> tuple[list[str], str | None]:
    """Patch transformers' model classes with Liger's kernels, before the model is built; returns the kernels applied
    and, where none were, why."""
    if model_type != "llama":  # the benchmark's other shape is GPT-2: liger-kernel 0.8.5 has no patch for it
        return [], f"liger-kernel has no patch for {model_type} models"
    if not torch.cuda.is_available():
        return [], "no GPU: Liger's Triton kernels need CUDA"
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except ImportError:
        raise SystemExit("error: liger-kernel is not installed: pip install -r bench/requirements.txt") from None
    apply_liger_kernel_to_llama(**{kernel: True for kernel in LLAMA_KERNELS})
    return list(LLAMA_KERNELS), None


def padding_free_collator() -> DataCollatorWithFlattening:
    """A batch's rows as one row, position_ids restarting per row; labels -100 at each row's first token, so no row
    learns to predict the next row's start."""
    return DataCollatorWithFlattening()


def main(argv=None):
    args = parse_args(argv, description=__doc__.splitlines()[0])
    dtype = torch_dtype(args.precision)
    liger, liger_reason = apply_liger(AutoConfig.from_pretrained(args.model_name).model_type)
    print(f"Liger kernels: {', '.join(liger) if liger else f'none ({liger_reason})'}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype) if args.load_in_4bit else None
    model = AutoModelForCausalLM.from_pretrained(args.model_name, quantization_config=quantization, dtype=dtype,
                                                 attn_implementation=ATTENTION,
                                                 device_map={"": 0} if torch.cuda.is_available() else None)
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, bias="none",
                      target_modules=args.target_modules.split(","), task_type="CAUSAL_LM",
                      fan_in_fan_out=model.config.model_type == "gpt2")  # GPT-2's Conv1D stores its weight transposed
    collator = padding_free_collator()
    for data in map(Path, args.data):
        texts = [json.loads(line)["text"] for line in data.read_text().splitlines() if line.strip()]
        rows = [{"input_ids": ids} for ids in tokenizer(texts, add_special_tokens=False, truncation=True,
                                                        max_length=args.max_seq_length)["input_ids"]]
        out = Path(args.output_dir) / data.stem
        out.mkdir(parents=True, exist_ok=True)
        peft_model = get_peft_model(model, lora)
        recorder = MetricsRecorder(out / "metrics.jsonl")
        trainer = Trainer(
            model=peft_model,
            train_dataset=rows,
            data_collator=collator,
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
                use_cache=False,  # a KV cache turns transformers' packed-row mask off: rows would attend to each other
                logging_steps=1,
                save_strategy="no",
                seed=args.seed,
                report_to="none",
                **training_precision_flags(args.precision),
            ),
        )
        recorder.count_tokens_of(trainer)
        reset_peak_memory()
        trainer.train()
        (out / "result.json").write_text(json.dumps({
            "data": str(data), "rows": len(rows), "collator": type(collator).__name__,
            "attn_implementation": peft_model.config._attn_implementation, "liger": liger,
            "liger_reason": liger_reason, "optimizer": optimizer_that_ran(trainer),
            "trainable_parameters": peft_model.get_nb_trainable_parameters()[0],
            **recorder.summary()}, indent=2) + "\n")
        print(f"fast {data.stem}: {json.dumps(recorder.summary())}", flush=True)
        model = peft_model.unload()  # the base without this adapter, for the next file's fresh one
        del trainer, peft_model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
