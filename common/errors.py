"""One-line errors for mistakes a user can make, instead of a traceback from deep inside a library."""
import os
import sys


class UserError(Exception):
    """A problem the user can fix; the message names the cause and the fix in one line."""


OOM_HINT = ("CUDA out of memory: lower --per-device-train-batch-size (raising --gradient-accumulation-steps "
            "keeps the effective batch), lower --max-seq-length, or keep --load-in-4bit on")


def run_main(main, interrupted: str = "interrupted; resume with --resume <run folder>"):
    """Run a recipe's (or chat's, export's) main(); user errors, Ctrl-C and CUDA OOM exit with one line on stderr, no
    traceback."""
    try:
        main()
    except UserError as error:
        rank = os.environ.get("RANK", "0")
        # Before the processes joined, every rank checked the same input and found the same mistake: rank 0 says it.
        # After, a rank can fail on its own (its rows, its GPU): each says what stopped it.
        if rank == "0" or processes_joined():
            print(f"error{'' if rank == '0' else f' (rank {rank})'}: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"error: {interrupted}", file=sys.stderr)
        sys.exit(130)
    except Exception as error:
        if is_out_of_memory(error):
            print(f"error: {OOM_HINT}", file=sys.stderr)
            sys.exit(3)
        raise


def is_out_of_memory(error: BaseException) -> bool:
    return type(error).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(error)


def processes_joined() -> bool:
    """Whether this process joined torchrun's process group (without importing torch, which this module must not)."""
    dist = sys.modules.get("torch.distributed")
    return bool(dist and dist.is_available() and dist.is_initialized())
