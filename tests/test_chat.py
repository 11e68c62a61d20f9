"""Loss on assistant turns only: prompt tokens are masked to -100, answer tokens keep their ids."""
import unsloth  # noqa: F401

from trl import SFTConfig, SFTTrainer
from unsloth import FastLanguageModel

from common.chat import conversation_dataset, mask_to_assistant_turns, set_chat_template, stop_token_ids
from common.smoke import tiny_model

CONVERSATION = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is LoRA?"},
                {"role": "assistant", "content": "Small trained adapters."}, {"role": "user", "content": "And QLoRA?"},
                {"role": "assistant", "content": "The same on a 4-bit base."}]


def test_only_assistant_tokens_carry_labels(tmp_path):
    folder = tiny_model("llama-3", [{"text": " ".join(m["content"] for m in CONVERSATION) * 5}])
    model, tokenizer = FastLanguageModel.from_pretrained(folder, max_seq_length=256, load_in_4bit=False)
    tokenizer = set_chat_template(tokenizer, "llama-3")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=conversation_dataset([CONVERSATION] * 2),
                         args=SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to="none", max_length=256))
    trainer = mask_to_assistant_turns(trainer, "llama-3")
    row = trainer.train_dataset[0]
    ids, labels = row["input_ids"], row["labels"]
    trained = tokenizer.decode([i for i, label in zip(ids, labels) if label != -100])
    masked = tokenizer.decode([i for i, label in zip(ids, labels) if label == -100])
    assert trained == "Small trained adapters.<|eot_id|>The same on a 4-bit base.<|eot_id|>"
    assert "What is LoRA?" in masked and "Answer briefly." in masked and "And QLoRA?" in masked
    assert all(label in (-100, i) for i, label in zip(ids, labels))


def test_generation_stops_at_end_of_turn():
    folder = tiny_model("llama-3", [{"text": "some text for a tokenizer"}])
    _, tokenizer = FastLanguageModel.from_pretrained(folder, max_seq_length=64, load_in_4bit=False)
    tokenizer = set_chat_template(tokenizer, "llama-3")
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") in stop_token_ids(tokenizer)


def test_a_chat_template_leaves_no_scratch_folder_in_the_working_directory(tmp_path, monkeypatch):
    """Unsloth's token mapping for chatml on GPT-2's tokenizer makes _unsloth_sentencepiece_temp/ in the working
    directory (a user's clone) and leaves it empty."""
    from transformers import AutoTokenizer

    from common.chat import set_chat_template
    from common.smoke import tiny_model
    tokenizer = AutoTokenizer.from_pretrained(tiny_model("gpt2", [{"text": "hello world"}]))
    monkeypatch.chdir(tmp_path)
    set_chat_template(tokenizer, "chatml")
    assert list(tmp_path.iterdir()) == []
