"""Every use of Unsloth beyond its public API, in one place, checked against the version these recipes pin.

Unsloth 2026.10's token budget (unsloth.utils.token_budget) is switched on by an environment variable that its
SFTTrainer reads once; here it is a Python argument: `install_token_budget(trainer, tokens)` sets the variable for
that one call alone. Whether Unsloth would split a step is its private `_exactness_blocker`. Under torchrun the ranks
must split a step into as many passes each (`agree_on_pass_counts`). Without a GPU, unsloth_zoo's CPU runtime says
whether its backend computes in bf16 (`cpu_backend_uses_bf16`). Another Unsloth version may have moved any of these:
each says so in one line instead of failing inside Unsloth.
"""
import contextlib
import os
from importlib import metadata

import torch
import torch.distributed as dist

from common.errors import UserError

PINNED = "2026.10.9"  # requirements.txt's unsloth: what these functions were written against
TOKEN_BUDGET_VARIABLE = "UNSLOTH_TOKEN_BUDGET"


def token_budget_module():
    """unsloth.utils.token_budget, or a one-line UserError naming the version and what to do."""
    try:
        from unsloth.utils import token_budget
        token_budget.install_token_budget, token_budget._exactness_blocker, token_budget.split_batch_by_token_budget
    except (ImportError, AttributeError):
        raise UserError(f"unsloth {metadata.version('unsloth')} has no token budget as {PINNED} has: install "
                        f"unsloth=={PINNED} (requirements.txt), or pass --token-budget card") from None
    return token_budget


def cpu_backend_uses_bf16() -> bool:
    """Whether Unsloth's CPU backend computes in bf16 here (it does on a CPU with bf16 instructions, whatever was asked);
    False where this unsloth_zoo has no such runtime (fp32, transformers' own default)."""
    try:
        from unsloth_zoo.cpu.runtime import cpu_bf16_supported
    except ImportError:
        return False
    return bool(cpu_bf16_supported())


def token_budget_blocker(trainer) -> str | None:
    """Why Unsloth would run a step's rows in one pass instead of splitting them; None when it will split."""
    if not torch.cuda.is_available():
        return "Unsloth's CPU backend does not split steps by token budget"
    reason = token_budget_module()._exactness_blocker(trainer)
    return f"Unsloth would not split: {reason}" if reason else None


def install_token_budget(trainer, tokens_a_pass: int):
    """Unsloth runs each micro-batch of `trainer` as passes of whole rows within `tokens_a_pass` tokens."""
    module = token_budget_module()
    previous = os.environ.get(TOKEN_BUDGET_VARIABLE)
    os.environ[TOKEN_BUDGET_VARIABLE] = str(tokens_a_pass)
    try:
        module.install_token_budget(trainer)
    finally:
        with contextlib.suppress(KeyError):
            del os.environ[TOKEN_BUDGET_VARIABLE]
        if previous is not None:
            os.environ[TOKEN_BUDGET_VARIABLE] = previous
    if not getattr(trainer, "_unsloth_token_budget_installed", False):
        raise UserError(f"unsloth {metadata.version('unsloth')} did not install its token budget as {PINNED} does: "
                        f"install unsloth=={PINNED}, or pass --token-budget card")


def agree_on_pass_counts():
    """Make every rank split a step into the same number of passes. Unsloth's token budget runs a step's rows in one
    pass on every rank when the ranks' pass counts differ (each pass runs TRL's compute_loss, whose metrics are
    gathered across ranks, and the last one syncs gradients: unequal counts would leave a rank waiting); installed
    once per process over unsloth.utils.token_budget's splitter, which Unsloth's training step looks up on every
    call."""
    module = token_budget_module()
    if not getattr(module.split_batch_by_token_budget, "agrees_across_ranks", False):
        module.split_batch_by_token_budget = agreeing(module.split_batch_by_token_budget)


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
