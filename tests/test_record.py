"""run.json, the one run-folder schema: written by every recipe, read by chat and export; a folder written before it
existed (tests/data/legacy_run: a tinyllama_sentiment smoke run made by the code of 2026-12-07) still chats and
exports, with the system prompt it trained with."""
import unsloth  # noqa: F401  (first, as in chat and export)

import json
import shutil
from pathlib import Path

import pytest

from after_training import chat, export
from after_training.trained_run import open_run
from common import record

LEGACY = Path(__file__).parent / "data" / "legacy_run" / "tinyllama_sentiment"
SYSTEM_PROMPT = "You classify the sentiment of tweets. Reply with exactly one word: negative, neutral or positive."


@pytest.fixture
def legacy_run(tmp_path):
    """The legacy folder copied, its adapter pointed at the copy's smoke-base (as the run that wrote it had it)."""
    folder = tmp_path / "tinyllama_sentiment" / "20261207-233318"
    shutil.copytree(LEGACY, folder)
    adapter_config = folder / "adapter" / "adapter_config.json"
    settings = json.loads(adapter_config.read_text())
    settings["base_model_name_or_path"] = str(folder / "smoke-base")
    adapter_config.write_text(json.dumps(settings))
    return folder


def test_a_legacy_folder_reads_as_the_record_it_would_have_written(legacy_run):
    assert not (legacy_run / "run.json").exists()
    read = record.read(legacy_run)
    assert (read.recipe, read.smoke, read.load_in_4bit, read.chat_template) == (
        "tinyllama_sentiment", True, True, "zephyr")
    assert read.system_prompt == SYSTEM_PROMPT  # from config.json's recipe_constants, where that code kept it
    assert read.card_model == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    assert [(a.path, a.base_model, a.load_in_4bit) for a in read.adapters] == [
        ("adapter", str(legacy_run / "smoke-base"), True)]


def test_a_legacy_folder_chats_with_its_system_prompt_and_exports(legacy_run, tmp_path, monkeypatch):
    run = open_run(str(legacy_run))
    assert run.system_prompt == SYSTEM_PROMPT and run.load_in_4bit and run.smoke
    asked, answered = [], []
    real_reply = chat.reply
    monkeypatch.setattr(chat, "reply", lambda model, tokenizer, messages, *rest: (
        asked.append(messages), answered.append(real_reply(model, tokenizer, messages, *rest)))[1])
    chat.main([str(legacy_run), "--prompt", "great day", "--max-new-tokens", "4"])
    assert asked == [[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "great day"}]]
    assert isinstance(answered[0], str)
    export.main([str(legacy_run), "--format", "adapter", "--export-dir", str(tmp_path / "export")])
    card = (tmp_path / "export" / "adapter" / "README.md").read_text()
    assert SYSTEM_PROMPT in card and (tmp_path / "export" / "adapter" / "adapter_model.safetensors").is_file()


def test_record_round_trips_and_finds_each_adapter_by_path(tmp_path):
    written = record.RunRecord(recipe="r", base_model="org/model", card_model="org/model", smoke=False,
                               load_in_4bit=True, chat_template="llama-3", system_prompt=None,
                               adapters=[record.Adapter("adapter", "org/model", True),
                                         record.Adapter("adapters/lora-r4", "org/model", False)],
                               metrics={"final_eval_loss": 1.5})
    written.write(tmp_path)
    read = record.read(tmp_path)
    assert read == written
    assert read.adapter_at(tmp_path, tmp_path / "adapters" / "lora-r4").load_in_4bit is False
    assert read.adapter_at(tmp_path, tmp_path / "checkpoints" / "checkpoint-4") is None

