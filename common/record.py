"""run.json: what a run folder holds and how to load it, written by every recipe and read by `./run.sh chat|export`.

Written when the run starts (so a checkpoint of a stopped run chats as trained) and again when it finishes, with the
adapters and the final metrics. Folders written before run.json existed are read from their config.json, manifest.json
and adapter_config.json, in `from_legacy_folder` alone.
"""
import dataclasses
import json
from pathlib import Path

SCHEMA = 1


@dataclasses.dataclass
class Adapter:
    path: str  # relative to the run folder
    base_model: str  # what it was trained on: a hub id or a folder (a smoke run's smoke-base/)
    load_in_4bit: bool  # trained on a 4-bit base: chat and export load the base the same way


@dataclasses.dataclass
class RunRecord:
    recipe: str
    base_model: str  # the model the run trained on
    card_model: str  # the recipe's default model: differs from base_model for a smoke run or --model-name
    smoke: bool  # trained on a tiny random-init model of the card's architecture: for checking the pipeline only
    load_in_4bit: bool
    chat_template: str | None  # the template's name (the adapter's tokenizer holds the template itself)
    system_prompt: str | None  # what the run put first in every conversation that had none
    adapters: list[Adapter] = dataclasses.field(default_factory=list)  # the first is the one chat and export use
    metrics: dict = dataclasses.field(default_factory=dict)  # the run's final figures (empty until it finishes)
    schema: int = SCHEMA

    def write(self, folder: Path):
        (Path(folder) / "run.json").write_text(json.dumps(dataclasses.asdict(self), indent=2, default=str) + "\n")

    def adapter_at(self, folder: Path, path: Path) -> Adapter | None:
        """The recorded adapter stored at `path` (None for an adapter folder the record does not list: a checkpoint)."""
        return next((a for a in self.adapters if (Path(folder) / a.path).resolve() == Path(path).resolve()), None)


def read(folder: Path) -> RunRecord:
    """The record of the run in `folder`: its run.json, or the same read from a folder written before run.json."""
    path = Path(folder) / "run.json"
    if not path.is_file():
        return from_legacy_folder(Path(folder))
    saved = json.loads(path.read_text())
    saved["adapters"] = [Adapter(**adapter) for adapter in saved.get("adapters", [])]
    return RunRecord(**saved)


def from_legacy_folder(folder: Path) -> RunRecord:
    """A run folder from before run.json: the system prompt sat in the hyperparameters, config.json's recipe_constants
    or the manifest; GPT-2's study listed each adapter with its quantization in the manifest's runs."""
    config = json.loads((folder / "config.json").read_text())
    manifest = json.loads((folder / "manifest.json").read_text()) if (folder / "manifest.json").is_file() else {}
    hyperparameters = config.get("hyperparameters", {})
    adapter_config = folder / "adapter" / "adapter_config.json"
    base = json.loads(adapter_config.read_text()).get("base_model_name_or_path", "") if adapter_config.is_file() else ""
    load_in_4bit = bool(manifest.get("load_in_4bit", hyperparameters.get("load_in_4bit", True)))
    adapters = [Adapter("adapter", base, load_in_4bit)] if base else []
    for trained in manifest.get("runs", []):
        if "adapter" in trained:
            adapters.append(Adapter(trained["adapter"], base, trained.get("quantization") is not None))
    return RunRecord(
        recipe=manifest.get("recipe", folder.parent.name), base_model=base,
        card_model=hyperparameters.get("model_name", base), smoke=bool(config.get("run", {}).get("smoke")),
        load_in_4bit=load_in_4bit, chat_template=hyperparameters.get("chat_template"),
        system_prompt=(hyperparameters.get("system_prompt") or config.get("recipe_constants", {}).get("system_prompt")
                       or manifest.get("system_prompt") or None),
        adapters=adapters, metrics={})
