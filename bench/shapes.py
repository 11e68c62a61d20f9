"""Random-init models of the cards' real shapes, each with a tokenizer trained on the spot: right for speed, memory and
pipeline checks, meaningless for quality. The benchmark measures on them and the GPU tests train on them.

Importing this module loads neither torch nor transformers, so it works on a machine without a GPU and leaves the
caller free to import Unsloth before transformers, as the recipes do; a model is built only when asked for."""
import gc
import shutil
import time
from pathlib import Path

WORDS = ("the a model learns data tweet good bad happy sad neutral positive negative train loss rank adapter "
         "quantize memory fast slow gpu token question answer recipe flag output").split()
# hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings: from each model's published config.
LLAMA_SHAPES = {
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 128256, True),
    "tinyllama-1.1b": (2048, 5632, 22, 32, 4, 32000, False),
    "llama-3-8b": (4096, 14336, 32, 32, 8, 128256, False),
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128256, False),
}
FAMILY = {"llama-3.2-1b": "llama-3.1", "tinyllama-1.1b": "zephyr", "llama-3-8b": "llama-3", "llama-3.1-8b": "llama-3.1",
          "gpt2-medium": "gpt2"}
# Llama-3.1-8B has Llama-3-8B's shape and special tokens (FAMILY: the same tokenizer): one 16 GB build serves both.
BUILD_AS = {"llama-3.1-8b": "llama-3-8b"}
# The Llama cards load Unsloth's pre-quantized bnb-4bit checkpoints: these builds are saved so once, and every load then
# reads NF4 weights, quicker than quantizing 16 GB each time. TinyLlama's card quantizes at load; GPT-2's study needs
# the 16-bit base for its baseline side.
PREQUANTIZED = {"llama-3-8b", "llama-3.2-1b"}


def build_model(shape: str, folder) -> str:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    from common.smoke import train_tokenizer
    corpus = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(40)) for i in range(2000)]
    tokenizer = train_tokenizer(corpus, FAMILY[shape], vocab_size=4000)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if shape == "gpt2-medium":
        config = GPT2Config(n_embd=1024, n_layer=24, n_head=16, vocab_size=50257, n_positions=1024, **ids)
        model_class = GPT2LMHeadModel
    else:
        hidden, intermediate, layers, heads, kv_heads, vocab, tied = LLAMA_SHAPES[shape]
        config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                             max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                             tie_word_embeddings=tied, **ids)
        model_class = LlamaForCausalLM
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = model_class(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return str(folder)


def prepared_model(shape: str, models: Path, build=build_model) -> str:
    """models/<shape>: the shape built once (a BUILT file marks a finished build, so a later run reuses it), saved in
    NF4 instead for PREQUANTIZED shapes; a BUILD_AS shape reuses its twin's build."""
    shape = BUILD_AS.get(shape, shape)
    folder, quantized = models / shape, models / f"{shape}-bnb-4bit"
    if (quantized / "BUILT").exists():
        return str(quantized)
    if not (folder / "BUILT").exists():
        started = time.perf_counter()
        folder.mkdir(parents=True, exist_ok=True)
        build(shape, folder)
        (folder / "BUILT").write_text(f"{shape}\n")
        print(f"built {shape} in {time.perf_counter() - started:.0f} s: {folder}", flush=True)
    if shape in PREQUANTIZED:
        started = time.perf_counter()
        save_quantized(folder, quantized)
        shutil.rmtree(folder)
        print(f"saved {shape} in NF4 in {time.perf_counter() - started:.0f} s: {quantized}", flush=True)
        folder = quantized
    release_gpu_memory()
    return str(folder)


def save_quantized(source: Path, target: Path):
    """The build in NF4 with double quantization and bf16 compute, as Unsloth's bnb-4bit checkpoints are saved."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=quantization, dtype=torch.bfloat16,
                                                 device_map={"": 0} if torch.cuda.is_available() else None)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    (target / "BUILT").write_text(f"{source.name} in NF4\n")


def release_gpu_memory():
    """Nothing of a finished model may stay on the GPU for the next one."""
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
