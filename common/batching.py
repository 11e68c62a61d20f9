"""A card's batch (rows a pass x accumulation) trained in as few forward passes as its memory allows.

Unsloth's padding-free passes cost the host about the same time to launch whatever their length (measured on an H100:
the GPU is busy 18% of a Llama-3-8B step of eight 600-token passes), so short chat rows leave most of a step idle.
Handing the Trainer every row of an optimizer step as one micro-batch and setting UNSLOTH_TOKEN_BUDGET makes Unsloth
run it as passes of whole rows holding at most `rows a pass x max_seq_length` tokens: a step still trains the card's
rows, full-length rows still go the card's number a pass (the same peak memory), short rows share a pass, and the loss
is divided by the step's token count once instead of averaged per micro-batch.

How many tokens a pass may hold is the run's --token-budget: `card` keeps the card's `rows a pass x max_seq_length`
(what a T4 holds); `auto`, on a GPU of 24 GiB or more, measures what one full-length row's forward and backward add to
memory and sizes passes to 80% of the memory then free, so a big GPU runs a step in as few passes as fit (at most the
whole step in one); a number sets it. Every step still trains the card's rows with the same loss.

Where Unsloth would not split (its CPU backend has no token budget; some settings make it decline), a step's rows would
go through in one pass: batch x accumulation rows at once, the card's memory times the accumulation. settle_batching
checks that before the first step and, if so, sets the trainer back to the card's micro-batches. Under torchrun
Unsloth splits a step only when every rank needs the same number of passes; agree_on_pass_counts makes them agree.
"""
import contextlib
import os

import torch
import torch.distributed as dist

from common import distributed
from common.errors import UserError
from common.hardware import torch_dtype, vram_gib

TOKEN_BUDGET_VARIABLE = "UNSLOTH_TOKEN_BUDGET"  # read once, by Unsloth's SFTTrainer.__init__ (unsloth 2026.10)
AUTO_MIN_GPU_GIB = 24  # below this (a T4's 15 GiB, a 16 GB card) `auto` keeps the card's passes: they are what fits
AUTO_FREE_SHARE = 0.8  # of the memory free after the measurement: room for optimizer states and fragmentation


def pass_budget(setting: str, model, per_device_train_batch_size: int, gradient_accumulation_steps: int,
                max_seq_length: int, precision: str) -> dict:
    """The tokens one pass may hold under --token-budget card|auto|N, with how they were chosen (for the manifest).
    Call after get_peft_model and before the trainer is built; every rank takes the smallest of the ranks' budgets."""
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


@contextlib.contextmanager
def token_budget_batches(per_device_train_batch_size: int, gradient_accumulation_steps: int, tokens_a_pass: int):
    """Build the SFTTrainer inside this block with the SFTConfig batch arguments it yields; the variable is restored
    afterwards, so a later trainer in the same process (a rank sweep, a test) is not affected."""
    previous = os.environ.get(TOKEN_BUDGET_VARIABLE)
    os.environ[TOKEN_BUDGET_VARIABLE] = str(tokens_a_pass)
    try:
        yield {"per_device_train_batch_size": per_device_train_batch_size * gradient_accumulation_steps,
               "gradient_accumulation_steps": 1}
    finally:
        if previous is None:
            os.environ.pop(TOKEN_BUDGET_VARIABLE, None)
        else:
            os.environ[TOKEN_BUDGET_VARIABLE] = previous


def settle_batching(trainer, per_device_train_batch_size: int, gradient_accumulation_steps: int) -> str:
    """'token-budget' when Unsloth will split each step into passes within the budget; otherwise the trainer goes back
    to the card's micro-batches (rows a pass x accumulation), said once, and 'card micro-batches' is returned for the
    manifest. Call after the trainer is built and before it trains."""
    reason = token_budget_blocker(trainer)
    if reason is None:
        if trainer.args.world_size > 1:
            agree_on_pass_counts()
        return "token-budget"
    trainer.args.per_device_train_batch_size = per_device_train_batch_size
    trainer.args.gradient_accumulation_steps = gradient_accumulation_steps
    trainer._train_batch_size = trainer.args.train_batch_size  # what the Trainer's dataloader reads (transformers 5)
    print(f"batching: the card's micro-batches, {per_device_train_batch_size} rows x {gradient_accumulation_steps} "
          f"accumulation steps: {reason}")
    return "card micro-batches"


def token_budget_blocker(trainer) -> str | None:
    """Why Unsloth would run a step's rows in one pass instead of splitting them; None when it will split."""
    if not getattr(trainer, "_unsloth_token_budget_installed", False):
        return "this Unsloth backend does not split steps by token budget"
    try:  # the check Unsloth itself makes before each step (unsloth 2026.10: unsloth.utils.token_budget)
        from unsloth.utils.token_budget import _exactness_blocker
    except ImportError:
        return "this Unsloth version does not say when it declines to split"
    reason = _exactness_blocker(trainer)
    return f"Unsloth would not split: {reason}" if reason else None


def agree_on_pass_counts():
    """Make every rank split a step into the same number of passes. Unsloth's token budget runs a step's rows in one
    pass on every rank when the ranks' pass counts differ (each pass runs TRL's compute_loss, whose metrics are
    gathered across ranks, and the last one syncs gradients: unequal counts would leave a rank waiting); installed
    once per process over unsloth.utils.token_budget's splitter, which Unsloth's training step looks up on every
    call."""
    from unsloth.utils import token_budget
    if not getattr(token_budget.split_batch_by_token_budget, "agrees_across_ranks", False):
        token_budget.split_batch_by_token_budget = agreeing(token_budget.split_batch_by_token_budget)


def agreeing(split):
    """`split` (Unsloth's splitter) made to agree across ranks: each rank splits as Unsloth would, the ranks take the
    largest count, and a rank with fewer passes cuts its largest pass in two, between whole rows, until it has as
    many. Smaller passes stay within the budget, and the step's loss is the same sum."""
    def split_agreeing(batch, budget):
        passes = split(batch, budget)
        count = torch.tensor([len(passes)], device=batch["input_ids"].device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        while len(passes) < int(count):
            for largest in sorted(range(len(passes)), key=lambda i: -passes[i]["input_ids"].numel()):
                halves = split(passes[largest], passes[largest]["input_ids"].numel() - 1)
                if len(halves) == 2:
                    passes[largest:largest + 1] = halves
                    break
            else:
                break  # no pass can be cut between rows: Unsloth then runs this step unsplit, and says so
        return passes

    split_agreeing.agrees_across_ranks = True
    return split_agreeing
