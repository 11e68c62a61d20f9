"""Several GPUs, one run: a recipe started by torchrun (./run.sh <recipe> --gpus N) or `accelerate launch` trains data
parallel, and rank 0 alone writes the run folder.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE for each process; the Trainer (through accelerate) wraps the model in
DistributedDataParallel and gives each rank different batches. What this module adds: the process group joined early
(so rank 0 can create the run folder and tell the others its path), the card's effective batch kept by dividing the
accumulation, and the readings every rank takes combined into one.
"""
import contextlib
import os
import sys

import torch
import torch.distributed as dist

from common.errors import UserError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def start():
    """Join the process group torchrun prepared (NCCL between GPUs, gloo between CPU processes), each process on its
    own GPU; other ranks' stdout is silenced so the log reads as one run's. Nothing to do in a single process."""
    if world_size() == 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"{world_size()} processes on a machine with {torch.cuda.device_count()} GPU(s); "
                            f"use --gpus {torch.cuda.device_count()} or fewer")
        torch.cuda.set_device(local_rank)
    else:
        # accelerate gives each CPU process the device cpu:<rank>, which the Trainer passes to torch.load to resume a
        # checkpoint; torch knows only "cpu" as a location, so it is taught that cpu:<n> is the CPU too.
        torch.serialization.register_package(
            100, lambda storage: None, lambda storage, location: storage if location.startswith("cpu:") else None)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if not is_main():
        sys.stdout = open(os.devnull, "w")


def refuse(recipe: str, reason: str):
    """For a recipe (or a mode of one) that one process must run: one line, before anything is written."""
    if world_size() > 1:
        raise UserError(f"{recipe} runs in one process ({reason}); start it without --gpus / torchrun")


def accumulation_per_rank(gradient_accumulation_steps: int, scale_batch: bool, smoke: bool = False) -> int:
    """The card's effective batch (rows a pass x accumulation) kept across N ranks: each rank accumulates 1/N of the
    steps. With --scale-batch each rank keeps the card's accumulation and the effective batch grows N times; so does a
    --smoke run whose accumulation does not divide (it checks the wiring, not the card's batch)."""
    ranks = world_size()
    if scale_batch or ranks == 1:
        return gradient_accumulation_steps
    if gradient_accumulation_steps % ranks:
        if smoke:
            print(f"smoke: accumulation {gradient_accumulation_steps} does not divide over {ranks} processes; each "
                  f"keeps it (effective batch x{ranks})")
            return gradient_accumulation_steps
        raise UserError(f"--gradient-accumulation-steps {gradient_accumulation_steps} does not divide over {ranks} "
                        f"GPUs, so the card's effective batch cannot be kept; pass a multiple of {ranks}, "
                        f"or --scale-batch to keep each GPU's accumulation")
    return gradient_accumulation_steps // ranks


def processes_line() -> str:
    """'1 process', '2 GPUs' or, without a GPU, '2 CPU processes': what the run is spread over."""
    ranks = world_size()
    if ranks == 1:
        return "1 process"
    return f"{ranks} GPUs" if torch.cuda.is_available() else f"{ranks} CPU processes"


def batch_layout(per_device_train_batch_size: int, gradient_accumulation_steps: int) -> dict:
    """The manifest's record of how a step's rows were spread (accumulation: each rank's)."""
    return {"world_size": world_size(), "per_device_train_batch_size": per_device_train_batch_size,
            "gradient_accumulation_steps": gradient_accumulation_steps,
            "effective_batch": per_device_train_batch_size * gradient_accumulation_steps * world_size()}


def only_main_continues():
    """After the last work every rank shares (training, the final evaluation): the other ranks end here, and rank 0
    alone goes on to generate samples and write the adapter and results."""
    if world_size() == 1:
        return
    dist.barrier()
    dist.destroy_process_group()
    if not is_main():
        sys.exit(0)


def from_main(value):
    """Rank 0's `value` on every rank (a run folder's path, say)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (it writes, e.g. the smoke model or a resumed folder's cleanup), then the others
    run it and find the work done."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def barrier():
    if world_size() > 1:
        dist.barrier()


def largest(value: int) -> int:
    """The largest of every rank's `value` (its own without torchrun)."""
    if world_size() == 1:
        return value
    tensor = torch.tensor([value], device=torch.device("cuda", torch.cuda.current_device())
                          if torch.cuda.is_available() else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor)


def gathered(value: float | None) -> list[float | None]:
    """Every rank's value, in rank order (rank 0's alone without torchrun)."""
    if world_size() == 1:
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values
