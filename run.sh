#!/usr/bin/env bash
# ./run.sh <recipe> [--field value ...]   train a recipe (./run.sh llama3_8b --smoke: offline check on CPU)
# ./run.sh <recipe> --gpus N|all [...]    the same on N GPUs (torchrun, data parallel; the card's effective batch kept)
# ./run.sh chat RUN_DIR [--prompt TEXT]   talk to a trained run's model (--base: without the adapter)
# ./run.sh export RUN_DIR --format adapter|merged16|gguf [--quantization q4_k_m,q8_0] [--push-to-hub USER/REPO]
# ./run.sh list                           the recipes, one line each
# ./run.sh test [pytest args]             set up the CPU test environment and run the CPU test suite
# ./run.sh --detect                       print the GPU and the precision a run would use
#
# The GPU decides the precision: compute capability >= 8.0 (A100, L4, H100) -> bf16, below (T4, V100) -> fp16,
# no GPU -> fp32; --precision overrides. The first run installs what is missing: into the active environment
# (Colab, conda, a venv you activated) or else into .venv here; later runs skip it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

die() { echo "error: $*" >&2; exit 2; }

recipes() { for f in "$ROOT"/recipes/*.py; do n=$(basename "$f" .py); [ "$n" = "__init__" ] || echo "$n"; done; }

detect() {
  local line="" name cap major
  if command -v nvidia-smi >/dev/null 2>&1; then
    line=$(nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader 2>/dev/null | head -n 1 || true)
  fi
  if [ -z "$line" ]; then
    echo "gpu=none capability=- precision=fp32"
    return
  fi
  name=$(echo "${line%,*}" | xargs | tr ' ' '-')
  cap=$(echo "${line##*,}" | xargs)
  major=${cap%%.*}
  if [ "$major" -ge 8 ]; then echo "gpu=$name capability=$cap precision=bf16"
  else echo "gpu=$name capability=$cap precision=fp16"; fi
}

# The python to use: the active environment's, or .venv here (created on first use).
python_env() {
  if [ -n "${VIRTUAL_ENV:-}" ] || [ -n "${CONDA_PREFIX:-}" ] || [ -n "${COLAB_RELEASE_TAG:-}" ]; then
    PY=$(command -v python3 || command -v python)
    STAMP=""
  else
    [ -x "$ROOT/.venv/bin/python" ] || python3 -m venv "$ROOT/.venv"
    PY="$ROOT/.venv/bin/python"
    STAMP="$ROOT/.venv/.installed-$1-$(cat "$ROOT"/requirements*.txt | sha256sum | cut -c1-12)"
  fi
}

# Install the GPU set (requirements.txt) or the CPU set (CPU torch, unsloth without xformers) once.
ensure_installed() {
  local kind=$1
  python_env "$kind"
  if [ -n "$STAMP" ]; then
    [ -f "$STAMP" ] && return
  # An active environment is set up when all is importable and Unsloth is at this repository's pin: another Unsloth
  # (an earlier notebook cell's) would run against other transformers and TRL versions than the recipes were made for.
  elif "$PY" -c "import importlib.util as u, importlib.metadata as m, sys; sys.exit(any(u.find_spec(n) is None for n in
      ('unsloth', 'trl', 'peft', 'datasets', 'rich', 'yaml', 'sklearn', 'matplotlib', 'tensorboard'$([ "$kind" = cpu ] && echo ", 'pytest'")))
      or m.version('unsloth') != '$(sed -n 's/^unsloth==//p' "$ROOT/requirements.txt")')"; then
    return
  fi
  echo "setting up the $kind environment ($PY): a few minutes, once for this environment (on Colab, once a runtime)" >&2
  if [ "$kind" = gpu ]; then
    # A CUDA torch already there (Colab's) stays: pip must then choose the xformers built for it instead of swapping
    # torch for the one the newest xformers wants.
    local torch_version constraints=()
    torch_version=$("$PY" -c "import torch; assert torch.version.cuda; print(torch.__version__)" 2>/dev/null) \
      || torch_version=""
    if [ -n "$torch_version" ]; then
      echo "torch==$torch_version" > "$ROOT/.torch-constraint.txt"
      constraints=(-c "$ROOT/.torch-constraint.txt")
    fi
    "$PY" -m pip install -q -r "$ROOT/requirements.txt" ${constraints[@]+"${constraints[@]}"}
  else
    "$PY" -m pip install -q -r "$ROOT/requirements-cpu.txt"
    "$PY" -m pip install -q --no-deps -r "$ROOT/requirements-cpu-nodeps.txt"
  fi
  [ -z "$STAMP" ] || touch "$STAMP"
}

# llama.cpp's converter (from the llama-cpp-python source package) and quantizer (the llama_cpp module), once, for
# GGUF exports and their tests: pip builds llama-cpp-python from source, a few minutes on two cores.
EXPORT_TOOLS="$ROOT/.export-tools"
ensure_export_tools() {
  local version sdist
  version=$(sed -n 's/^llama-cpp-python==//p' "$ROOT/requirements-export.txt")
  sdist="$EXPORT_TOOLS/llama_cpp_python-$version.tar.gz"
  if [ -f "$EXPORT_TOOLS/llama.cpp/convert_hf_to_gguf.py" ] && [ -f "$sdist" ] \
      && "$PY" -c "import llama_cpp, sentencepiece" 2>/dev/null; then
    return
  fi
  echo "setting up llama.cpp's converter and quantizer (llama-cpp-python $version from source): about 4 minutes on 2 cores, once for this environment" >&2
  mkdir -p "$EXPORT_TOOLS"
  [ -f "$sdist" ] || "$PY" -m pip download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$version" -d "$EXPORT_TOOLS"
  rm -rf "$EXPORT_TOOLS/llama.cpp" && mkdir "$EXPORT_TOOLS/llama.cpp"
  tar -xzf "$sdist" -C "$EXPORT_TOOLS/llama.cpp" --strip-components=3 \
    "llama_cpp_python-$version/vendor/llama.cpp/convert_hf_to_gguf.py" \
    "llama_cpp_python-$version/vendor/llama.cpp/conversion" "llama_cpp_python-$version/vendor/llama.cpp/gguf-py"
  "$PY" -m pip install -q "$sdist"
  "$PY" -m pip install -q -r "$ROOT/requirements-export.txt"
}

export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # fewer fragmentation OOMs on long runs
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

case "${1:-}" in
  ""|-h|--help)
    sed -n '2,12s/^# \{0,1\}//p' "$0"; exit 0 ;;
  --detect)
    detect; exit 0 ;;
  list)
    for n in $(recipes); do printf '%-22s %s\n' "$n" "$(sed -n '1s/^"""//p' "$ROOT/recipes/$n.py")"; done; exit 0 ;;
  test)
    shift
    ensure_installed cpu
    ensure_export_tools
    cd "$ROOT"
    exec "$PY" -m pytest -m "not gpu" tests "$@" ;;
esac

if [ "${1:-}" = chat ] || [ "${1:-}" = export ]; then
  command=$1; shift
  if [[ "$(detect)" == gpu=none* ]]; then ensure_installed cpu; else ensure_installed gpu; fi
  if [ "$command" = export ] && [[ " $* " == *" gguf "* || " $* " == *" --format=gguf "* ]]; then ensure_export_tools; fi
  exec "$PY" -m "after_training.$command" "$@"
fi

name=$1; shift
[ -f "$ROOT/recipes/$name.py" ] && [ "$name" != "__init__" ] || die "unknown recipe '$name'; choose one of: $(recipes | paste -sd ' ')"

hardware=$(detect)
echo "$hardware" >&2
precision=${hardware##*precision=}
gpus=1
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --gpus=*) gpus=${1#--gpus=} ;;
    --gpus) [ $# -ge 2 ] || die "--gpus expects a number of GPUs or all"; gpus=$2; shift ;;
    *)
      case "$1" in
        --precision=*) precision=${1#--precision=} ;;
        --precision) precision=${2:-} ;;
      esac
      args+=("$1") ;;
  esac
  shift
done
if [ "$precision" = bf16 ] && [[ "$hardware" != *precision=bf16 ]]; then
  die "--precision bf16 needs a GPU of compute capability 8.0 or newer (${hardware%% precision=*}); use --precision fp16 on a GPU, fp32 without one"
fi
export FT_PRECISION=$precision

# --gpus N: one process a GPU under torchrun (common/launch.py); without a GPU, N CPU processes (to check the wiring).
available=0
if [[ "$hardware" != gpu=none* ]]; then
  available=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  # CUDA_VISIBLE_DEVICES limits what torch sees; nvidia-smi lists every GPU regardless
  if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    visible=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c . || true)
    if [ "$visible" -lt "$available" ]; then available=$visible; fi
  fi
fi
if [ "$gpus" = all ]; then
  [ "$available" -gt 0 ] || die "--gpus all: this machine has no GPU (or CUDA_VISIBLE_DEVICES hides them)"
  gpus=$available
fi
[[ "$gpus" =~ ^[0-9]+$ ]] && [ "$gpus" -ge 1 ] || die "--gpus expects a number of GPUs or all, got '$gpus' (this machine has $available)"
if [ "$gpus" -gt 1 ] && [ "$available" -eq 0 ]; then
  echo "no GPU: --gpus $gpus starts $gpus CPU processes (gloo), slow: for checking the wiring, e.g. with --smoke" >&2
elif [ "$gpus" -gt "$available" ] && [ "$gpus" -gt 1 ]; then
  die "--gpus $gpus: this machine has $available GPU(s); use --gpus $available or fewer"
fi

if [[ "$hardware" == gpu=none* ]]; then ensure_installed cpu; else ensure_installed gpu; fi

if [ "$gpus" -gt 1 ]; then
  exec "$PY" -m common.launch --standalone --nproc_per_node "$gpus" -m "recipes.$name" ${args[@]+"${args[@]}"}
fi
exec "$PY" -m "recipes.$name" ${args[@]+"${args[@]}"}
