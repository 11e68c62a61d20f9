"""torchrun for ./run.sh --gpus N: torch.distributed.run itself, with a failed run ending in its workers' own one-line
errors rather than the launcher's traceback.

  python -m common.launch --standalone --nproc_per_node 2 -m recipes.llama3_8b ...   (the arguments are torchrun's)
"""
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main

if __name__ == "__main__":
    try:
        main()
    except ChildFailedError as failed:
        first = min(failed.failures.values(), key=lambda failure: failure.timestamp)
        exit_code = first.exitcode if first.exitcode > 0 else 128 - first.exitcode  # a signal comes as -N
        print(f"error: {len(failed.failures)} of the processes stopped with an error (first: rank {first.local_rank}, "
              f"exit {exit_code}); their messages are above", file=sys.stderr)
        sys.exit(exit_code)
