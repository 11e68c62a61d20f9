"""Raw Unsloth: the script of Unsloth's own notebooks, with none of this repository's code in its training path.

FastLanguageModel.from_pretrained (4-bit), FastLanguageModel.get_peft_model (Unsloth's gradient checkpointing), TRL's
SFTTrainer on the rendered text rows with Unsloth's defaults (it chooses padding-free batches itself), the recipe's
optimiser. The benchmark runs it next to each recipe, on the same rows and settings, so the table shows what the
recipe adds or costs over Unsloth on that machine, and how far raw Unsloth is from the plain script there. Timed and
counted by the recipes' own MetricsRecorder, as both other sides.

Each --data file (rows of {"text": the rendered training text}) loads the base afresh and trains its own adapter, and
writes <output-dir>/<file stem>/metrics.jsonl and result.json. Same arguments as bench/plain_sft.py.

  python -m bench.unsloth_sft --model-name DIR --data fixed.jsonl chat.jsonl --output-dir DIR --max-seq-length 1024 ...
"""
import unsloth  # noqa: F401  (first: Unsloth patches transformers, TRL and PEFT on import)

import gc
import json
from pathlib import Path

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer
from unsloth import FastLanguageModel

from bench.plain_sft import parse_args
from common.callbacks import MetricsRecorder
from common.hardware import reset_peak_memory, torch_dtype, training_precision_flags
from common.outputs import optimizer_that_ran


def main(argv=None):
    args = parse_args(argv, description=__doc__.splitlines()[0])
    for data in map(Path, args.data):
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=args.model_name, max_seq_length=args.max_seq_length, load_in_4bit=args.load_in_4bit,
            dtype=None if args.precision == "fp32" else torch_dtype(args.precision))
        model = FastLanguageModel.get_peft_model(
            model, r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, bias="none",
            target_modules=args.target_modules.split(","), random_state=args.seed,
            use_gradient_checkpointing="unsloth" if args.gradient_checkpointing else False)
        texts = [json.loads(line)["text"] for line in data.read_text().splitlines() if line.strip()]
        out = Path(args.output_dir) / data.stem
        out.mkdir(parents=True, exist_ok=True)
        recorder = MetricsRecorder(out / "metrics.jsonl")
        trainer = SFTTrainer(
            model=model,
            processing_class=tokenizer,
            train_dataset=Dataset.from_dict({"text": texts}),
            callbacks=[recorder],
            args=SFTConfig(
                output_dir=str(out / "trainer"),
                dataset_text_field="text",
                max_length=args.max_seq_length,
                per_device_train_batch_size=args.per_device_train_batch_size,
                gradient_accumulation_steps=args.gradient_accumulation_steps,
                max_steps=args.max_steps,
                learning_rate=args.learning_rate,
                optim=args.optim,
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
            "data": str(data), "rows": len(texts), "optimizer": optimizer_that_ran(trainer),
            **recorder.summary()}, indent=2) + "\n")
        print(f"raw unsloth {data.stem}: {json.dumps(recorder.summary())}", flush=True)
        del trainer, model, tokenizer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
