"""gemma3_4b on CPU: the smoke run end to end on a tiny Gemma 3 text model, the loss on the model's turns only, what
the gemma-3 template does with a system message (Gemma 3 has no system role), and `./run.sh chat` on the run."""
import unsloth  # noqa: F401  (first, as in the recipe and in chat)

import json

import pytest
from transformers import AutoTokenizer
from unsloth import train_on_responses_only

from common.chat import TURN_MARKERS, set_chat_template
from recipes.gemma3_4b import Config
from tests.conftest import cpu_training_precision, run_to_completion

CONVERSATION = [{"role": "user", "content": "What is LoRA?"}, {"role": "assistant", "content": "Low-rank adapters."},
                {"role": "user", "content": "And QLoRA?"}, {"role": "assistant", "content": "LoRA on a 4-bit base."}]
SYSTEM = {"role": "system", "content": "Be brief."}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    folder, _ = run_to_completion("gemma3_4b", "--smoke", output_dir=tmp_path_factory.mktemp("smoke"))
    return folder


@pytest.fixture(scope="module")
def tokenizer(smoke_run):
    """The smoke model's tokenizer (Gemma's special tokens, trained on the sample) in Unsloth's gemma-3 template."""
    return set_chat_template(AutoTokenizer.from_pretrained(smoke_run / "smoke-base"), "gemma-3")


def trained_text(tokenizer, messages) -> str:
    """The tokens of a rendered conversation that keep a label under the recipe's response-only mask, decoded."""
    user_marker, reply_marker = TURN_MARKERS["gemma-3"]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    mask = train_on_responses_only(None, instruction_part=user_marker, response_part=reply_marker, tokenizer=tokenizer,
                                   return_function=True)
    labels = mask({"input_ids": [ids]})["labels"][0]
    return tokenizer.decode([token for token, label in zip(ids, labels) if label != -100])


def test_smoke_run_writes_every_output(smoke_run):
    for name in ("config.json", "manifest.json", "metrics.jsonl", "results.md", "run.json",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/tokenizer_config.json"):
        assert (smoke_run / name).exists(), name
    assert not (smoke_run / "FAILED").exists()
    assert json.loads((smoke_run / "smoke-base" / "config.json").read_text())["architectures"] == ["Gemma3ForCausalLM"]
    adapter = json.loads((smoke_run / "adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (
        Config.lora_r, Config.lora_alpha, Config.lora_dropout) == (8, 8, 0.0)
    # The notebook's flags (language layers, attention and MLP) name every projection of Gemma 3's decoder.
    assert sorted(adapter["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj",
                                                        "gate_proj", "up_proj", "down_proj"])
    record = json.loads((smoke_run / "run.json").read_text())
    assert (record["chat_template"], record["card_model"], record["smoke"]) == (
        "gemma-3", "unsloth/gemma-3-4b-it", True)
    manifest = json.loads((smoke_run / "manifest.json").read_text())
    assert manifest["precision"] == cpu_training_precision() and manifest["seed"] == 3407
    assert record["metrics"]["final_eval_loss"] == manifest["final_eval_loss"]
    losses = [json.loads(line) for line in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if "loss" in r] == list(range(1, 9))  # smoke: max_steps 8


def test_loss_falls_on_the_model_turns_only(tokenizer):
    # Each reply with the template's end of turn and its newline: the model learns to close its turn.
    assert trained_text(tokenizer, CONVERSATION) == ("Low-rank adapters.<end_of_turn>\n"
                                                     "LoRA on a 4-bit base.<end_of_turn>\n")


def test_a_system_message_opens_the_first_user_turn_and_is_not_trained(tokenizer):
    rendered = tokenizer.apply_chat_template([SYSTEM, *CONVERSATION], tokenize=False)
    assert rendered == ("<bos><start_of_turn>user\nBe brief.\n\nWhat is LoRA?<end_of_turn>\n"
                        "<start_of_turn>model\nLow-rank adapters.<end_of_turn>\n"
                        "<start_of_turn>user\nAnd QLoRA?<end_of_turn>\n"
                        "<start_of_turn>model\nLoRA on a 4-bit base.<end_of_turn>\n")
    assert trained_text(tokenizer, [SYSTEM, *CONVERSATION]) == trained_text(tokenizer, CONVERSATION)


def test_chat_renders_the_template_as_the_tokenizer_does(smoke_run, tokenizer, monkeypatch):
    from after_training import chat
    asked, prompts = [], []
    real_reply = chat.reply

    def recording_reply(model, tokenizer, messages, *rest):
        asked.append(messages)
        prompts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        return real_reply(model, tokenizer, messages, *rest)
    monkeypatch.setattr(chat, "reply", recording_reply)
    chat.main([str(smoke_run), "--prompt", "hi", "--max-new-tokens", "2"])
    assert asked == [[{"role": "user", "content": "hi"}]]
    # The adapter's saved tokenizer, which chat loads, renders as the gemma-3 template the run trained with.
    assert prompts == [tokenizer.apply_chat_template(asked[0], add_generation_prompt=True, tokenize=False)]
    assert prompts == ["<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"]
