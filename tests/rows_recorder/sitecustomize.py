"""Put on PYTHONPATH by tests/test_multi_gpu.py: each torchrun worker (RANK set, ROWS_LOG a folder) appends the rows of
every training micro-batch it runs to ROWS_LOG/rank<RANK>.jsonl, so the test can count which rows each rank trained.
transformers' Trainer is patched once its module is imported (after Unsloth's own patches, as in a real run)."""
import importlib.abc
import importlib.util
import json
import os
import sys
from pathlib import Path


def rows_of(inputs) -> list[list[int]]:
    """The token ids of each row in a batch: padded rows cut by the attention mask, a padding-free row cut where its
    position ids restart."""
    ids = inputs["input_ids"]
    if "attention_mask" in inputs and inputs["attention_mask"] is not None:
        return [row[mask.bool()].tolist() for row, mask in zip(ids, inputs["attention_mask"])]
    positions = inputs["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
    return [ids[0, a:b].tolist() for a, b in zip(starts, starts[1:])]


def record_rows(trainer_class):
    training_step = trainer_class.training_step
    log = Path(os.environ["ROWS_LOG"]) / f"rank{os.environ['RANK']}.jsonl"

    def recording_training_step(self, model, inputs, *args, **kwargs):
        with log.open("a") as handle:
            handle.write(json.dumps({"step": self.state.global_step + 1, "rows": rows_of(inputs)}) + "\n")
        return training_step(self, model, inputs, *args, **kwargs)
    trainer_class.training_step = recording_training_step


class PatchTrainerOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "transformers.trainer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            record_rows(module.Trainer)
        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("ROWS_LOG") and os.environ.get("RANK"):
    sys.meta_path.insert(0, PatchTrainerOnImport())
