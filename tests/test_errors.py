"""Bad input through a real recipe: one line naming the problem and the fix, found before any model loads, and no run
folder left behind. One case goes through a process, for what the user sees on stderr; the others call main()."""
import json

import pytest

from common.errors import UserError
from tests.conftest import REPO, run_recipe_process

SAMPLE = REPO / "recipes" / "data" / "finetome_sample.jsonl"


def test_a_user_error_is_one_line_on_stderr_with_exit_2_and_no_folder(tmp_path):
    result = run_recipe_process("llama3_8b", "--smoke", "--data", "nowhere/data.jsonl", output_dir=tmp_path,
                                env={})  # a process of its own: what the user sees on stderr
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        "error: nowhere/data.jsonl: data file not found; check the path given to --data"
    assert not any(tmp_path.iterdir())


def unloaded(monkeypatch):
    """load_model refuses to run: each case below must be caught before any model loads."""
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")
    monkeypatch.setattr("common.model.FastLanguageModel.from_pretrained", no_load)


@pytest.mark.parametrize("args, expected", [
    (["--learning-rate", "-1e-4"], "--learning-rate -0.0001: must be a positive number, e.g. 2e-4"),
    (["--lora-r", "0"], "--lora-r 0: must be at least 1"),
    (["--max-steps", "-5"], "--max-steps -5: must be at least 1"),
    (["--eval-fraction", "1.5"], "--eval-fraction 1.5: must be at least 0 and below 1"),
    (["--data", str(SAMPLE.with_suffix(".txt"))], "data file not found"),
    (["--report-to", "wandb"], "--report-to wandb: the wandb package is not installed; pip install wandb"),
    (["--token-budget", "100"], "--token-budget 100: a pass must hold one full-length row"),
    (["--save-totl-limit", "3"], "unknown flag --save-totl-limit: not a field of llama3_8b nor of SFTConfig"),
])
def test_bad_values_are_refused_before_the_model_loads_and_leave_no_folder(args, expected, tmp_path, monkeypatch):
    import importlib.util
    from recipes.llama3_8b import main
    if args[0] == "--report-to" and importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    if args[0] != "--save-totl-limit":  # the trainer's fields are checked once the model is there to train
        unloaded(monkeypatch)
    with pytest.raises(UserError) as error:
        main(["--smoke", *args, "--output-dir", str(tmp_path)])
    assert expected in str(error.value) and "\n" not in str(error.value)
    assert not any(tmp_path.iterdir())


def test_target_modules_are_checked_against_the_architecture_before_its_weights_load(tmp_path, monkeypatch):
    from recipes.llama3_8b import main
    with pytest.raises(UserError, match=r"^--target-modules foo_proj: llama has no such layer; its linear layers are "
                                        r"down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj$"):
        unloaded(monkeypatch)
        main(["--smoke", "--target-modules", "q_proj,foo_proj", "--output-dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("content, expected", [
    ('{"conversations": []}\n{"conversations": [\n{"conv\n', "bad.jsonl: 2 of 3 lines are not a JSON object (lines 2, 3)"),
    ('{"prompt": "p", "reply": "r"}\n', "bad.jsonl: no supported format; found columns ['prompt', 'reply']"),
    ("", "bad.jsonl: the file holds no records"),
])
def test_bad_data_files_are_refused_before_the_model_loads(content, expected, tmp_path, monkeypatch):
    from recipes.llama3_8b import main
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    unloaded(monkeypatch)
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        main(["--smoke", "--data", str(data), "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_data_that_no_conversation_of_fits_is_one_line_and_leaves_no_folder(tmp_path):
    from recipes.llama3_8b import main
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"question": "word " * 400, "answer": "a"}) + "\n" for _ in range(3)))
    with pytest.raises(UserError, match=r"too few conversations left after filtering \(kept 0 / 3; dropped: too long 3\)"):
        main(["--smoke", "--data", str(data), "--max-seq-length", "256", "--output-dir", str(tmp_path / "out")])
    assert not any((tmp_path / "out").iterdir())  # found after the model loaded: its run folder is removed
