"""Command-line overrides for a recipe's hyperparameter dataclass.

Every field of the dataclass is a flag (`learning_rate` -> `--learning-rate 1e-4`); `--help` prints each field with
its default and the reason written beside it in the recipe. Precedence, lowest first: the card's defaults, the
recipe's smoke values (with --smoke), a --config YAML file, a resumed run's config.json, then the flags themselves.
A flag or YAML key that is no field of the recipe is kept for the trainer's arguments (`--save-total-limit 3` reaches
SFTConfig); common.session checks it names a field there. Values a run cannot use (a negative learning rate, rank 0)
are refused here, in one line, before anything loads.

This module imports nothing heavy: `./run.sh <recipe> --help` and a mistyped flag answer before Unsloth is imported.
"""
import dataclasses
import difflib
import inspect
import json
import os
import re
import sys
import types
import typing
from pathlib import Path

from common.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
COLAB_DRIVE = Path("/content/drive")  # where Colab mounts Google Drive (drive.mount)


@dataclasses.dataclass
class RunOptions:
    """How to run, as opposed to what to train: shared by every recipe."""
    smoke: bool = False  # tiny random-init model + bundled sample data, offline, CPU, about a minute
    resume: str = ""  # a run folder to continue from its newest complete checkpoint
    config: str = ""  # a YAML file of field values, overridden by flags
    output_dir: str = str(REPO_ROOT / "outputs")  # runs land in <output_dir>/<recipe>/<UTC timestamp>/
    precision: str = "auto"  # auto|bf16|fp16|fp32; auto: bf16 from compute capability 8.0 (A100, H100), fp16 below (T4)
    stop_after_step: int = 0  # end this session after step N with a checkpoint, to --resume later (Colab limits)
    scale_batch: bool = False  # ./run.sh --gpus N (torchrun) divides accumulation by N; this keeps it: N x the batch
    report_to: str = "none"  # none|tensorboard|wandb|trackio, comma-separated: TRL's loggers (TensorBoard: <run>/tensorboard)
    # Flags and YAML keys that are no field of the recipe: the trainer's own arguments (SFTConfig), checked by
    # common.session against the trainer's argument class and applied over the recipe's values.
    trainer_fields: dict = dataclasses.field(default_factory=dict, metadata={"flag": False})


def _is_flag(field) -> bool:
    return field.metadata.get("flag", True)


# What a value must be for a run to use it, by field name, for whichever recipe has the field: checked before anything
# loads, so a typo costs a second instead of a model load and a traceback from the optimiser.
AT_LEAST_ONE = (lambda v: v >= 1, "at least 1")
VALUE_RULES = {
    "learning_rate": (lambda v: v > 0, "a positive number, e.g. 2e-4"),
    "max_steps": (lambda v: v >= 1, "at least 1 (the recipes count optimizer steps, not epochs)"),
    "lora_r": AT_LEAST_ONE,
    "lora_alpha": (lambda v: v is None or v > 0, "a positive number"),
    "lora_dropout": (lambda v: 0 <= v < 1, "at least 0 and below 1"),
    "eval_fraction": (lambda v: 0 <= v < 1, "at least 0 and below 1: the share of conversations held out"),
    "holdout_fraction": (lambda v: 0 < v < 0.5, "between 0 and 0.5"),
    "weight_decay": (lambda v: v >= 0, "0 or more"),
    "warmup_steps": (lambda v: v >= 0, "0 or more"),
    "max_samples": (lambda v: v >= 0, "0 (every row) or more"),
    "sample_prompts": (lambda v: v >= 0, "0 or more"),
    **{name: AT_LEAST_ONE for name in (
        "max_seq_length", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
        "eval_steps", "save_steps", "max_eval_samples", "max_new_tokens", "score_batch_size")},
}


def check_values(cfg):
    """A one-line UserError for the first field whose value a run cannot use (VALUE_RULES)."""
    for field in dataclasses.fields(cfg):
        rule = VALUE_RULES.get(field.name)
        value = getattr(cfg, field.name)
        if rule and not isinstance(value, (str, tuple, list)) and not rule[0](value):
            raise UserError(f"{_flag(field.name)} {value}: must be {rule[1]}")


def field_reasons(cls) -> dict[str, str]:
    """The `# reason` written after each field in the class source: the recipe's single source of help text."""
    reasons = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"\s*(\w+)\s*:[^=]*=.*?#\s*(.+)$", line)
        if match:
            reasons[match.group(1)] = match.group(2).strip()
    return reasons


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def convert(value, annotation, flag: str):
    """Turn a flag's text (or a YAML/JSON value) into the field's type; a bad value is a one-line UserError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return convert(value, options[0], flag)
    if origin in (list, tuple):
        (item_type, *_) = typing.get_args(annotation) or (str,)
        items = value.split(",") if isinstance(value, str) else list(value)
        return [convert(item.strip() if isinstance(item, str) else item, item_type, flag) for item in items if item != ""]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise UserError(f"{flag} expects true or false, got {value!r}")
    try:
        return annotation(value)
    except (TypeError, ValueError):
        raise UserError(f"{flag} expects {annotation.__name__}, got {value!r}") from None


def _apply(target, values: dict, source: str):
    hints = typing.get_type_hints(type(target))
    for name, value in values.items():
        if name not in hints:
            raise UserError(f"{source}: unknown field {name!r}; see --help for the fields")
        setattr(target, name, convert(value, hints[name], f"{source}: {name}" if source != "flags" else _flag(name)))


def _split_fields(values: dict, known: set[str], source: str) -> tuple[dict, dict]:
    """(the recipe's fields, the rest: trainer arguments). A name close to a recipe field is a typo, refused now."""
    trainer = {name: value for name, value in values.items() if name not in known}
    for name in trainer:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        if close:
            where = f"unknown flag {_flag(name)}" if source == "flags" else f"{source}: unknown field {name!r}"
            raise UserError(f"{where}; did you mean {_flag(close[0]) if source == 'flags' else repr(close[0])}? "
                            "(--help lists the fields)")
    return {name: value for name, value in values.items() if name in known}, trainer


def _help(config_cls, smoke: dict, prog: str) -> str:
    lines = [f"usage: {prog} [--field value ...]", "", inspect.cleandoc(config_cls.__doc__ or ""), "", "hyperparameters:"]
    for cls in (config_cls, RunOptions):
        reasons = field_reasons(cls)
        for field in filter(_is_flag, dataclasses.fields(cls)):
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            default = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
            smoke_note = f" [smoke: {smoke[field.name]}]" if field.name in smoke else ""
            lines.append(f"  {_flag(field.name):<30} {default}")
            lines.append(f"  {'':<30}   {reasons.get(field.name, '')}{smoke_note}")
        if cls is config_cls:
            lines += ["", "run options:"]
    lines += ["", "trainer arguments: any other field of TRL's SFTConfig (transformers' TrainingArguments) as a flag or "
              "--config key, e.g. --save-total-limit 3 --max-grad-norm 0.5; it wins over the recipe's value"]
    return "\n".join(lines)


def _parse_flags(argv: list[str]) -> dict[str, str]:
    values, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise UserError(f"unexpected argument {arg!r}; flags look like --learning-rate 1e-4")
        key, has_value, value = arg[2:].partition("=")
        name = key.replace("-", "_")
        if not has_value:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                value = "true"  # a bare flag switches a boolean on; other types then fail with their message
        values[name] = value
        i += 1
    return values


def load_yaml(path: str) -> dict:
    import yaml
    if not Path(path).is_file():
        raise UserError(f"--config {path}: file not found")
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"--config {path}:{where} is not valid YAML; fix the file") from None
    if not isinstance(loaded, dict):
        raise UserError(f"--config {path}: expected a mapping of field: value")
    return {str(k).replace("-", "_"): v for k, v in loaded.items()}


def check_drive_mounted(flag: str, path: str, drive: Path = COLAB_DRIVE):
    """A path on Colab's Drive while Drive is not mounted would land on the runtime's own disk and vanish with it."""
    if path and drive in Path(path).absolute().parents and not os.path.ismount(drive):
        raise UserError(f"{flag} {path}: Google Drive is not mounted at {drive}; run "
                        f"`from google.colab import drive; drive.mount('{drive}')` in a cell first")


def usage_name(recipe: str) -> str:
    """How the user started the recipe, for --help and the manifest: run.sh says so in FT_LAUNCHER."""
    return os.environ.get("FT_LAUNCHER", f"python -m recipes.{recipe}")


def parse(config_cls, argv: list[str] | None = None, smoke: dict | None = None, recipe: str | None = None):
    """Return (cfg, run): the recipe's hyperparameters and the run options, resolved in the documented order, each
    value checked (VALUE_RULES)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    smoke = smoke or {}
    recipe = recipe or Path(sys.argv[0]).stem
    if "-h" in argv or "--help" in argv:
        print(_help(config_cls, smoke, usage_name(recipe)))
        sys.exit(0)
    cfg, run = config_cls(), RunOptions()
    config_fields = {f.name for f in dataclasses.fields(config_cls)}
    run_fields = {f.name for f in filter(_is_flag, dataclasses.fields(RunOptions))}
    flags, trainer_flags = _split_fields(_parse_flags(argv), config_fields | run_fields, "flags")
    _apply(run, {k: v for k, v in flags.items() if k in run_fields}, "flags")
    check_drive_mounted("--output-dir", run.output_dir)
    check_drive_mounted("--resume", run.resume)
    if run.smoke:
        _apply(cfg, smoke, "smoke values")
    if run.config:
        from_yaml, trainer_yaml = _split_fields(load_yaml(run.config), config_fields, run.config)
        _apply(cfg, from_yaml, run.config)
        run.trainer_fields.update(trainer_yaml)
    if run.resume:
        saved_run = saved_config(run.resume, recipe)
        _apply(cfg, saved_run["hyperparameters"], str(Path(run.resume) / "config.json"))
        run.smoke = saved_run["run"]["smoke"]
        run.scale_batch = saved_run["run"].get("scale_batch", False)  # the batch the checkpoints were trained with
        run.trainer_fields.update(saved_run["run"].get("trainer_fields", {}))
    _apply(cfg, {k: v for k, v in flags.items() if k in config_fields}, "flags")
    run.trainer_fields.update(trainer_flags)
    if run.precision not in ("auto", "bf16", "fp16", "fp32"):
        raise UserError(f"--precision expects auto, bf16, fp16 or fp32, got {run.precision!r}")
    check_values(cfg)
    return cfg, run


def saved_config(run_dir: str, recipe: str) -> dict:
    """A run folder's config.json, refused in one line unless it is a run of `recipe`: another recipe's fields would
    otherwise read as unknown ones."""
    saved = Path(run_dir) / "config.json"
    if not saved.is_file():
        raise UserError(f"--resume {run_dir}: no config.json there; pass a run folder under outputs/")
    config = json.loads(saved.read_text())
    # Folders written before config.json named its recipe sit in outputs/<recipe>/<stamp>.
    owner = config.get("recipe") or Path(run_dir).resolve().parent.name
    if owner != recipe:
        raise UserError(f"--resume {run_dir}: that folder is a {owner} run; continue it with "
                        f"./run.sh {owner} --resume {run_dir}")
    return config
