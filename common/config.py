"""Command-line overrides for a recipe's hyperparameter dataclass.

Every field of the dataclass is a flag (`learning_rate` -> `--learning-rate 1e-4`); `--help` prints each field with
its default and the reason written beside it in the recipe. Precedence, lowest first: the card's defaults, the
recipe's smoke values (with --smoke), a --config YAML file, a resumed run's config.json, then the flags themselves.
"""
import dataclasses
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
    precision: str = os.environ.get("FT_PRECISION", "auto")  # auto|bf16|fp16|fp32; run.sh passes its detection
    stop_after_step: int = 0  # end this session after step N with a checkpoint, to --resume later (Colab limits)
    scale_batch: bool = False  # ./run.sh --gpus N (torchrun) divides accumulation by N; this keeps it: N x the batch
    report_to: str = "none"  # none|tensorboard|wandb|trackio, comma-separated: TRL's loggers (TensorBoard: <run>/tensorboard)


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


def _convert(value, annotation, flag: str):
    """Turn a flag's text (or a YAML/JSON value) into the field's type; a bad value is a one-line UserError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _convert(value, options[0], flag)
    if origin in (list, tuple):
        (item_type, *_) = typing.get_args(annotation) or (str,)
        items = value.split(",") if isinstance(value, str) else list(value)
        return [_convert(item.strip() if isinstance(item, str) else item, item_type, flag) for item in items if item != ""]
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
        setattr(target, name, _convert(value, hints[name], f"{source}: {name}" if source != "flags" else _flag(name)))


def _help(config_cls, smoke: dict, prog: str) -> str:
    lines = [f"usage: {prog} [--field value ...]", "", inspect.cleandoc(config_cls.__doc__ or ""), "", "hyperparameters:"]
    for cls in (config_cls, RunOptions):
        reasons = field_reasons(cls)
        for field in dataclasses.fields(cls):
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            smoke_note = f" [smoke: {smoke[field.name]}]" if field.name in smoke else ""
            lines.append(f"  {_flag(field.name):<34} {default!s:<22} {reasons.get(field.name, '')}{smoke_note}")
        if cls is config_cls:
            lines += ["", "run options:"]
    return "\n".join(lines)


def _parse_flags(argv: list[str], known: set[str]) -> dict[str, str]:
    values, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}; flags look like --learning-rate 1e-4")
        key, has_value, value = arg[2:].partition("=")
        name = key.replace("-", "_")
        if name not in known:
            raise UserError(f"unknown flag {arg.split('=')[0]}; run with --help to list the flags")
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


def parse(config_cls, argv: list[str] | None = None, smoke: dict | None = None):
    """Return (cfg, run): the recipe's hyperparameters and the run options, resolved in the documented order."""
    argv = sys.argv[1:] if argv is None else list(argv)
    smoke = smoke or {}
    if "-h" in argv or "--help" in argv:
        print(_help(config_cls, smoke, Path(sys.argv[0]).name))
        sys.exit(0)
    cfg, run = config_cls(), RunOptions()
    config_fields = {f.name for f in dataclasses.fields(config_cls)}
    run_fields = {f.name for f in dataclasses.fields(RunOptions)}
    flags = _parse_flags(argv, config_fields | run_fields)
    _apply(run, {k: v for k, v in flags.items() if k in run_fields}, "flags")
    check_drive_mounted("--output-dir", run.output_dir)
    check_drive_mounted("--resume", run.resume)
    if run.smoke:
        _apply(cfg, smoke, "smoke values")
    if run.config:
        _apply(cfg, load_yaml(run.config), run.config)
    if run.resume:
        saved = Path(run.resume) / "config.json"
        if not saved.is_file():
            raise UserError(f"--resume {run.resume}: no config.json there; pass a run folder under outputs/")
        saved_run = json.loads(saved.read_text())
        _apply(cfg, saved_run["hyperparameters"], str(saved))
        run.smoke = saved_run["run"]["smoke"]
        run.scale_batch = saved_run["run"].get("scale_batch", False)  # the batch the checkpoints were trained with
    _apply(cfg, {k: v for k, v in flags.items() if k in config_fields}, "flags")
    if run.precision not in ("auto", "bf16", "fp16", "fp32"):
        raise UserError(f"--precision expects auto, bf16, fp16 or fp32, got {run.precision!r}")
    return cfg, run
