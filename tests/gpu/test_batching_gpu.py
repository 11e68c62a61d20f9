"""common.batching with Unsloth's GPU trainer, which splits steps by token budget: a step becomes one micro-batch that
Unsloth runs as passes, unless a setting makes Unsloth decline (its own check, which imports only with the GPU
backend); then the card's micro-batches stay."""
import pytest

from tests.test_batching import tiny_trainer


@pytest.mark.gpu
def test_unsloths_gpu_trainer_splits_and_a_setting_it_declines_under_stays_the_cards(tmp_path, capsys):
    from common.batching import settle_batching
    budget = {"setting": "card", "tokens_a_pass": 2 * 256}
    trainer = tiny_trainer(tmp_path)
    assert settle_batching(trainer, 2, 4, budget)["batching"] == "token-budget"
    assert trainer._unsloth_token_budget_installed
    assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps) == (8, 1)
    trainer = tiny_trainer(tmp_path, neftune_noise_alpha=5.0)  # Unsloth declines: the noise depends on the pass length
    assert settle_batching(trainer, 2, 4, budget)["batching"] == "card micro-batches"
    assert "Unsloth would not split: NEFTune" in capsys.readouterr().out
    assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps) == (2, 4)
    assert not getattr(trainer, "_unsloth_token_budget_installed", False)
