"""common.batching: the SFTConfig batch arguments it yields and the Unsloth token budget it sets only while a trainer
is built."""
import os

import pytest

from common.batching import TOKEN_BUDGET_VARIABLE, token_budget_batches


@pytest.fixture(autouse=True)
def no_budget_set(monkeypatch):
    monkeypatch.delenv(TOKEN_BUDGET_VARIABLE, raising=False)


def test_a_step_is_one_micro_batch_run_as_passes_of_the_cards_rows_at_full_length():
    with token_budget_batches(2, 8, 1024) as batches:  # llama3_8b's card: 2 rows a pass, 8 passes, 1024 tokens
        assert batches == {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 1}
        assert os.environ[TOKEN_BUDGET_VARIABLE] == "2048"
    assert TOKEN_BUDGET_VARIABLE not in os.environ


def test_a_budget_set_before_is_restored_even_when_building_the_trainer_fails(monkeypatch):
    monkeypatch.setenv(TOKEN_BUDGET_VARIABLE, "512")
    with pytest.raises(RuntimeError), token_budget_batches(2, 4, 2048):
        assert os.environ[TOKEN_BUDGET_VARIABLE] == "4096"
        raise RuntimeError("the trainer could not be built")
    assert os.environ[TOKEN_BUDGET_VARIABLE] == "512"


def tiny_trainer(tmp_path, **config):
    """An SFTTrainer on a tiny Llama, built as the chat recipes build theirs: the card's 2 rows x 4 steps as one
    micro-batch of 8, to be run as passes of at most 2 x 256 tokens."""
    import unsloth  # noqa: F401
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    from common.chat import conversation_dataset, set_chat_template
    from common.smoke import tiny_model
    conversation = [{"role": "user", "content": "What is LoRA?"}, {"role": "assistant", "content": "Small adapters."}]
    model, tokenizer = FastLanguageModel.from_pretrained(tiny_model("llama-3", [{"text": "What is LoRA? Small."}]),
                                                         max_seq_length=256, load_in_4bit=False)
    tokenizer = set_chat_template(tokenizer, "llama-3")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    with token_budget_batches(2, 4, 256) as batches:
        return SFTTrainer(model=model, processing_class=tokenizer, train_dataset=conversation_dataset([conversation] * 16),
                          args=SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to="none", max_length=256,
                                         **batches, **config))


def rows_per_batch(trainer) -> list[int]:
    return [len(batch["input_ids"]) if batch["input_ids"].shape[0] > 1 else int((batch["position_ids"] == 0).sum())
            for batch in trainer.get_train_dataloader()]


def test_without_unsloths_split_a_step_goes_back_to_the_cards_micro_batches(tmp_path, capsys):
    from common.batching import settle_batching
    trainer = tiny_trainer(tmp_path)
    assert trainer.args.per_device_train_batch_size == 8
    # Unsloth's CPU backend installs no token budget: one pass would hold all 8 rows of a step.
    assert settle_batching(trainer, 2, 4) == "card micro-batches"
    assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps) == (2, 4)
    assert rows_per_batch(trainer) == [2] * 8
    assert "the card's micro-batches, 2 rows x 4 accumulation steps: this Unsloth backend does not split" in \
        capsys.readouterr().out
