"""--smoke: a tiny random-init model of the card's architecture and a tokenizer trained on the spot from the sample
data, saved to a folder that FastLanguageModel.from_pretrained loads like any checkpoint. No hub access.

A recipe saves it inside its run folder (smoke-base/), where the adapter's config points: `./run.sh chat` and
`./run.sh export` then find the base model of a smoke run as they find a real one on the hub."""
import atexit
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, PreTrainedTokenizerFast)

# Special tokens of each family's real tokenizer, so the chat templates render and mask as they do on the real model.
SPECIAL_TOKENS = {  # family: (tokens, bos, eos, pad)
    "llama-3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                 "<|finetune_right_pad_id|>"], "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"),
    "zephyr": (["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"], "<s>", "</s>", "<unk>"),
    "gpt2": (["<|endoftext|>"], "<|endoftext|>", "<|endoftext|>", "<|endoftext|>"),
    # Gemma 3's first ids (pad 0, eos 1, bos 2, unk 3) and its turn tokens; its eos stays <eos>, a turn ends with
    # <end_of_turn> (Unsloth's gemma-3 template does not map one onto the other).
    "gemma-3": (["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<pad>"),
}
SPECIAL_TOKENS["llama-3.1"] = SPECIAL_TOKENS["llama-3"]


def train_tokenizer(corpus: list[str], family: str, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    tokens, bos, eos, pad = SPECIAL_TOKENS[family]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=tokens,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos, pad_token=pad)


def tiny_model(family: str, rows: list[dict], seed: int = 0, folder: Path | None = None) -> str:
    """Build and save a 2-layer, hidden-64 model (Llama; GPT-2 for 'gpt2', Gemma 3's text model for 'gemma-3') with a
    tokenizer trained on the text of `rows`; returns its folder: `folder` (kept as it is when a resumed run built it
    already) or a temporary one removed at exit."""
    if folder is not None and (Path(folder) / "config.json").is_file():
        return str(Path(folder).resolve())
    tokenizer = train_tokenizer(list(texts_in(rows)), family)
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=1024, **ids))
    elif family == "gemma-3":
        # One sliding-window layer and one global layer, as Gemma 3 interleaves them (5:1 on the real model); a window
        # of 64 tokens is shorter than most sample conversations, so the sliding mask is exercised.
        model = Gemma3ForCausalLM(Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                                   query_pre_attn_scalar=16, sliding_window=64,
                                                   layer_types=["sliding_attention", "full_attention"],
                                                   max_position_embeddings=4096, **ids))
    else:
        model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                             tie_word_embeddings=True, **ids))
    if folder is None:
        folder = tempfile.mkdtemp(prefix=f"smoke-{family}-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    folder = str(Path(folder).resolve())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def texts_in(value):
    """Every string inside nested rows, whatever their format."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from texts_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from texts_in(item)
