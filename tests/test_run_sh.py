"""run.sh: what it installs on a GPU machine (nvidia-smi faked here), the precision rule (Python's alone), the recipe
list, its refusals, and flags checked before anything is installed."""
import os
import subprocess
import sys

import pytest
import torch

from common import hardware
from common.errors import UserError
from tests.conftest import REPO


def run_sh(*args, gpu_line=None, tmp_path=None):
    env = dict(os.environ)
    env.pop("FT_PRECISION", None)
    if gpu_line is not None:
        fake = tmp_path / "bin"
        fake.mkdir(exist_ok=True)
        (fake / "nvidia-smi").write_text(f"#!/bin/sh\necho '{gpu_line}'\n")
        (fake / "nvidia-smi").chmod(0o755)
        env["PATH"] = f"{fake}:{env['PATH']}"
    return subprocess.run([str(REPO / "run.sh"), *args], env=env, capture_output=True, text=True, timeout=60)


def test_detect_prints_what_pythons_rule_decides_here():
    from common.hardware import cpu_precision
    result = run_sh("--detect")
    assert result.returncode == 0 and result.stdout.splitlines()[-1] == \
        f"gpu=none capability=- precision={cpu_precision()}"


def test_help_and_flag_mistakes_answer_before_anything_is_installed(tmp_path):
    """A fresh clone (an empty virtual environment: nothing importable) still answers --help and refuses a typo."""
    env = {**os.environ, "VIRTUAL_ENV": str(tmp_path), "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pip-called").write_text("")
    result = subprocess.run([str(REPO / "run.sh"), "llama3_8b", "--help"], env=env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0 and result.stdout.startswith("usage: ./run.sh llama3_8b [--field value ...]")
    assert "setting up" not in result.stderr
    result = subprocess.run([str(REPO / "run.sh"), "llama3_8b", "--learning-rat", "1"], env=env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2 and result.stderr.strip() == \
        "error: unknown flag --learning-rat; did you mean --learning-rate? (--help lists the fields)"
    for command in (["chat", "--help"], ["export", "--help"]):
        result = subprocess.run([str(REPO / "run.sh"), *command], env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0 and result.stdout.startswith(f"usage: ./run.sh {command[0]} ")
    result = subprocess.run([str(REPO / "run.sh"), "export", "outputs/x/1", "--format", "ggu"], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "argument --format: invalid choice: 'ggu'" in result.stderr
    assert "setting up" not in result.stderr


def test_unknown_recipe_lists_the_valid_ones():
    result = run_sh("llama3_8c")
    assert result.returncode == 2
    assert result.stderr.startswith("error: unknown recipe 'llama3_8c'; choose one of:") and "llama3_8b" in result.stderr


def test_list_shows_each_recipe_with_its_description():
    lines = run_sh("list").stdout.splitlines()
    recipes = sorted(p.stem for p in (REPO / "recipes").glob("*.py") if p.stem != "__init__")
    assert [line.split()[0] for line in lines] == recipes
    assert any(line.startswith("llama3_8b") and "FineTome" in line for line in lines)


@pytest.mark.parametrize("capability, precision", [(None, "fp32"), ("7.5", "fp16"), ("7.0", "fp16"), ("8.0", "bf16"),
                                                   ("8.9", "bf16"), ("9.0", "bf16")])
def test_python_side_applies_the_same_rule(capability, precision):
    assert hardware.precision_for(capability) == precision


def test_on_cpu_the_precision_asked_may_be_what_unsloths_cpu_backend_computes_in(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "cpu_precision", lambda: "bf16")  # a CPU with bf16 hardware
    assert hardware.detect("bf16").precision == "fp32"  # accepted; the trainer asks for no mixed precision on CPU
    assert "precision=bf16 (Unsloth's CPU backend decides)" in hardware.detect().describe()
    monkeypatch.setattr(hardware, "cpu_precision", lambda: "fp32")
    with pytest.raises(UserError, match="--precision bf16 needs a GPU of compute capability 8.0 or newer"):
        hardware.detect("bf16")


def test_python_side_refuses_bf16_on_a_t4(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Tesla T4")
    assert hardware.detect().precision == "fp16"
    with pytest.raises(UserError, match="Tesla T4 has 7.5: use --precision fp16"):
        hardware.detect("bf16")


def test_gpu_setup_keeps_the_cuda_torch_already_installed(tmp_path):
    """On Colab a CUDA torch is there before run.sh: the GPU set installs with torch held at that version, so pip
    chooses packages (xformers) built for it instead of replacing it."""
    log = tmp_path / "python-calls.log"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text(f"""#!/bin/sh
echo "$*" >> {log}
case "$*" in
  *find_spec*) exit 1 ;;
  *"torch.version.cuda"*) echo "2.8.0+cu126" ;;
esac
exit 0
""")
    (fake / "python3").chmod(0o755)
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: Tesla T4 (UUID: GPU-0)'\n")
    (fake / "nvidia-smi").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "VIRTUAL_ENV": str(tmp_path)}
    env.pop("FT_PRECISION", None)
    result = subprocess.run([str(REPO / "run.sh"), "llama3_8b", "--smoke"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    install = next(call for call in calls if "pip install" in call)
    requirements, constraint = install.split(" -r ")[1].split(" -c ")
    assert requirements == f"{REPO}/requirements.txt" and not constraint.startswith(str(REPO))  # nothing in the clone
    assert open(constraint).read() == "torch==2.8.0+cu126\n"
    assert calls[-1] == "-m recipes.llama3_8b --smoke"


@pytest.mark.parametrize("installed, sets_up", [("2025.1.1", True), (None, False)])
def test_an_active_environment_with_another_unsloth_gets_this_repositorys_set(installed, sets_up, tmp_path):
    """Colab with an Unsloth from an earlier notebook cell: everything imports, but the recipes' pins are not there."""
    pinned = next(line.split("==")[1] for line in (REPO / "requirements.txt").read_text().splitlines()
                  if line.startswith("unsloth=="))
    site = tmp_path / "site"  # importable stand-ins, ahead of the real packages on the path
    for name in ("unsloth", "trl", "peft", "datasets", "rich", "yaml", "sklearn", "matplotlib", "tensorboard"):
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text("")
    info = site / f"unsloth-{installed or pinned}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: unsloth\nVersion: {installed or pinned}\n")
    log = tmp_path / "calls.log"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text(f"""#!/bin/sh
case "$1 $2" in
  "-m pip"|"-m recipes.llama3_8b") echo "$*" >> {log}; exit 0 ;;
esac
exec {sys.executable} "$@"
""")
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: Tesla T4 (UUID: GPU-0)'\n")
    for program in ("python3", "nvidia-smi"):
        (fake / program).chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "VIRTUAL_ENV": str(tmp_path),
           "PYTHONPATH": str(site)}
    env.pop("FT_PRECISION", None)
    result = subprocess.run([str(REPO / "run.sh"), "llama3_8b", "--smoke"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert any(call.startswith(f"-m pip install -q -r {REPO}/requirements.txt") for call in calls) is sets_up
    assert calls[-1] == "-m recipes.llama3_8b --smoke"


def fake_two_gpu_machine(tmp_path):
    """A PATH where nvidia-smi reports two A100s and python3 logs its arguments (everything counts as installed)."""
    log = tmp_path / "python-calls.log"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text(f'#!/bin/sh\necho "$*" >> {log}\nexit 0\n')
    (fake / "nvidia-smi").write_text('#!/bin/sh\nif [ "$1" = -L ]; then\n'
                                     '  echo "GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-0)"\n'
                                     '  echo "GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-1)"\n'
                                     'else echo "NVIDIA A100-SXM4-40GB, 8.0"; fi\n')
    for program in ("python3", "nvidia-smi"):
        (fake / program).chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "VIRTUAL_ENV": str(tmp_path)}
    env.pop("FT_PRECISION", None)
    return env, log


@pytest.mark.parametrize("gpus", ["2", "all"])
def test_gpus_launches_torchrun_with_one_process_a_gpu(gpus, tmp_path):
    env, log = fake_two_gpu_machine(tmp_path)
    result = subprocess.run([str(REPO / "run.sh"), "llama3_8b", "--gpus", gpus, "--learning-rate", "1e-4"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines()[-1] == (
        "-m common.launch --standalone --nproc_per_node 2 -m recipes.llama3_8b --learning-rate 1e-4")


@pytest.mark.parametrize("gpus, message", [
    ("4", "error: --gpus 4: this machine has 2 GPU(s); use --gpus 2 or fewer"),
    ("two", "error: --gpus expects a number of GPUs or all, got 'two' (this machine has 2)"),
    ("0", "error: --gpus expects a number of GPUs or all, got '0' (this machine has 2)"),
    ("2 visible=0", "error: --gpus 2: this machine has 1 GPU(s); use --gpus 1 or fewer"),  # CUDA_VISIBLE_DEVICES=0
    ("", "error: --gpus expects a number of GPUs or all"),  # the last argument, no value
])
def test_gpus_beyond_the_machine_is_one_line_before_anything_runs(gpus, message, tmp_path):
    env, log = fake_two_gpu_machine(tmp_path)
    gpus, _, visible = gpus.partition(" visible=")
    if visible:
        env["CUDA_VISIBLE_DEVICES"] = visible
    result = subprocess.run([str(REPO / "run.sh"), "llama3_8b", "--gpus", *([gpus] if gpus else [])], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == message
    assert not log.exists()  # refused before any install or launch
