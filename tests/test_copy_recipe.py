"""Copy-and-modify, as the README tells people to: `cp recipes/llama3_8b.py recipes/<mine>.py`, change three fields,
`./run.sh <mine> --smoke`. The copy is its own recipe: its runs land under its own name, and say so."""
import json
import os
import subprocess

from tests.conftest import REPO, run_folders


def test_a_copied_recipe_with_three_changed_fields_runs_under_its_own_name(tmp_path):
    name = f"my_llama_{os.getpid()}"
    copy = REPO / "recipes" / f"{name}.py"
    source = (REPO / "recipes" / "llama3_8b.py").read_text()
    changed = {"    lora_r: int = 8": "    lora_r: int = 4", "    lora_alpha: int = 16": "    lora_alpha: int = 8",
               "    moving_average_window: int = 3": "    moving_average_window: int = 2"}
    for old, new in changed.items():
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    copy.write_text(source)
    try:
        result = subprocess.run([str(REPO / "run.sh"), name, "--smoke", "--max-steps", "2", "--eval-steps", "2",
                                 "--sample-prompts", "1", "--output-dir", str(tmp_path)],
                                capture_output=True, text=True, timeout=600)
    finally:
        copy.unlink()
        for compiled in (REPO / "recipes" / "__pycache__").glob(f"{name}.*.pyc"):
            compiled.unlink()
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == [name]  # nothing under llama3_8b/
    (folder,) = run_folders(tmp_path, name)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["recipe"] == name
    assert (folder / "results.md").read_text().startswith(f"# {name}: ")
    adapter = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (4, 8)
    assert json.loads((folder / "config.json").read_text())["hyperparameters"]["moving_average_window"] == 2
