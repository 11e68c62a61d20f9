"""Shared test helpers: run a recipe as the user would (a subprocess), and find the run folder it wrote."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one); run with -m gpu")
    config.addinivalue_line("markers", "slow: a GPU test kept out of the 10-minute set; run with -m \"gpu and slow\"")


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def run_recipe_process(recipe: str, *args: str, output_dir: Path, timeout: int = 600, env: dict | None = None):
    """Run `python -m recipes.<recipe> args --output-dir output_dir`; returns the CompletedProcess. Without `env`, the
    recipe's entry point runs in this process (as its own process would, argv, exit code and output included):
    importing Unsloth costs about 15 s a process, and most tests are about the run, not the process."""
    argv = [*args, "--output-dir", str(output_dir)]
    if env is None:
        return run_recipe_here(recipe, argv)
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, "PYTHONPATH": pythonpath, **(env or {})}
    return subprocess.run([sys.executable, "-m", f"recipes.{recipe}", *argv], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=timeout)


def run_recipe_here(recipe: str, argv: list[str]) -> subprocess.CompletedProcess:
    """`python -m recipes.<recipe> argv` in this process: run_main's exit code, stdout and stderr captured."""
    import contextlib
    import importlib
    import io

    from common.errors import run_main
    module = importlib.import_module(f"recipes.{recipe}")
    stdout, stderr = io.StringIO(), io.StringIO()
    saved_argv, code = sys.argv, 0
    sys.argv = [f"recipes/{recipe}.py", *argv]
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            run_main(module.main)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = saved_argv
    return subprocess.CompletedProcess([sys.executable, "-m", f"recipes.{recipe}", *argv], code, stdout.getvalue(),
                                       stderr.getvalue())


def cpu_training_precision() -> str:
    """What Unsloth's CPU backend computes in here: bf16 on a CPU with bf16 hardware (or UNSLOTH_CPU_BF16=1), else fp32,
    whatever the run asked for."""
    import unsloth  # noqa: F401  (unsloth_zoo refuses to import before unsloth, in a test module that has not)
    from unsloth_zoo.cpu.runtime import cpu_bf16_supported
    return "bf16" if cpu_bf16_supported() else "fp32"


def run_folders(output_dir: Path, recipe: str) -> list[Path]:
    return sorted((output_dir / recipe).iterdir()) if (output_dir / recipe).exists() else []


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def run_to_completion(recipe: str, *args: str, output_dir: Path, env: dict | None = None):
    """Run a recipe and return (its new run folder, the CompletedProcess); fails the test with the recipe's output
    when it exits non-zero or does not write exactly one new run folder."""
    before = set(run_folders(output_dir, recipe))
    result = run_recipe_process(recipe, *args, output_dir=output_dir, env=env)
    assert result.returncode == 0, f"{recipe} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    print("\n".join(line for line in result.stdout.splitlines()[-40:] if "it/s]" not in line))  # shown with -s
    return the_new_run_folder(output_dir, recipe, before), result


def the_new_run_folder(output_dir: Path, recipe: str, before: set[Path]) -> Path:
    """The one run folder a recipe wrote since `before` (the folders there when it started); fails the test otherwise."""
    created = [p for p in run_folders(output_dir, recipe) if p not in before]
    assert len(created) == 1, f"expected one new run folder, found {created}"
    return created[0]


@pytest.fixture
def run_recipe(tmp_path):
    """Run a recipe to completion and return its run folder (run_to_completion, into tmp_path/outputs by default)."""
    def run(recipe: str, *args: str, output_dir: Path | None = None, env: dict | None = None) -> Path:
        return run_to_completion(recipe, *args, output_dir=output_dir or tmp_path / "outputs", env=env)[0]
    return run
