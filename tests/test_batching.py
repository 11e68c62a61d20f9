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
