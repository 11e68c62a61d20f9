"""common.batching: how a step's rows reach the trainer (the card's micro-batches, or one micro-batch that Unsloth runs
as passes within the token budget), how --token-budget card|auto|N sizes a pass, and how ranks are made to agree on a
step's number of passes (common.unsloth_internals)."""
import pytest

import torch

from common import batching, unsloth_internals
from common.batching import pass_budget, settle_batching
from common.errors import UserError


def tiny_trainer(tmp_path, **config):
    """An SFTTrainer on a tiny Llama, built as the chat recipes build theirs: the card's 2 rows x 4 accumulation."""
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
    return SFTTrainer(model=model, processing_class=tokenizer, train_dataset=conversation_dataset([conversation] * 16),
                      args=SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to="none", max_length=256,
                                     per_device_train_batch_size=2, gradient_accumulation_steps=4, **config))


def rows_per_batch(trainer) -> list[int]:
    return [len(batch["input_ids"]) if batch["input_ids"].shape[0] > 1 else int((batch["position_ids"] == 0).sum())
            for batch in trainer.get_train_dataloader()]


def test_without_unsloths_split_a_step_stays_the_cards_micro_batches(tmp_path, capsys):
    trainer = tiny_trainer(tmp_path)
    budget = pass_budget("card", None, 2, 4, 256, "fp32")
    # Unsloth's CPU backend installs no token budget: one pass would hold all 8 rows of a step.
    settled = settle_batching(trainer, 2, 4, budget)
    assert settled["batching"] == "card micro-batches" and settled["token_budget"] == budget
    assert settled["batch"] == {"world_size": 1, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4,
                                "effective_batch": 8}
    assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps) == (2, 4)
    assert not getattr(trainer, "_unsloth_token_budget_installed", False)
    assert rows_per_batch(trainer) == [2] * 8
    assert "the card's micro-batches, 2 rows x 4 accumulation steps: Unsloth's CPU backend does not split" in \
        capsys.readouterr().out
    assert settle_batching(trainer, 2, 4, None)["batching"] == "card micro-batches"  # a recipe without a budget


def test_card_and_a_number_set_the_pass_and_bad_settings_are_one_line():
    # llama3_8b's card: 2 rows x 1024 tokens a pass, 8 passes a step
    assert pass_budget("card", None, 2, 8, 1024, "bf16") == {"setting": "card", "tokens_a_pass": 2048,
                                                             "passes_a_full_step": 8}
    assert pass_budget("4096", None, 2, 8, 1024, "bf16")["passes_a_full_step"] == 4
    with pytest.raises(UserError, match=r"^--token-budget 1000: a pass must hold one full-length row; give at least "
                                        r"1024 \(max_seq_length\), or card or auto$"):
        pass_budget("1000", None, 2, 8, 1024, "bf16")
    with pytest.raises(UserError, match="^--token-budget expects card, auto or a number of tokens, got 'max'$"):
        pass_budget("max", None, 2, 8, 1024, "bf16")


def test_auto_keeps_the_cards_passes_without_a_big_gpu():
    chosen = pass_budget("auto", None, 2, 8, 1024, "fp32")  # this machine: no GPU
    assert chosen["tokens_a_pass"] == 2048 and chosen["reason"] == "no GPU of 24 GiB or more: the card's passes"


@pytest.mark.parametrize("free_gib, tokens_a_pass, passes", [
    (100, 16_384, 1),  # 80 GiB at 1 MiB a token holds 81,920 tokens: the whole step (2 x 8 x 1024) in one pass
    (4, 3_072, 6),  # 3.2 GiB holds 3,276 tokens: whole rows of 1024, so 3,072, and a step of 16,384 in 6 passes
    (1, 2_048, 8),  # less than the card's pass: never below the card's
])
def test_auto_sizes_passes_to_free_memory(monkeypatch, free_gib, tokens_a_pass, passes):
    monkeypatch.setattr(batching, "vram_gib", lambda: (free_gib, 139.0))
    monkeypatch.setattr(batching, "activation_bytes_per_token", lambda model, length, precision: 2**20)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (free_gib * 2**30, 139 * 2**30))
    chosen = pass_budget("auto", None, 2, 8, 1024, "bf16")
    assert (chosen["tokens_a_pass"], chosen["passes_a_full_step"]) == (tokens_a_pass, passes)
    assert chosen["reason"] == f"1.00 MiB a token measured, {free_gib:.1f} GiB free"


def padding_free_batch(lengths: list[int]) -> dict:
    """One [1, T] row of several conversations, as Unsloth's padding-free collator builds it: position ids restart at
    each row, and each row's first label is masked (so a pass may end there)."""
    ids = torch.arange(sum(lengths)).unsqueeze(0)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    labels = ids.clone()
    labels[positions == 0] = -100
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def unsloths_splitter():
    """unsloth.utils.token_budget's splitter, loaded from its file: the package's utils import its GPU models, which
    the CPU backend does not load."""
    import importlib.util
    spec = importlib.util.find_spec("unsloth")
    path = spec.submodule_search_locations[0] + "/utils/token_budget.py"
    module_spec = importlib.util.spec_from_file_location("unsloth_token_budget", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.split_batch_by_token_budget


def test_a_rank_with_fewer_passes_cuts_its_largest_until_the_counts_agree(monkeypatch):
    other_rank_passes = 4

    def all_reduce_max(tensor, op):  # another rank needs this many passes for its rows of the step
        tensor.fill_(max(int(tensor), other_rank_passes))
    monkeypatch.setattr(unsloth_internals.dist, "all_reduce", all_reduce_max)
    split = unsloth_internals.agreeing(unsloths_splitter())
    batch = padding_free_batch([300, 200, 400, 100])
    passes = split(batch, 512)
    assert [p["input_ids"].shape[1] for p in passes] == [300, 200, 400, 100]  # its own 2 passes (500, 500) cut to 4
    assert torch.equal(torch.cat([p["input_ids"] for p in passes], dim=1), batch["input_ids"])  # every token once
    assert all(int(p["position_ids"][0, 0]) == 0 for p in passes)  # cut between rows only
    other_rank_passes = 1
    assert [p["input_ids"].shape[1] for p in split(batch, 512)] == [500, 500]
