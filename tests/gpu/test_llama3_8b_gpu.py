"""llama3_8b through Unsloth: a random-init model of Llama-3-8B's exact shape, the card's batch, accumulation, sequence
length and LoRA settings, on the sample's chats plus multi-turn chats up to the card's 1,024 tokens (so passes of the
full 2 x 1,024 tokens occur); max steps and eval cadence scaled down; best checkpoint kept, adapter reloaded. A step's
2 x 8 rows reach the Trainer as one micro-batch of 16, which Unsloth runs as passes of at most 2 x 1,024 tokens.
Then what a user does next, on the T4 path (fp16 under 15 GiB): chat with the 4-bit adapter, merge it into 16-bit
weights, and export GGUF files that llama.cpp loads."""
import json
import time
from pathlib import Path

import pytest

from common.hardware import torch_dtype
from tests.conftest import read_jsonl
from tests.gpu.conftest import assert_reload_reproduces_training, long_tail_chat_data

SAMPLE = Path(__file__).resolve().parents[2] / "recipes" / "data" / "finetome_sample.jsonl"


@pytest.mark.gpu
def test_llama3_8b_real_shape_trains_evaluates_and_reloads(real_shape_model, run_recipe, logits_at_save, precision,
                                                           tmp_path):
    from transformers import AutoTokenizer
    from common.chat import set_chat_template
    base = real_shape_model("llama-3-8b")
    lengths = long_tail_chat_data(SAMPLE, set_chat_template(AutoTokenizer.from_pretrained(base), "llama-3"), 1024,
                                  tmp_path / "chats.jsonl")
    folder = run_recipe("llama3_8b", "--model-name", base, "--data", str(tmp_path / "chats.jsonl"),
                        "--max-samples", "0", "--max-steps", "10", "--eval-steps", "5", "--warmup-steps", "2",
                        "--max-eval-samples", "8", "--sample-prompts", "2", "--max-new-tokens", "16")
    manifest = json.loads((folder / "manifest.json").read_text())
    print(f"\nllama3_8b on {manifest['gpu']} ({manifest['precision']}): rows of {min(lengths)}-{max(lengths)} tokens; "
          f"median step {manifest['median_step_time_s']:.2f} s, {manifest['tokens_per_s']:,.0f} tokens/s, "
          f"peak {manifest['peak_gpu_memory_gib']:.2f} GiB, best step {manifest['best_step']}, "
          f"optimizer {manifest['optimizer']}")
    assert "8bit" in manifest["optimizer"] and manifest["batching"] == "token-budget"
    assert max(lengths) > 1024 - 256 and manifest["data"]["kept"] == len(lengths)
    evaluations = {r["step"]: r["eval_loss"] for r in read_jsonl(folder / "metrics.jsonl") if "eval_loss" in r}
    assert sorted(evaluations) == [5, 10] and manifest["best_step"] == min(evaluations, key=evaluations.get)
    state = json.loads((folder / "checkpoints" / "checkpoint-10" / "trainer_state.json").read_text())
    assert state["train_batch_size"] == 16

    from unsloth import FastLanguageModel
    model, _ = FastLanguageModel.from_pretrained(str(folder / "adapter"), max_seq_length=1024, load_in_4bit=True,
                                                 dtype=torch_dtype(precision))
    FastLanguageModel.for_inference(model)
    assert_reload_reproduces_training(model, logits_at_save[(folder / "adapter").resolve()])


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16"])  # the T4 path: the bf16 training is the test above
def test_llama3_8b_real_shape_chats_merges_and_exports_gguf(run_recipe, tmp_path, capsys):
    """Trained as a user with a 16-bit base trains (quantized to 4 bits at load): a 16-bit merge needs the base's 16-bit
    weights, which Unsloth reads from the base's folder or downloads for a pre-quantized hub checkpoint."""
    import shutil
    import llama_cpp
    from after_training import chat, export
    from after_training.trained_run import load_trained, open_run
    from tests.gpu.conftest import build_model, release_gpu_memory
    base = tmp_path / "llama-3-8b"
    build_model("llama-3-8b", base)
    release_gpu_memory()
    folder = run_recipe("llama3_8b", "--model-name", str(base), "--data", str(SAMPLE), "--max-samples", "0",
                        "--max-steps", "4", "--eval-steps", "4", "--warmup-steps", "1", "--max-eval-samples", "4",
                        "--sample-prompts", "1", "--max-new-tokens", "8")
    capsys.readouterr()
    started = time.perf_counter()
    chat.main([str(folder), "--prompt", "the model learns", "--max-new-tokens", "16"])
    # Random weights over Llama 3's 128,256 ids mostly pick ids past the 4,000-token tokenizer trained here, which decode
    # to nothing: the reply's text may be empty; that chat loads the run in 4 bits and generates is what is checked.
    reply = capsys.readouterr().out
    print(f"\nchat --prompt through the 4-bit adapter ({time.perf_counter() - started:.0f} s with loading): {reply!r}")
    release_gpu_memory()

    export.main([str(folder), "--format", "merged16"])
    print(capsys.readouterr().out)
    merged = folder / "export" / "merged16"
    size = sum(path.stat().st_size for path in merged.glob("*.safetensors")) / 2**30
    assert 14.5 < size < 15.5  # 8.03B parameters in 16 bits: 14.96 GiB
    model, _ = load_trained(open_run(str(folder)), "fp16")  # what the free-disk check counts on the 4-bit model
    counted = export.merged16_bytes(model) / 2**30
    del model
    release_gpu_memory()
    print(f"merged16: {size:.2f} GiB written, {counted:.2f} GiB counted from the 4-bit model before writing")
    assert 0.99 * size <= counted <= 1.01 * size
    shutil.rmtree(base)  # the machine's disk holds the merged weights, the f16 GGUF and two quantizations, not the base too
    release_gpu_memory()

    # The tokenizer trained here is unknown to llama.cpp: name the Llama 3 pre-tokenizer it splits like.
    export.main([str(folder), "--format", "gguf", "--quantization", "q4_k_m,q8_0", "--gguf-pre-tokenizer", "llama-bpe"])
    printed = capsys.readouterr().out
    print(printed)
    assert f"merged16: {merged} holds this adapter's export already" in printed  # no second merge
    gguf = {path.name: path.stat().st_size / 2**30 for path in (folder / "export" / "gguf").glob("*.gguf")}
    print("GGUF sizes: " + ", ".join(f"{name} {size:.2f} GiB" for name, size in sorted(gguf.items())))
    assert set(gguf) == {"llama3_8b-q4_k_m.gguf", "llama3_8b-q8_0.gguf"}
    assert 4.2 < gguf["llama3_8b-q4_k_m.gguf"] < 5.2 and 7.5 < gguf["llama3_8b-q8_0.gguf"] < 8.5
    model = llama_cpp.Llama(model_path=str(folder / "export" / "gguf" / "llama3_8b-q4_k_m.gguf"), n_ctx=256,
                            n_threads=16, verbose=False)
    try:
        tokens = [token for token, _ in zip(model.generate(model.tokenize(b"the model learns"), top_k=1, temp=0.0),
                                            range(8))]
    finally:
        model.close()
    assert len(tokens) == 8

    export.main([str(folder), "--format", "adapter"])
    print(capsys.readouterr().out)
    shared = folder / "export" / "adapter"
    assert (shared / "adapter_model.safetensors").read_bytes() == (folder / "adapter" / "adapter_model.safetensors").read_bytes()
    assert "library_name: peft" in (shared / "README.md").read_text()
