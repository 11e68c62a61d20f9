"""torchrun for ./run.sh --gpus N: torch.distributed.run itself, with a stop or a failure ending in the workers' own
lines rather than the launcher's traceback.

  python -m common.launch --standalone --nproc_per_node 2 -m recipes.llama3_8b ...   (the arguments are torchrun's)

A SIGTERM or Ctrl-C reaches torchrun, which passes it to every worker: each finishes its step, the ranks agree on the
step to stop after (common.callbacks.StopOnRequest), rank 0 checkpoints and marks the run STOPPED. torchrun waits
SHUTDOWN_GRACE_S for that before it kills them (its own default, 30 s, can cut a checkpoint of an 8B model short).
"""
import logging
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, main

SHUTDOWN_GRACE_S = 600


def torchrun_arguments(arguments: list[str]) -> list[str]:
    """The arguments with the shutdown grace added, where this torch's torchrun has the option (torch 2.6 and later)."""
    _, unknown = get_args_parser().parse_known_args(["--shutdown-timeout", "1", "script.py"])
    return arguments if "--shutdown-timeout" in unknown else ["--shutdown-timeout", str(SHUTDOWN_GRACE_S), *arguments]


if __name__ == "__main__":
    # torchrun logs each failed worker again ("failed (exitcode: 2) local_rank: 0 ..."): the workers said why, and the
    # line below says how many stopped.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        main(torchrun_arguments(sys.argv[1:]))
    except SignalException as stopped:  # the workers said what they did (STOPPED and how to resume)
        sys.exit(128 + int(stopped.sigval))
    except ChildFailedError as failed:
        first = min(failed.failures.values(), key=lambda failure: failure.timestamp)
        exit_code = first.exitcode if first.exitcode > 0 else 128 - first.exitcode  # a signal comes as -N
        print(f"error: {len(failed.failures)} of the processes stopped with an error (first: rank {first.local_rank}, "
              f"exit {exit_code}); their messages are above", file=sys.stderr)
        sys.exit(exit_code)
