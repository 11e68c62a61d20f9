"""./run.sh export RUN_DIR --format merged16|gguf: the trained model in the shapes other tools load.

merged16  RUN_DIR/export/merged16/: the adapter merged into 16-bit weights (Unsloth's save_pretrained_merged), with the
          tokenizer and chat template: plain transformers and vLLM load it.
gguf      RUN_DIR/export/gguf/: one file per --quantization through llama.cpp's converter and quantizer (llama.cpp,
          LM Studio), and a Modelfile for Ollama. Built from merged16, which it writes first if missing.
--push-to-hub USER/REPO uploads the export with a model card; the token comes from HF_TOKEN only.

Each export is written under a temporary name and renamed when complete: a folder named merged16 or gguf is whole. A
failed export removes what it wrote and says why in one line.
"""
import unsloth  # noqa: F401  (first: Unsloth patches transformers and PEFT on import)

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from after_training import gguf
from after_training.ollama import modelfile
from after_training.trained_run import TrainedRun, load_trained, open_run
from common.errors import UserError, run_main
from common.hardware import detect, peak_memory_gib, reset_peak_memory

SMOKE_PRE_TOKENIZER = {"llama": "llama-bpe", "gpt2": "gpt-2"}  # what the tiny smoke tokenizers split like


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="./run.sh export", description="Export a trained run's model.")
    parser.add_argument("run_dir", help="a finished run folder, outputs/<recipe>/<stamp>")
    parser.add_argument("--format", required=True, choices=("merged16", "gguf"),
                        help="merged16: 16-bit transformers weights (vLLM); gguf: llama.cpp / Ollama / LM Studio")
    parser.add_argument("--quantization", default="q4_k_m",
                        help=f"gguf only, comma-separated: {', '.join(gguf.QUANTIZATIONS)} (default q4_k_m)")
    parser.add_argument("--push-to-hub", metavar="USER/REPO", help="upload the export there (token: HF_TOKEN)")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    parser.add_argument("--adapter", help="another adapter folder, e.g. RUN_DIR/checkpoints/checkpoint-200")
    parser.add_argument("--gguf-pre-tokenizer", help="for a tokenizer llama.cpp does not recognize: the known one it "
                                                     "splits like (llama-bpe for Llama 3, gpt-2 for GPT-2)")
    parser.add_argument("--precision", default=os.environ.get("FT_PRECISION", "auto"), help="auto|bf16|fp16|fp32")
    return parser.parse_args(argv)


@contextlib.contextmanager
def written_whole(target: Path):
    """Yield a staging folder beside `target`; on success it replaces `target`, on any failure it is removed."""
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def export_merged16(run: TrainedRun, precision: str, target: Path) -> dict:
    """The adapter merged into the base, saved in 16 bits with the tokenizer and chat template."""
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        # On a GPU the base loads in 4 bits as trained and Unsloth dequantizes it to merge; Unsloth's CPU backend
        # merges only into 16-bit weights.
        model, tokenizer = load_trained(run, precision, load_in_4bit=None if precision != "fp32" else False)
        reset_peak_memory()
        with written_whole(target) as staging:
            try:
                model.save_pretrained_merged(str(staging), tokenizer, save_method="merged_16bit")
            except (RuntimeError, OSError, ValueError) as error:
                # A 4-bit base merges onto its 16-bit weights, which Unsloth reads from the base's folder or downloads
                # (a pre-quantized hub checkpoint's 16-bit sibling); offline, with only 4-bit weights, it cannot.
                raise UserError(f"Unsloth could not merge the adapter into {run.base_model}: "
                                f"{str(error).splitlines()[0][:300]}") from None
            if not any(staging.glob("*.safetensors")):
                raise UserError(f"Unsloth's save_pretrained_merged wrote no weights into {staging}")
            (staging / "README.md").write_text(model_card(run, "merged16"))
    return {"seconds": time.perf_counter() - started, "peak_gpu_memory_gib": peak_memory_gib()}


def export_gguf(run: TrainedRun, merged: Path, quantizations: list[str], target: Path, pre_tokenizer: str | None):
    """One GGUF per quantization from the merged16 folder, and a Modelfile for the first of them."""
    from transformers import AutoTokenizer
    gguf.check_tools()
    if pre_tokenizer is None and run.smoke:
        model_type = json.loads((merged / "config.json").read_text()).get("model_type")
        pre_tokenizer = SMOKE_PRE_TOKENIZER.get(model_type)
    log = target.parent / "gguf.log"
    log.unlink(missing_ok=True)
    timings = {}
    with written_whole(target) as staging:
        f16 = staging / f"{run.recipe}-f16.gguf"
        started = time.perf_counter()
        gguf.convert(merged, f16, log, pre_tokenizer)
        timings["f16"] = time.perf_counter() - started
        for quantization in quantizations:
            if quantization != "f16":
                started = time.perf_counter()
                gguf.quantize(f16, staging / f"{run.recipe}-{quantization}.gguf", quantization, log)
                timings[quantization] = time.perf_counter() - started
        if "f16" not in quantizations:
            f16.unlink()
        tokenizer = AutoTokenizer.from_pretrained(merged)
        (staging / "Modelfile").write_text(modelfile(f"{run.recipe}-{quantizations[0]}.gguf", tokenizer,
                                                     run.system_prompt))
        (staging / "README.md").write_text(model_card(run, "gguf"))
    return timings


def model_card(run: TrainedRun, export_format: str) -> str:
    """README.md for the hub: what was trained, from what, on what, and how well (from the run's manifest)."""
    hyperparameters = "\n".join(f"| `{name}` | `{value}` |" for name, value in run.hyperparameters.items())
    data = run.manifest.get("data", {})
    metrics = {key: value for key, value in run.manifest.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "seed"}
    usage = {"merged16": "Load with `transformers` (`AutoModelForCausalLM.from_pretrained`) or serve with vLLM.",
             "gguf": "Run with llama.cpp or LM Studio, or `ollama create NAME -f Modelfile` in this folder."}
    return "\n".join([
        "---", f"base_model: {run.base_model}", "library_name: transformers", "tags: [unsloth, lora, trl]", "---", "",
        f"# {run.recipe} ({export_format})", "",
        f"LoRA fine-tune of `{run.base_model}` by the `{run.recipe}` recipe, trained with Unsloth + TRL + PEFT, "
        f"the adapter merged into the weights. {usage[export_format]}", "",
        adapter_line(run),
        f"- data: `{data.get('source', 'n/a')}` ({data.get('report', 'n/a')})",
        f"- system prompt: {run.system_prompt or 'none'}",
        *[f"- {key}: {value:.4g}" for key, value in metrics.items()], "",
        "| hyperparameter | value |", "|---|---|", hyperparameters, ""])


def hub_token() -> str:
    """The token comes from the environment only: never a file, a flag or a log line."""
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise UserError("--push-to-hub needs a token in the HF_TOKEN environment variable (a write token from your "
                        "hub account settings); nothing was uploaded")
    return token


def adapter_line(run: TrainedRun) -> str:
    """The model card's line naming the adapter merged in: a GGUF export reuses merged16/ only when it holds this one."""
    adapter = run.adapter.resolve()
    inside_run = adapter.is_relative_to(run.path.resolve())
    return f"- adapter: `{adapter.relative_to(run.path.resolve()) if inside_run else adapter}`"


def push_to_hub(folder: Path, repo_id: str, private: bool, token: str):
    """Upload `folder` to the hub repository; one line on failure."""
    from huggingface_hub import HfApi
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=f"Upload {folder.name} export")
    except Exception as error:
        reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise UserError(f"--push-to-hub {repo_id}: the upload failed ({reason}); the export is kept in {folder}") from None
    print(f"pushed {folder} to https://huggingface.co/{repo_id}")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    run = open_run(args.run_dir, args.adapter)
    quantizations = gguf.check_quantizations([q.strip() for q in args.quantization.split(",") if q.strip()])
    token = hub_token() if args.push_to_hub else None
    hardware = detect(args.precision)
    exports = run.path / "export"
    merged = exports / "merged16"
    card = merged / "README.md"
    if args.format == "merged16" or not card.is_file() or adapter_line(run) not in card.read_text().splitlines():
        figures = export_merged16(run, hardware.precision, merged)
        print(f"merged16: {merged} ({size(folder_bytes(merged))}, {figures['seconds']:.0f} s"
              + (f", peak GPU memory {figures['peak_gpu_memory_gib']:.2f} GiB)" if figures["peak_gpu_memory_gib"] else ")"))
    result = merged
    if args.format == "gguf":
        result = exports / "gguf"
        timings = export_gguf(run, merged, quantizations, result, args.gguf_pre_tokenizer)
        if "f16" not in quantizations:
            print(f"gguf: converted to f16 in {timings['f16']:.0f} s (an intermediate, not kept)")
        for quantization in quantizations:
            file = result / f"{run.recipe}-{quantization}.gguf"
            print(f"gguf {quantization}: {file} ({size(file.stat().st_size)}, {timings[quantization]:.0f} s)")
        print(f"ollama: cd {result} && ollama create {run.recipe} -f Modelfile && ollama run {run.recipe}")
    if args.push_to_hub:
        push_to_hub(result, args.push_to_hub, args.private, token)


def folder_bytes(folder: Path) -> int:
    return sum(file.stat().st_size for file in folder.rglob("*") if file.is_file())


def size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


if __name__ == "__main__":
    run_main(main)
