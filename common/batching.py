"""A card's batch (rows a pass x accumulation) trained in as few forward passes as its memory allows.

Unsloth's padding-free passes cost the host about the same time to launch whatever their length (measured on an H100:
the GPU is busy 18% of a Llama-3-8B step of eight 600-token passes), so short chat rows leave most of a step idle.
Handing the Trainer every row of an optimizer step as one micro-batch and setting UNSLOTH_TOKEN_BUDGET makes Unsloth
run it as passes of whole rows holding at most `rows a pass x max_seq_length` tokens: a step still trains the card's
rows, full-length rows still go the card's number a pass (the same peak memory), short rows share a pass, and the loss
is divided by the step's token count once instead of averaged per micro-batch.

Where Unsloth would not split (its CPU backend has no token budget; some settings make it decline), a step's rows would
go through in one pass: batch x accumulation rows at once, the card's memory times the accumulation. settle_batching
checks that before the first step and, if so, sets the trainer back to the card's micro-batches.
"""
import contextlib
import os

TOKEN_BUDGET_VARIABLE = "UNSLOTH_TOKEN_BUDGET"  # read once, by Unsloth's SFTTrainer.__init__ (unsloth 2026.10)


@contextlib.contextmanager
def token_budget_batches(per_device_train_batch_size: int, gradient_accumulation_steps: int, max_seq_length: int):
    """Build the SFTTrainer inside this block with the SFTConfig batch arguments it yields; the variable is restored
    afterwards, so a later trainer in the same process (a rank sweep, a test) is not affected."""
    budget = per_device_train_batch_size * max_seq_length
    previous = os.environ.get(TOKEN_BUDGET_VARIABLE)
    os.environ[TOKEN_BUDGET_VARIABLE] = str(budget)
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
    if trainer.args.world_size > 1:
        # Unsloth splits only when every rank needs the same number of passes, which a step's rows do not promise.
        return "with several processes Unsloth runs any step whose ranks need different numbers of passes at once"
    try:  # the check Unsloth itself makes before each step (unsloth 2026.10: unsloth.utils.token_budget)
        from unsloth.utils.token_budget import _exactness_blocker
    except ImportError:
        return "this Unsloth version does not say when it declines to split"
    reason = _exactness_blocker(trainer)
    return f"Unsloth would not split: {reason}" if reason else None
