"""GPU tests build random-init models of the cards' real shapes on the GPU (weights random: right for speed, memory
and pipeline checks, meaningless for quality) with a tokenizer trained on the spot."""
import unsloth  # noqa: F401  (before transformers, as in the recipes: the adapter reload then runs the fast path)

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from common.smoke import train_tokenizer

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


def build_model(shape: str, folder) -> str:
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


@pytest.fixture(scope="session")
def real_shape_model(tmp_path_factory):
    """real_shape_model('llama-3-8b') -> folder of a random-init model of that shape (built once per session)."""
    built = {}

    def get(shape: str) -> str:
        if shape not in built:
            built[shape] = build_model(shape, tmp_path_factory.mktemp(shape))
        return built[shape]
    return get
