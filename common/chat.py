"""Chat templates, assistant-only loss and generation, wired through Unsloth and TRL rather than rewritten."""
from pathlib import Path

import torch
from datasets import Dataset
from unsloth import get_chat_template, train_on_responses_only

from common.errors import UserError

# The text that opens a user turn and an assistant turn in each template Unsloth renders: Unsloth's
# train_on_responses_only masks everything outside the assistant spans with them.
TURN_MARKERS = {
    "llama-3": ("<|start_header_id|>user<|end_header_id|>\n\n", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "llama-3.1": ("<|start_header_id|>user<|end_header_id|>\n\n", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "zephyr": ("<|user|>\n", "<|assistant|>\n"),
    "chatml": ("<|im_start|>user\n", "<|im_start|>assistant\n"),
    "alpaca": ("### Instruction:\n", "### Response:\n"),
    "gemma-3": ("<start_of_turn>user\n", "<start_of_turn>model\n"),
}
SENTENCEPIECE_SCRATCH = "_unsloth_sentencepiece_temp"  # Unsloth's scratch folder, relative to the working directory
# Tokens that end an assistant turn; generation stops at the first of them.
END_OF_TURN = ("<|eot_id|>", "<|end_of_text|>", "</s>", "<|endoftext|>", "<|im_end|>", "<end_of_turn>")


def set_chat_template(tokenizer, template: str):
    """The tokenizer with Unsloth's rendering of a named template (llama-3, llama-3.1, zephyr, chatml, ...)."""
    if template not in TURN_MARKERS:
        raise UserError(f"--chat-template {template}: not supported here; use one of {', '.join(TURN_MARKERS)}")
    leftover = Path(SENTENCEPIECE_SCRATCH)
    existed = leftover.exists()
    tokenizer = get_chat_template(tokenizer, chat_template=template)
    if not existed and leftover.is_dir() and not any(leftover.iterdir()):
        leftover.rmdir()  # unsloth 2026.10 leaves it empty in the working directory (a clone's root) when it maps tokens
    return tokenizer


def conversation_dataset(conversations: list[list[dict]]) -> Dataset:
    """TRL's conversational format: SFTTrainer applies the tokenizer's chat template itself."""
    return Dataset.from_list([{"messages": messages} for messages in conversations])


def mask_to_assistant_turns(trainer, template: str):
    """Loss on assistant tokens only: every other label becomes -100 (Unsloth's train_on_responses_only)."""
    user_marker, assistant_marker = TURN_MARKERS[template]
    return train_on_responses_only(trainer, instruction_part=user_marker, response_part=assistant_marker)


def stop_token_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in END_OF_TURN if token in vocab)
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate_reply(model, tokenizer, messages: list[dict], max_new_tokens: int = 64) -> str:
    """Greedy answer to a conversation, stopping at the template's end-of-turn token."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True).to(model.device)
    output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                            eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True).strip()
