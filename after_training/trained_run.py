"""A finished run folder, read back: which adapter, on which base, with which system prompt, and how to load it.

`./run.sh chat` and `./run.sh export` both start here, so they load a run the same way it was trained: run.json says
what the run trained and with which system prompt (common/record.py; older folders are read there too), the adapter
folder holds the LoRA weights, the tokenizer with the run's chat template, and (in adapter_config.json) the base model.
"""
import functools
import json
from dataclasses import dataclass
from pathlib import Path

from common import record
from common.data import file_sha256
from common.errors import UserError
from common.outputs import RunFolder


@dataclass
class TrainedRun:
    path: Path
    adapter: Path
    record: record.RunRecord  # run.json (or its equivalent read from an older folder)
    hyperparameters: dict
    manifest: dict

    @property
    def recipe(self) -> str:
        return self.record.recipe

    @property
    def smoke(self) -> bool:
        """Trained on a tiny random model: outputs are for checking the pipeline, not for use."""
        return self.record.smoke

    @property
    def system_prompt(self) -> str | None:
        return self.record.system_prompt

    @property
    def base_model(self) -> str:
        """What the adapter was trained on, as its adapter_config.json names it (a checkpoint's too)."""
        return json.loads((self.adapter / "adapter_config.json").read_text())["base_model_name_or_path"]

    @functools.cached_property
    def adapter_sha256(self) -> str | None:
        """The adapter weights' hash, read once: an export's card names it, and an export is reused only for it."""
        return file_sha256(str(self.adapter / "adapter_model.safetensors"))

    @property
    def max_seq_length(self) -> int:
        return int(self.hyperparameters.get("max_seq_length") or 2048)

    @property
    def load_in_4bit(self) -> bool:
        """Whether the adapter was trained on a 4-bit base: as the record lists it (a run may train both ways, as
        GPT-2's study does), else, for a checkpoint, as the run does."""
        listed = self.record.adapter_at(self.path, self.adapter)
        return listed.load_in_4bit if listed else self.record.load_in_4bit


def open_run(run_dir: str, adapter: str | None = None) -> TrainedRun:
    """The run at `run_dir`, with its adapter/ (or the adapter folder given, e.g. a checkpoint); one-line errors."""
    path = Path(run_dir)
    if not (path / "config.json").is_file():
        raise UserError(f"{run_dir}: not a run folder (no config.json); pass outputs/<recipe>/<stamp>")
    config = json.loads((path / "config.json").read_text())
    manifest = json.loads((path / "manifest.json").read_text()) if (path / "manifest.json").is_file() else {}
    adapter_dir = Path(adapter) if adapter else path / "adapter"
    if not (adapter_dir / "adapter_config.json").is_file():
        if adapter:
            raise UserError(f"--adapter {adapter}: no adapter_config.json there; pass an adapter or checkpoint folder")
        unfinished = next((marker for marker in ("FAILED", "STOPPED") if (path / marker).is_file()), None)
        why = f"the run is {unfinished}: {(path / unfinished).read_text().strip()}" if unfinished else "the run has not finished"
        newest = RunFolder(path).last_checkpoint()
        hint = f"; or try a checkpoint with --adapter {newest}" if newest else ""
        raise UserError(f"{run_dir}: no adapter/ yet ({why}){hint}")
    if not json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path"):
        raise UserError(f"{adapter_dir / 'adapter_config.json'}: no base_model_name_or_path; the adapter cannot be loaded")
    return TrainedRun(path=path, adapter=adapter_dir, record=record.read(path),
                      hyperparameters=config.get("hyperparameters", {}), manifest=manifest)


def load_trained(run: TrainedRun, precision: str, load_in_4bit: bool | None = None):
    """(model, tokenizer): the base model with the run's adapter on top, through Unsloth, ready to generate.

    4-bit on a GPU as trained, unless load_in_4bit says otherwise; on CPU Unsloth's backend merges only 16-bit weights,
    so a CPU export asks for those."""
    from unsloth import FastLanguageModel

    from common.model import load_model
    model, tokenizer = load_model(str(run.adapter), run.max_seq_length, precision,
                                  run.load_in_4bit if load_in_4bit is None else load_in_4bit,
                                  fix=f"its base model {run.base_model!r} (base_model_name_or_path in "
                                      f"{run.adapter / 'adapter_config.json'}) must be in the Hugging Face cache or "
                                      "downloadable")
    FastLanguageModel.for_inference(model)
    return model, tokenizer
