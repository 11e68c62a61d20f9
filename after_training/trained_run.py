"""A finished run folder, read back: which adapter, on which base, with which system prompt, and how to load it.

`./run.sh chat` and `./run.sh export` both start here, so they load a run the same way it was trained: the adapter
folder holds the LoRA weights, the tokenizer with the run's chat template, and (in adapter_config.json) the base model.
"""
import functools
import json
from dataclasses import dataclass
from pathlib import Path

from common.data import file_sha256
from common.errors import UserError
from common.outputs import RunFolder


@dataclass
class TrainedRun:
    path: Path
    recipe: str
    adapter: Path
    base_model: str
    hyperparameters: dict
    manifest: dict
    recipe_constants: dict  # what a recipe fixes outside its hyperparameters, saved at the start (a system prompt)
    smoke: bool  # trained on a tiny random model: outputs are for checking the pipeline, not for use

    @property
    def system_prompt(self) -> str | None:
        """The system prompt the run trained with, where it had one (a recipe field or a recipe constant)."""
        return (self.hyperparameters.get("system_prompt") or self.recipe_constants.get("system_prompt")
                or self.manifest.get("system_prompt") or None)  # the manifest: runs from before recipe_constants

    @functools.cached_property
    def adapter_sha256(self) -> str | None:
        """The adapter weights' hash, read once: an export's card names it, and an export is reused only for it."""
        return file_sha256(str(self.adapter / "adapter_model.safetensors"))

    @property
    def max_seq_length(self) -> int:
        return int(self.hyperparameters.get("max_seq_length") or 2048)

    @property
    def load_in_4bit(self) -> bool:
        """Whether the adapter was trained on a 4-bit base. Where a run trains both ways (GPT-2's study) its manifest
        lists each adapter with the quantization it trained on; elsewhere the hyperparameters say."""
        for trained in self.manifest.get("runs", []):
            if "adapter" in trained and (self.path / trained["adapter"]).resolve() == self.adapter.resolve():
                return trained.get("quantization") is not None
        return bool(self.manifest.get("load_in_4bit", self.hyperparameters.get("load_in_4bit", True)))


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
    base_model = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_model:
        raise UserError(f"{adapter_dir / 'adapter_config.json'}: no base_model_name_or_path; the adapter cannot be loaded")
    return TrainedRun(path=path, recipe=manifest.get("recipe", path.parent.name), adapter=adapter_dir,
                      base_model=base_model, hyperparameters=config.get("hyperparameters", {}), manifest=manifest,
                      recipe_constants=config.get("recipe_constants", {}), smoke=bool(config.get("run", {}).get("smoke")))


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
