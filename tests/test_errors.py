"""Bad input through a real recipe: one line on stderr naming the problem and the fix, no traceback, no run left
looking complete."""
import json

import pytest

from tests.conftest import run_folders, run_recipe_process


@pytest.mark.parametrize("args, expected", [
    (["--learning-rate", "abc"], "error: --learning-rate expects float, got 'abc'"),
    (["--no-such-flag", "1"], "error: unknown flag --no-such-flag; run with --help to list the flags"),
    (["--data", "nowhere/data.jsonl"], "error: nowhere/data.jsonl: data file not found; check the path given to --data"),
])
def test_usage_errors(args, expected, tmp_path):
    result = run_recipe_process("llama3_8b", "--smoke", *args, output_dir=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == expected
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("content, expected", [
    ('{"conversations": []}\n{"conversations": [\n', "bad.jsonl: line 2: invalid JSON"),
    ('{"prompt": "p", "reply": "r"}\n', "bad.jsonl: no supported format; found columns ['prompt', 'reply']"),
    ("".join(json.dumps({"question": "word " * 400, "answer": "a"}) + "\n" for _ in range(3)),
     "too few conversations left after filtering (kept 0 / 3; dropped: too long 3)"),
])
def test_bad_data_files_fail_in_one_line_and_mark_the_run(content, expected, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    result = run_recipe_process("llama3_8b", "--smoke", "--data", str(data), "--max-seq-length", "256",
                                output_dir=tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert expected in result.stderr.strip().splitlines()[-1]
    (folder,) = run_folders(tmp_path / "out", "llama3_8b")
    assert (folder / "FAILED").exists() and not (folder / "results.md").exists() and not (folder / "adapter").exists()
