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
    seed: int = 7  # the run's seed


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
    (["--learning-rat", "1"], "unknown flag --learning-rat; did you mean --learning-rate? (--help lists the fields)"),
    (["--learning-rate", "-1e-4"], "--learning-rate -0.0001: must be a positive number, e.g. 2e-4"),
    (["--max-steps", "-5"], "--max-steps -5: must be at least 1 (the recipes count optimizer steps, not epochs)"),
    (["--lora-alpha", "0"], "--lora-alpha 0: must be a positive number"),
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


def test_fields_that_are_not_the_recipes_are_kept_for_the_trainer(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("save_total_limit: 5\nmax_grad_norm: 0.5\n")
    _, run = parse(Card, ["--config", str(config), "--save-total-limit", "3", "--neftune-noise-alpha=5"])
    assert run.trainer_fields == {"save_total_limit": "3", "max_grad_norm": 0.5, "neftune_noise_alpha": "5"}


def test_trainer_arguments_take_the_cards_fields_the_recipes_and_the_users_last(tmp_path):
    import types

    from trl import SFTConfig

    from common.session import trainer_arguments
    cfg, run = parse(Card, ["--max-steps", "7", "--save-total-limit", "3", "--save-steps", "9"])
    session = types.SimpleNamespace(cfg=cfg, run=run, recipe="card", rows_a_pass=2, accumulation=4, report_to=["none"],
                                    folder=types.SimpleNamespace(checkpoints=tmp_path / "checkpoints"),
                                    hardware=types.SimpleNamespace(precision="fp32"))
    args = trainer_arguments(session, SFTConfig, save_total_limit=1, save_steps=2, logging_steps=5)
    assert (args.learning_rate, args.max_steps) == (2e-4, 7)  # the Config's fields that SFTConfig has too
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 4)  # the session's batch
    assert (args.save_total_limit, args.save_steps, args.logging_steps) == (3, 9, 5)  # flags win over the recipe
    assert args.output_dir == str(tmp_path / "checkpoints")
    session.run.trainer_fields = {"save_totl_limit": "3"}
    with pytest.raises(UserError, match=r"^unknown flag --save-totl-limit: not a field of card nor of SFTConfig"):
        trainer_arguments(session, SFTConfig)


def test_resuming_another_recipes_folder_names_that_recipe(tmp_path):
    folder = tmp_path / "outputs" / "gpt2_medium_qlora" / "20261207-000000"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"recipe": "gpt2_medium_qlora", "hyperparameters": {"ranks": [2]}, '
                                        '"run": {"smoke": true}}')
    with pytest.raises(UserError, match=r"that folder is a gpt2_medium_qlora run; continue it with "
                                        r"\./run\.sh gpt2_medium_qlora --resume "):
        parse(Card, ["--resume", str(folder)], recipe="card")


def test_preflight_answers_from_the_recipe_source_without_importing_unsloth():
    import subprocess
    import sys

    from tests.conftest import REPO
    check = ("import sys; from common.preflight import main; "
             "code = main(['recipes/llama3_8b.py', '--lora-r', '0']); "
             "print(code, sorted(m for m in ('unsloth', 'torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.stdout.split("\n")[0] == "2 []" and result.stderr.strip() == "error: --lora-r 0: must be at least 1"


@pytest.mark.parametrize("recipe", sorted(p.stem for p in Path(__file__).parent.parent.glob("recipes/*.py")
                                          if p.stem != "__init__"))
def test_preflight_reads_each_recipes_config_as_the_recipe_defines_it(recipe, capsys, monkeypatch):
    import dataclasses
    import importlib

    from common.preflight import light_recipe
    from tests.conftest import REPO
    light_config, light_smoke = light_recipe(REPO / "recipes" / f"{recipe}.py")
    module = importlib.import_module(f"recipes.{recipe}")
    assert dataclasses.asdict(light_config()) == dataclasses.asdict(module.Config()) and light_smoke == module.SMOKE
    monkeypatch.setenv("FT_LAUNCHER", f"./run.sh {recipe}")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        parse(light_config, ["--help"], light_smoke, recipe)
    assert capsys.readouterr().out.startswith(f"usage: ./run.sh {recipe} [--field value ...]")
