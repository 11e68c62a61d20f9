"""A card's batch (rows a pass x accumulation) trained in as few forward passes as its memory allows.

Unsloth's padding-free passes cost the host about the same time to launch whatever their length (measured on an H100:
the GPU is busy 18% of a Llama-3-8B step of eight 600-token passes), so short chat rows leave most of a step idle.
Handing the Trainer every row of an optimizer step as one micro-batch and setting UNSLOTH_TOKEN_BUDGET makes Unsloth
run it as passes of whole rows holding at most `rows a pass x max_seq_length` tokens: a step still trains the card's
rows, full-length rows still go the card's number a pass (the same peak memory), short rows share a pass, and the loss
is divided by the step's token count once instead of averaged per micro-batch.
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

