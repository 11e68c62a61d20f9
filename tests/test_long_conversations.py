"""--long-conversations split on messy multi-turn data made for it: every window fits, starts and ends right, keeps the
system prompt, no turn is lost but the counted ones, and the loss mask covers exactly each window's assistant turns."""
import unsloth  # noqa: F401

import json
import re

import pytest
from trl import SFTConfig, SFTTrainer
from unsloth import FastLanguageModel

from common.chat import conversation_dataset, mask_to_assistant_turns, set_chat_template
from common.data import prepare_chat_data, to_conversations, token_count
from common.errors import UserError
from common.smoke import tiny_model, train_tokenizer

MAX_SEQ_LENGTH = 160
WORDS = "alpha beta gamma delta epsilon zeta eta theta".split()
LONG_EXCHANGE = 5  # conversation 5's last reply alone is longer than MAX_SEQ_LENGTH


def text(start: int, length: int) -> str:
    return " ".join(WORDS[(start + k) % len(WORDS)] for k in range(length))


def messy_chats() -> list[dict]:
    """16 ShareGPT conversations: 12 of 3 to 14 exchanges, 4 of one; a system prompt in every third, a stray leading
    reply in some, a repeated human turn (merged when cleaned) in one, and one reply far longer than the window."""
    rows = []
    for c in range(16):
        turns = [{"from": "system", "value": f"system {c}"}] if c % 3 == 0 else []
        if c % 4 == 1:
            turns.append({"from": "gpt", "value": "a stray greeting"})
        for t in range(3 + c if c < 12 else 1):
            turns.append({"from": "human", "value": f"q{c}.{t} " + text(t, 5 + 3 * (t % 5))})
            if c == 7 and t == 2:
                turns.append({"from": "human", "value": "and one more thing"})
            turns.append({"from": "gpt", "value": f"a{c}.{t} " + text(t, 10 + 7 * (t % 4))})
        if c == LONG_EXCHANGE:
            turns[-1]["value"] += " " + text(0, 400)
        rows.append({"conversations": turns})
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("chats") / "messy.jsonl"
    rows = messy_chats()
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer = set_chat_template(train_tokenizer([text(i, 60) for i in range(50)] + ["system stray greeting"] * 5,
                                                  "llama-3"), "llama-3")
    return str(path), tokenizer, rows


def conversation_of(window: list[dict]) -> int:
    return int(re.match(r"q(\d+)\.", next(m for m in window if m["role"] == "user")["content"]).group(1))


def test_split_windows_fit_start_and_end_right_and_lose_only_the_counted_exchange(data):
    path, tokenizer, rows = data
    train, held_out, summary = prepare_chat_data(path, tokenizer, MAX_SEQ_LENGTH, 0, 0.25, 0, long_conversations="split")
    windows = train + held_out
    for window in windows:
        roles = [m["role"] for m in window]
        dialogue = roles[1:] if roles[0] == "system" else roles
        assert dialogue[0] == "user" and dialogue[-1] == "assistant"
        assert dialogue == ["user", "assistant"] * (len(dialogue) // 2)
        assert token_count(tokenizer, window) <= MAX_SEQ_LENGTH
    cleaned = to_conversations(rows, path)[0]
    for c, conversation in enumerate(cleaned):
        own = [w for w in windows if conversation_of(w) == c]
        system = [m for m in conversation if m["role"] == "system"]
        assert all(w[:len(system)] == system for w in own)  # the system prompt opens every window
        turns = [m for w in sorted(own, key=lambda w: int(w[len(system)]["content"].split()[0].split(".")[1]))
                 for m in w[len(system):]]
        expected = conversation[len(system):]
        if c == LONG_EXCHANGE:
            expected = expected[:-2]  # its last exchange cannot fit any window: dropped and counted
        assert turns == expected, c
    assert {conversation_of(w) for w in train}.isdisjoint({conversation_of(w) for w in held_out})
    assert summary["split"]["exchanges too long"] == 1 and summary["dropped"] == {}
    assert summary["kept"] == 16 and len(windows) > 16
    assert summary["report"].endswith(f"16 conversations as {len(windows)} windows ({summary['split']['conversations']} "
                                      f"split, 1 single exchanges longer than {MAX_SEQ_LENGTH} dropped)")


def test_drop_keeps_only_what_fits_whole(data):
    path, tokenizer, rows = data
    train, held_out, summary = prepare_chat_data(path, tokenizer, MAX_SEQ_LENGTH, 0, 0.25, 0)
    fitting = [c for c in to_conversations(rows, path)[0] if token_count(tokenizer, c) <= MAX_SEQ_LENGTH]
    assert sorted(map(str, train + held_out)) == sorted(map(str, fitting))
    assert summary["dropped"] == {"too long": 16 - len(fitting)} and 0 < len(fitting) < 16


def test_an_unknown_choice_is_a_one_line_error(data):
    path, tokenizer, _ = data
    with pytest.raises(UserError, match="--long-conversations keep: use drop or split"):
        prepare_chat_data(path, tokenizer, MAX_SEQ_LENGTH, 0, 0.25, 0, long_conversations="keep")


def test_the_loss_mask_covers_exactly_each_windows_assistant_turns(data, tmp_path):
    path, tokenizer, _ = data
    train, _, _ = prepare_chat_data(path, tokenizer, MAX_SEQ_LENGTH, 0, 0.25, 0, long_conversations="split")
    model, tokenizer = FastLanguageModel.from_pretrained(tiny_model("llama-3", [{"text": text(0, 80)}]),
                                                         max_seq_length=MAX_SEQ_LENGTH, load_in_4bit=False)
    tokenizer = set_chat_template(tokenizer, "llama-3")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=conversation_dataset(train),
                         args=SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to="none",
                                        max_length=MAX_SEQ_LENGTH))
    trainer = mask_to_assistant_turns(trainer, "llama-3")
    for window, row in zip(train, trainer.train_dataset):
        trained = tokenizer.decode([i for i, label in zip(row["input_ids"], row["labels"]) if label != -100])
        assert trained == "".join(m["content"] + "<|eot_id|>" for m in window if m["role"] == "assistant")
