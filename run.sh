#!/usr/bin/env bash
# ./run.sh <recipe> [--field value ...]   train a recipe (./run.sh llama3_8b --smoke: offline check on CPU)
# ./run.sh <recipe> --gpus N|all [...]    the same on N GPUs (torchrun, data parallel; the card's effective batch kept)
# ./run.sh chat RUN_DIR [--prompt TEXT]   talk to a trained run's model (--base: without the adapter)
# ./run.sh export RUN_DIR --format adapter|merged16|gguf [--quantization q4_k_m,q8_0] [--push-to-hub USER/REPO]
# ./run.sh list                           the recipes, one line each
# ./run.sh notebooks [--repo OWNER/NAME]  colab/<recipe>.ipynb for every recipe and the README's Colab links
# ./run.sh test [pytest args]             set up the CPU test environment and run the CPU test suite
# ./run.sh --detect                       print the GPU and the precision a run would use
#
# The recipe decides the precision (common/hardware.py): compute capability >= 8.0 (A100, L4, H100) -> bf16, below
# (T4, V100) -> fp16; --precision overrides. This script looks at the GPU only to choose what to install. The first run
# installs what is missing: into the active environment (Colab, conda, a venv you activated) or else into .venv here;
# later runs skip it. Flags are checked before that (common/preflight.py): --help and a mistyped flag answer at once.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

die() { echo "error: $*" >&2; exit 2; }

recipes() { for f in "$ROOT"/recipes/*.py; do n=$(basename "$f" .py); [ "$n" = "__init__" ] || echo "$n"; done; }

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; }

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
    local torch_version constraint constraints=()
    torch_version=$("$PY" -c "import torch; assert torch.version.cuda; print(torch.__version__)" 2>/dev/null) \
      || torch_version=""
    if [ -n "$torch_version" ]; then
      constraint=$(mktemp)
      echo "torch==$torch_version" > "$constraint"
      constraints=(-c "$constraint")
    fi
    "$PY" -m pip install -q -r "$ROOT/requirements.txt" ${constraints[@]+"${constraints[@]}"}
  else
    "$PY" -m pip install -q -r "$ROOT/requirements-cpu.txt"
    "$PY" -m pip install -q --no-deps -r "$ROOT/requirements-cpu-nodeps.txt"
  fi
  [ -z "$STAMP" ] || touch "$STAMP"
}

# llama.cpp's converter (from the llama-cpp-python source package) and quantizer (the llama_cpp module), once, for
# GGUF exports and their tests: pip builds llama-cpp-python from source, about 11 minutes on two cores.
EXPORT_TOOLS="$ROOT/.export-tools"
ensure_export_tools() {
  local version sdist installed started heartbeat needs
  version=$(sed -n 's/^llama-cpp-python==//p' "$ROOT/requirements-export.txt")
  sdist="$EXPORT_TOOLS/llama_cpp_python-$version.tar.gz"
  installed="import importlib.metadata as m, sys; sys.exit(m.version('llama_cpp_python') != '$version')"
  if [ -f "$EXPORT_TOOLS/llama.cpp/convert_hf_to_gguf.py" ] && [ -f "$sdist" ] \
      && "$PY" -c "$installed; import sentencepiece" 2>/dev/null; then
    return
  fi
  echo "setting up llama.cpp's converter and quantizer (llama-cpp-python $version, built from source) for GGUF exports, once for this environment:" >&2
  mkdir -p "$EXPORT_TOOLS"
  if [ ! -f "$sdist" ]; then
    echo "  downloading llama-cpp-python $version's source package (77 MB) into $EXPORT_TOOLS" >&2
    "$PY" -m pip download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$version" -d "$EXPORT_TOOLS"
  fi
  echo "  unpacking llama.cpp's converter (convert_hf_to_gguf.py) from it into $EXPORT_TOOLS/llama.cpp" >&2
  rm -rf "$EXPORT_TOOLS/llama.cpp" && mkdir "$EXPORT_TOOLS/llama.cpp"
  tar -xzf "$sdist" -C "$EXPORT_TOOLS/llama.cpp" --strip-components=3 \
    "llama_cpp_python-$version/vendor/llama.cpp/convert_hf_to_gguf.py" \
    "llama_cpp_python-$version/vendor/llama.cpp/conversion" "llama_cpp_python-$version/vendor/llama.cpp/gguf-py"
  # --no-deps on every install: pip's resolver would otherwise check the whole environment and print, as an ERROR,
  # packages that Unsloth names but the CPU set leaves out on purpose (xformers, triton); llama-cpp-python's own needs
  # are read off its source package's metadata and installed by name.
  if ! "$PY" -c "$installed" 2>/dev/null; then
    echo "  compiling llama.cpp into llama-cpp-python: about 11 minutes on 2 cores (this machine has $(nproc))" >&2
    started=$SECONDS
    # pip prints nothing while the compiler runs: a line every 30 s shows it is working (sleep off the terminal, so
    # that a sleep outliving the kill holds no pipe open)
    ( while sleep 30 >/dev/null 2>&1 && kill -0 $$ 2>/dev/null; do
        echo "  still compiling: $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s so far" >&2
      done ) &
    heartbeat=$!
    if ! "$PY" -m pip install -q --no-deps "$sdist"; then
      kill "$heartbeat" 2>/dev/null || true
      die "pip could not build llama-cpp-python $version (its reason is above); it needs a C and C++ compiler (gcc, g++)"
    fi
    kill "$heartbeat" 2>/dev/null || true
  fi
  needs=$(tar -xzOf "$sdist" "llama_cpp_python-$version/PKG-INFO" | sed -n '/;/!s/^Requires-Dist: //p')
  echo "  installing what the converter and llama-cpp-python need: sentencepiece" $needs >&2
  "$PY" -m pip install -q --no-deps -r "$ROOT/requirements-export.txt" $needs
}

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
setup_kind=cpu
if has_gpu; then setup_kind=gpu; fi

case "${1:-}" in
  ""|-h|--help)
    sed -n '2,14s/^# \{0,1\}//p' "$0"; exit 0 ;;
  notebooks)
    shift
    exec python3 -m common.notebooks "$@" ;;
  --detect)
    ensure_installed "$setup_kind"
    exec "$PY" -m common.hardware ;;
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
  # The arguments first, with any python3 and nothing installed: --help or a typo answers in a second.
  python3 -m after_training.arguments "$command" "$@" || exit $?
  if [[ " $* " == *" --help "* || " $* " == *" -h "* ]]; then exit 0; fi
  ensure_installed "$setup_kind"
  if [ "$command" = export ] && [[ " $* " == *" gguf "* || " $* " == *" --format=gguf "* ]]; then ensure_export_tools; fi
  exec "$PY" -m "after_training.$command" "$@"
fi

name=$1; shift
[ -f "$ROOT/recipes/$name.py" ] && [ "$name" != "__init__" ] || die "unknown recipe '$name'; choose one of: $(recipes | paste -sd ' ')"
export FT_LAUNCHER="./run.sh $name"  # the usage line of --help
export FT_COMMAND="./run.sh $name${*:+ $*}"  # the manifest's record of what was typed

gpus=1
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --gpus=*) gpus=${1#--gpus=} ;;
    --gpus) [ $# -ge 2 ] || die "--gpus expects a number of GPUs or all"; gpus=$2; shift ;;
    *) args+=("$1") ;;
  esac
  shift
done
# --gpus N: one process a GPU under torchrun (common/launch.py); without a GPU, N CPU processes (to check the wiring).
available=0
if [ "$setup_kind" = gpu ]; then
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

# Flags first, with any python3 and nothing installed: --help, a typo or an unusable value answer in a second.
if [[ " ${args[*]-} " == *" --help "* || " ${args[*]-} " == *" -h "* ]]; then
  exec python3 -m common.preflight "$ROOT/recipes/$name.py" ${args[@]+"${args[@]}"}
fi
python3 -m common.preflight "$ROOT/recipes/$name.py" ${args[@]+"${args[@]}"} || exit $?

ensure_installed "$setup_kind"

if [ "$gpus" -gt 1 ]; then
  exec "$PY" -m common.launch --standalone --nproc_per_node "$gpus" -m "recipes.$name" ${args[@]+"${args[@]}"}
fi
exec "$PY" -m "recipes.$name" ${args[@]+"${args[@]}"}
