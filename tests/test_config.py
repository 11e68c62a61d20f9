"""Flags override dataclass fields with type checking; --help lists each field's reason; bad input is one line."""
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.config import check_drive_mounted, field_reasons, parse
from common.errors import UserError


@dataclass
class Card:
    """A card for tests."""
    learning_rate: float = 2e-4  # card: the usual LoRA rate
    max_steps: int = 60  # card: short run
    load_in_4bit: bool = True  # fits a T4
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")  # attention only
    ranks: tuple[int, ...] = (2, 4)  # the study's ranks
    lora_alpha: int | None = None  # None means 2 x rank


def test_defaults_and_overrides_with_types():
    cfg, run = parse(Card, ["--learning-rate", "1e-4", "--max-steps=7", "--load-in-4bit", "false",
                            "--target-modules", "gate_proj,up_proj", "--ranks", "8,16", "--lora-alpha", "32"])
    assert cfg.learning_rate == 1e-4 and cfg.max_steps == 7 and cfg.load_in_4bit is False
    assert list(cfg.target_modules) == ["gate_proj", "up_proj"] and list(cfg.ranks) == [8, 16]
    assert cfg.lora_alpha == 32 and run.smoke is False
    assert parse(Card, [])[0] == Card()


def test_bare_boolean_flag_and_smoke_values_lose_to_flags():
    cfg, run = parse(Card, ["--smoke", "--max-steps", "3"], smoke={"max_steps": 5, "learning_rate": 1e-3})
    assert run.smoke and cfg.max_steps == 3 and cfg.learning_rate == 1e-3


@pytest.mark.parametrize("argv, message", [
    (["--learning-rate", "abc"], "--learning-rate expects float, got 'abc'"),
    (["--max-steps", "1.5"], "--max-steps expects int, got '1.5'"),
    (["--load-in-4bit", "maybe"], "--load-in-4bit expects true or false, got 'maybe'"),
    (["--learning-rat", "1"], "unknown flag --learning-rat; run with --help to list the flags"),
    (["stray"], "unexpected argument 'stray'"),
    (["--precision", "fp8"], "--precision expects auto, bf16, fp16 or fp32, got 'fp8'"),
])
def test_bad_flags_are_one_line_errors(argv, message):
    with pytest.raises(UserError) as error:
        parse(Card, argv)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_yaml_config_sits_between_defaults_and_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning-rate: 3.0e-4\nmax_steps: 9\n")
    cfg, _ = parse(Card, ["--config", str(config), "--max-steps", "11"])
    assert cfg.learning_rate == 3e-4 and cfg.max_steps == 11
    config.write_text("max_step: 9\n")
    with pytest.raises(UserError, match="unknown field 'max_step'"):
        parse(Card, ["--config", str(config)])
    config.write_text("max_steps: [1\n")
    with pytest.raises(UserError, match=r"run.yaml: line \d+ is not valid YAML; fix the file"):
        parse(Card, ["--config", str(config)])


def test_help_lists_every_field_with_default_and_reason(capsys):
    assert field_reasons(Card)["learning_rate"] == "card: the usual LoRA rate"
    with pytest.raises(SystemExit) as exit_code:
        parse(Card, ["--help"], smoke={"max_steps": 5})
    assert exit_code.value.code == 0
    text = capsys.readouterr().out
    assert "--learning-rate" in text and "0.0002" in text and "card: the usual LoRA rate" in text
    assert "[smoke: 5]" in text and "--stop-after-step" in text and "--resume" in text


def test_a_path_on_an_unmounted_colab_drive_is_refused(tmp_path, monkeypatch):
    drive = tmp_path / "drive"  # stands where Colab mounts Drive; a plain folder here, as before drive.mount()
    runs = drive / "MyDrive" / "runs"
    with pytest.raises(UserError, match=r"--output-dir .*: Google Drive is not mounted at .*drive\.mount"):
        check_drive_mounted("--output-dir", str(runs), drive)
    check_drive_mounted("--output-dir", str(tmp_path / "elsewhere"), drive)
    monkeypatch.setattr("os.path.ismount", lambda path: Path(path) == drive)  # after drive.mount()
    check_drive_mounted("--output-dir", str(runs), drive)
    monkeypatch.undo()
    with pytest.raises(UserError, match=r"--resume .*/content/drive/MyDrive/runs/r/1: Google Drive is not mounted"):
        parse(Card, ["--resume", "/content/drive/MyDrive/runs/r/1"])
