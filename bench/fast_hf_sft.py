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
import torch
from transformers import AutoConfig, DataCollatorWithFlattening

from bench.plain_sft import load_base, parse_args, train_each_file

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
    liger, liger_reason = apply_liger(AutoConfig.from_pretrained(args.model_name).model_type)
    print(f"Liger kernels: {', '.join(liger) if liger else f'none ({liger_reason})'}", flush=True)
    tokenizer, model, lora = load_base(args, attn_implementation=ATTENTION)
    collator = padding_free_collator()
    fields = {"collator": type(collator).__name__, "attn_implementation": model.config._attn_implementation,
              "liger": liger, "liger_reason": liger_reason}
    train_each_file(args, "fast", tokenizer, model, lora, lambda: (collator, lambda: fields),
                    use_cache=False)  # a KV cache turns transformers' packed-row mask off: rows would attend to each other


if __name__ == "__main__":
    main()
