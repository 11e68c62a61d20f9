"""A card's batch (rows a pass x accumulation) trained in as few forward passes as its memory allows.

Unsloth's padding-free passes cost the host about the same time to launch whatever their length (measured on an H100:
the GPU is busy 18% of a Llama-3-8B step of eight 600-token passes), so short chat rows leave most of a step idle.
Handing the Trainer every row of an optimizer step as one micro-batch and installing Unsloth's token budget on the
trainer (common/unsloth_internals.py) makes Unsloth run it as passes of whole rows holding at most `rows a pass x max_seq_length` tokens: a step still trains the card's
rows, full-length rows still go the card's number a pass (the same peak memory), short rows share a pass, and the loss
is divided by the step's token count once instead of averaged per micro-batch.

How many tokens a pass may hold is the run's --token-budget: `card` keeps the card's `rows a pass x max_seq_length`
(what a T4 holds); `auto`, on a GPU of 24 GiB or more, measures what one full-length row's forward and backward add to
memory and sizes passes to 80% of the memory then free, so a big GPU runs a step in as few passes as fit (at most the
whole step in one); a number sets it. Every step still trains the card's rows with the same loss.

Where Unsloth would not split (its CPU backend has no token budget; some settings make it decline), a step's rows would
go through in one pass: batch x accumulation rows at once, the card's memory times the accumulation. settle_batching
checks that before the first step and then keeps the card's micro-batches. Under torchrun Unsloth splits a step only
when every rank needs the same number of passes; unsloth_internals.agree_on_pass_counts makes them agree.
"""
import torch

from common import distributed, unsloth_internals
from common.errors import UserError
from common.hardware import torch_dtype, vram_gib

AUTO_MIN_GPU_GIB = 24  # below this (a T4's 15 GiB, a 16 GB card) `auto` keeps the card's passes: they are what fits
AUTO_FREE_SHARE = 0.8  # of the memory free after the measurement: room for optimizer states and fragmentation


def pass_budget(setting: str, model, per_device_train_batch_size: int, gradient_accumulation_steps: int,
                max_seq_length: int, precision: str) -> dict:
    """The tokens one pass may hold under --token-budget card|auto|N, with how they were chosen (for the manifest).
    Call before training; every rank takes the smallest of the ranks' budgets."""
    check_token_budget(setting, max_seq_length)
    card = per_device_train_batch_size * max_seq_length
    whole_step = card * gradient_accumulation_steps
    if setting == "card":
        chosen = {"setting": "card", "tokens_a_pass": card}
    elif setting.isdigit():
        chosen = {"setting": setting, "tokens_a_pass": int(setting)}
    elif (vram_gib() or (0, 0))[1] < AUTO_MIN_GPU_GIB:
        chosen = {"setting": "auto", "tokens_a_pass": card,
                  "reason": f"no GPU of {AUTO_MIN_GPU_GIB} GiB or more: the card's passes"}
    else:
        per_token = activation_bytes_per_token(model, max_seq_length, precision)
        free = torch.cuda.mem_get_info()[0]
        fits = int(free * AUTO_FREE_SHARE / per_token) // max_seq_length * max_seq_length
        chosen = {"setting": "auto", "tokens_a_pass": max(card, min(whole_step, fits)),
                  "reason": f"{per_token / 2**20:.2f} MiB a token measured, {free / 2**30:.1f} GiB free"}
    chosen["tokens_a_pass"] = min(distributed.gathered(chosen["tokens_a_pass"]))
    chosen["passes_a_full_step"] = -(-whole_step // chosen["tokens_a_pass"])
    return chosen


def check_token_budget(setting: str, max_seq_length: int):
    """A --token-budget the recipe can use, or a one-line error; recipes call it before they write anything."""
    if setting.isdigit() and int(setting) < max_seq_length:
        raise UserError(f"--token-budget {setting}: a pass must hold one full-length row; give at least "
                        f"{max_seq_length} (max_seq_length), or card or auto")
    if not setting.isdigit() and setting not in ("card", "auto"):
        raise UserError(f"--token-budget expects card, auto or a number of tokens, got {setting!r}")


def activation_bytes_per_token(model, max_seq_length: int, precision: str) -> float:
    """GPU memory one full-length row's forward and backward add, per token: a pass of T tokens needs about T times
    this. The row is random token ids from a generator of its own (the run's random state is untouched) and the
    gradients it leaves are cleared."""
    generator = torch.Generator(device=model.device).manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, max_seq_length), device=model.device, generator=generator)
    model.train()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch_dtype(precision)):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.cuda.synchronize()
    added = torch.cuda.max_memory_allocated() - before
    model.zero_grad(set_to_none=True)
    del loss
    torch.cuda.empty_cache()
    return added / max_seq_length


def settle_batching(trainer, per_device_train_batch_size: int, gradient_accumulation_steps: int,
                    budget: dict | None) -> dict:
    """How a step runs, set on the trainer built with the card's micro-batches (rows a pass x accumulation): with a
    token budget that Unsloth can honour, the trainer gets the step's rows as one micro-batch and Unsloth runs them as
    passes within the budget; otherwise the card's micro-batches stay, and why is said once. Returns the manifest's
    record: batching ('token-budget' or 'card micro-batches'), token_budget, batch. Call before training."""
    record = {"batching": "card micro-batches", "token_budget": budget,
              "batch": distributed.batch_layout(per_device_train_batch_size, gradient_accumulation_steps)}
    if budget is None:
        return record
    reason = unsloth_internals.token_budget_blocker(trainer)
    if reason is not None:
        print(f"batching: the card's micro-batches, {per_device_train_batch_size} rows x {gradient_accumulation_steps} "
              f"accumulation steps: {reason}")
        return record
    trainer.args.per_device_train_batch_size = per_device_train_batch_size * gradient_accumulation_steps
    trainer.args.gradient_accumulation_steps = 1
    trainer._train_batch_size = trainer.args.train_batch_size  # what the Trainer's dataloader reads (transformers 5)
    unsloth_internals.install_token_budget(trainer, budget["tokens_a_pass"])
    if trainer.args.world_size > 1:
        unsloth_internals.agree_on_pass_counts()
    return {**record, "batching": "token-budget"}
