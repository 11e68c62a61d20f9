"""./run.sh export RUN_DIR --format adapter|merged16|gguf: the trained model in the shapes other tools load.

adapter   EXPORT_DIR/adapter/: the LoRA adapter alone (tens of MB) with its tokenizer and a model card, to share; PEFT
          and Unsloth load it on top of the base model.
merged16  EXPORT_DIR/merged16/: the adapter merged into 16-bit weights (Unsloth's save_pretrained_merged), with the
          tokenizer and chat template: plain transformers and vLLM load it.
gguf      EXPORT_DIR/gguf/: one file per --quantization through llama.cpp's converter and quantizer (llama.cpp,
          LM Studio), and a Modelfile for Ollama. Built from merged16, which it writes first if missing.
--push-to-hub USER/REPO uploads the export with a model card; the token comes from HF_TOKEN only.

EXPORT_DIR is RUN_DIR/export unless --export-dir says otherwise. Each export is written under a temporary name and
renamed when complete: a folder named adapter, merged16 or gguf is whole. An export already there for the same adapter
is reused, and a GGUF export adds the quantizations not there yet to it; an export of another adapter is replaced, and
the export says so. The free disk is checked before writing; a failed export removes what it wrote and says why in one
line.
"""
import unsloth  # noqa: F401  (first: Unsloth patches transformers and PEFT on import)

import contextlib
import errno
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from after_training import gguf
from after_training.arguments import export_arguments
from after_training.ollama import modelfile
from after_training.trained_run import TrainedRun, load_trained, open_run
from common.errors import UserError, run_main
from common.hardware import detect, peak_memory_gib, reset_peak_memory

SMOKE_PRE_TOKENIZER = {"llama": "llama-bpe", "gpt2": "gpt-2"}  # what the tiny smoke tokenizers split like
TRAINER_STATE = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth", "trainer_state.json",
                 "training_args.bin")  # what a checkpoint holds beside the adapter, for --resume only


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


def export_adapter(run: TrainedRun, target: Path):
    """The LoRA adapter and tokenizer as trained, with a model card; a checkpoint's optimizer and trainer state stay."""
    with written_whole(target) as staging:
        shutil.copytree(run.adapter, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*TRAINER_STATE))
        (staging / "README.md").write_text(model_card(run, "adapter"))


def export_merged16(run: TrainedRun, precision: str, target: Path, gguf_factor: float = 0.0) -> dict:
    """The adapter merged into the base, saved in 16 bits with the tokenizer and chat template. The disk must hold the
    merged weights and, where GGUF files follow, gguf_factor times as much again."""
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        # On a GPU the base loads in 4 bits as trained and Unsloth dequantizes it to merge; Unsloth's CPU backend
        # merges only into 16-bit weights.
        model, tokenizer = load_trained(run, precision, load_in_4bit=None if precision != "fp32" else False)
        weights = merged16_bytes(model)
        check_free_space(target.parent, int(weights * (1 + gguf_factor)),
                         "merged16" + (" and the GGUF files" if gguf_factor else ""))
        reset_peak_memory()
        with written_whole(target) as staging:
            try:
                model.save_pretrained_merged(str(staging), tokenizer, save_method="merged_16bit")
            except Exception as error:
                if is_out_of_disk(error):
                    raise UserError(f"the disk under {target.parent} filled up while writing merged16 (about "
                                    f"{size(weights)}); free some space or choose another disk with --export-dir") from None
                if not isinstance(error, (RuntimeError, OSError, ValueError)):
                    raise
                # A 4-bit base merges onto its 16-bit weights, which Unsloth reads from the base's folder or downloads
                # (a pre-quantized hub checkpoint's 16-bit sibling); offline, with only 4-bit weights, it cannot.
                raise UserError(f"Unsloth could not merge the adapter into {run.base_model}: "
                                f"{str(error).splitlines()[0][:300]}") from None
            if not any(staging.glob("*.safetensors")):
                raise UserError(f"Unsloth's save_pretrained_merged wrote no weights into {staging}")
            (staging / "README.md").write_text(model_card(run, "merged16"))
    return {"seconds": time.perf_counter() - started, "peak_gpu_memory_gib": peak_memory_gib()}


def export_gguf(run: TrainedRun, merged: Path, quantizations: list[str], target: Path, pre_tokenizer: str | None,
                kept: list[str]):
    """One GGUF per quantization from the merged16 folder beside the `kept` ones of this adapter's earlier export (its
    f16 file, when kept, saves the conversion), and a Modelfile for the first quantization asked for."""
    from transformers import AutoTokenizer
    gguf.check_tools()
    if pre_tokenizer is None and run.smoke:
        model_type = json.loads((merged / "config.json").read_text()).get("model_type")
        pre_tokenizer = SMOKE_PRE_TOKENIZER.get(model_type)
    log = target.parent / "gguf.log"
    log.unlink(missing_ok=True)
    new = [quantization for quantization in quantizations if quantization not in kept]
    timings = {}
    with written_whole(target) as staging:
        for quantization in kept:
            carry_over(gguf_file(target, run, quantization), gguf_file(staging, run, quantization))
        f16 = gguf_file(staging, run, "f16")
        if "f16" not in kept:
            started = time.perf_counter()
            gguf.convert(merged, f16, log, pre_tokenizer)
            timings["f16"] = time.perf_counter() - started
        for quantization in new:
            if quantization != "f16":
                started = time.perf_counter()
                gguf.quantize(f16, gguf_file(staging, run, quantization), quantization, log)
                timings[quantization] = time.perf_counter() - started
        if "f16" not in kept + quantizations:
            f16.unlink()
        for quantization in new:  # a file llama.cpp cannot load (a wrong pre-tokenizer, say) is no export
            gguf.check_loads(gguf_file(staging, run, quantization), log)
        held = [gguf_file(staging, run, name).name for name in gguf.QUANTIZATIONS if name in kept + quantizations]
        tokenizer = AutoTokenizer.from_pretrained(merged)
        first = gguf_file(staging, run, quantizations[0]).name
        others = ", ".join(f"./{name}" for name in held if name != first)
        (staging / "Modelfile").write_text(modelfile(first, tokenizer, run.system_prompt)
                                           + (f"\n# The other GGUF files here, for FROM: {others}\n" if others else ""))
        (staging / "README.md").write_text(model_card(run, "gguf", held))
    return timings


def gguf_file(folder: Path, run: TrainedRun, quantization: str) -> Path:
    return folder / f"{run.recipe}-{quantization}.gguf"


def kept_quantizations(folder: Path, run: TrainedRun) -> list[str]:
    """The GGUF files of this adapter's earlier export in `folder`, which a new GGUF export keeps."""
    if not holds_export_of(folder, run):
        return []
    return [name for name in gguf.QUANTIZATIONS if gguf_file(folder, run, name).is_file()]


def carry_over(source: Path, destination: Path):
    """A file of the earlier export into the staging folder. A hard link takes neither disk nor time, and the earlier
    folder stays whole should this export fail; a filesystem without hard links gets a copy."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def merged16_bytes(model) -> int:
    """What the merged weights take in 16 bits: every base weight at 2 bytes, a 4-bit one at its full shape."""
    total = 0
    for name, parameter in model.named_parameters():
        if "lora_" not in name:
            shape = getattr(getattr(parameter, "quant_state", None), "shape", None)
            total += 2 * (math.prod(shape) if shape is not None else parameter.numel())
    return total


def gguf_factor(quantizations: list[str], f16_kept: bool) -> float:
    """The GGUF files take about this many times merged16's size: the f16 file (written first unless an earlier export
    kept it, since the quantizer starts from it) and each quantization at its bits per weight."""
    return (0 if f16_kept else 1) + sum(gguf.QUANTIZATIONS[name] / 16 for name in quantizations if name != "f16")


def check_free_space(folder: Path, needed: int, what: str):
    """Refuse before writing anything when the disk under `folder` cannot hold `needed` bytes."""
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise UserError(f"{what} needs about {size(needed)} free in {folder}, which has {size(free)}; free some space "
                        f"or choose another disk with --export-dir")


def is_out_of_disk(error: BaseException) -> bool:
    text = str(error)
    return getattr(error, "errno", None) == errno.ENOSPC or "No space left" in text or "no disk space" in text


def model_card(run: TrainedRun, export_format: str, files: list[str] | None = None) -> str:
    """README.md for the hub: what was trained, from what, on what, and how well (from the run's manifest), and the
    `files` the export holds."""
    hyperparameters = "\n".join(f"| `{name}` | `{value}` |" for name, value in run.hyperparameters.items())
    data = run.manifest.get("data", {})
    source = data.get("source", "n/a")
    # The run's figures describe its own adapter; a checkpoint exported with --adapter has none of its own.
    final = run.adapter.resolve() == (run.path / "adapter").resolve()
    metrics = {key: value for key, value in run.record.metrics.items()
               if final and isinstance(value, (int, float)) and not isinstance(value, bool)}
    ran = [f"- {what}: {run.manifest[key]}" for key, what in (("model", "trained on"), ("optimizer", "optimiser that ran"),
                                                              ("precision", "computed in")) if run.manifest.get(key)]
    what, library, usage = {
        "adapter": ("the LoRA adapter alone", "peft",
                    "Load it on its base model with Unsloth (`FastLanguageModel.from_pretrained` on this repository) "
                    "or PEFT (`AutoPeftModelForCausalLM.from_pretrained`)."),
        "merged16": ("the adapter merged into the weights", "transformers",
                     "Load with `transformers` (`AutoModelForCausalLM.from_pretrained`) or serve with vLLM."),
        "gguf": ("the adapter merged into the weights", "gguf",
                 "Run with llama.cpp or LM Studio, or `ollama create NAME -f Modelfile` in this folder."),
    }[export_format]
    # The hub takes base_model only as a repository id: a local folder (a smoke run's, your own) is left out.
    on_hub = not Path(run.base_model).is_absolute() and not Path(run.base_model).exists()
    return "\n".join([
        "---", *([f"base_model: {run.base_model}"] if on_hub else []), f"library_name: {library}",
        "tags: [unsloth, lora, trl]", "---", "",
        f"# {run.recipe} ({export_format})", "",
        *(["**A smoke run: a tiny random-init model trained to check the pipeline, not for use.**", ""]
          if run.smoke else []),
        f"LoRA fine-tune of `{run.base_model if on_hub else Path(run.base_model).name}` by the `{run.recipe}` recipe, "
        f"trained with Unsloth + TRL + PEFT: {what}. {usage}", "",
        adapter_line(run),
        *([f"- files: {', '.join(f'`{name}`' for name in files)}"] if files else []),
        f"- data: `{Path(source).name if Path(source).is_file() else source}` ({data.get('report', 'n/a')})",
        f"- system prompt: {run.system_prompt or 'none'}", *ran,
        *[f"- {key}: {value:.4g}" for key, value in metrics.items()], "",
        "| hyperparameter (as configured; the lines above say what ran) | value |", "|---|---|", hyperparameters, ""])


def hub_token() -> str:
    """The token comes from the environment only: never a file, a flag or a log line."""
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise UserError("--push-to-hub needs a token in the HF_TOKEN environment variable (a write token from your "
                        "hub account settings); nothing was uploaded")
    return token


def adapter_line(run: TrainedRun) -> str:
    """The model card's line naming the adapter exported, with its weights' hash: an export already there is reused
    only when it holds this very adapter."""
    adapter = run.adapter.resolve()
    inside_run = adapter.is_relative_to(run.path.resolve())
    digest = run.adapter_sha256
    return (f"- adapter: `{adapter.relative_to(run.path.resolve()) if inside_run else adapter}` "
            f"(sha256 {digest[:16] if digest else 'n/a'})")


def holds_export_of(folder: Path, run: TrainedRun) -> bool:
    """Whether `folder` is a complete export of this run's adapter (its card says so)."""
    card = folder / "README.md"
    return card.is_file() and adapter_line(run) in card.read_text().splitlines()


def say_if_replacing(folder: Path, run: TrainedRun):
    """An export of another adapter is replaced, never deleted without a word."""
    if not folder.exists() or holds_export_of(folder, run):
        return
    card = folder / "README.md"
    lines = card.read_text().splitlines() if card.is_file() else []
    named = next((line.removeprefix("- adapter: ") for line in lines if line.startswith("- adapter: ")), None)
    print(f"{folder.name}: {folder} holds the export of another adapter, "
          f"{named or 'one its model card does not name'}: replacing it")


def check_repo_id(repo_id: str):
    """A name the hub would refuse is refused before exporting, not after."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UserError(f"--push-to-hub {repo_id}: not a valid repository name ({str(error).splitlines()[0][:160]}); "
                        "use USER/NAME with letters, digits, '-', '_' and '.'") from None


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
    args = export_arguments(sys.argv[1:] if argv is None else argv)
    run = open_run(args.run_dir, args.adapter)
    quantizations = gguf.check_quantizations([q.strip() for q in args.quantization.split(",") if q.strip()])
    token = None
    if args.push_to_hub:
        check_repo_id(args.push_to_hub)
        token = hub_token()
    hardware = detect(args.precision)
    exports = Path(args.export_dir) if args.export_dir else run.path / "export"
    reused = "{}: {} holds this adapter's export already (delete it to export again)"
    if args.format == "adapter":
        result = exports / "adapter"
        if holds_export_of(result, run):
            print(reused.format("adapter", result))
        else:
            say_if_replacing(result, run)
            export_adapter(run, result)
            print(f"adapter: {result} ({size(folder_bytes(result))})")
    else:
        merged = exports / "merged16"
        kept = kept_quantizations(exports / "gguf", run) if args.format == "gguf" else []
        new = [quantization for quantization in quantizations if quantization not in kept]
        if holds_export_of(merged, run):
            print(reused.format("merged16", merged))
        else:
            say_if_replacing(merged, run)
            figures = export_merged16(run, hardware.precision, merged,
                                      gguf_factor(new, "f16" in kept) if args.format == "gguf" else 0.0)
            print(f"merged16: {merged} ({size(folder_bytes(merged))}, {figures['seconds']:.0f} s"
                  + (f", peak GPU memory {figures['peak_gpu_memory_gib']:.2f} GiB)"
                     if figures["peak_gpu_memory_gib"] else ")"))
        result = merged
    if args.format == "gguf":
        result = exports / "gguf"
        if not new:
            print(reused.format("gguf", result))
        else:
            say_if_replacing(result, run)
            check_free_space(exports, int(folder_bytes(merged) * gguf_factor(new, "f16" in kept)), "the GGUF files")
            timings = export_gguf(run, merged, quantizations, result, args.gguf_pre_tokenizer, kept)
            if "f16" in kept:
                print(f"gguf: quantized from {gguf_file(result, run, 'f16')}, kept from the earlier export")
            elif "f16" not in quantizations:
                print(f"gguf: converted to f16 in {timings['f16']:.0f} s (an intermediate, not kept)")
            for quantization in quantizations:
                file = gguf_file(result, run, quantization)
                done = f"{timings[quantization]:.0f} s" if quantization in new else "already there"
                print(f"gguf {quantization}: {file} ({size(file.stat().st_size)}, {done})")
            if kept:
                print(f"gguf: {result} holds {', '.join(kept_quantizations(result, run))}")
        print(f"ollama: cd {result} && ollama create {run.recipe} -f Modelfile && ollama run {run.recipe}")
    if args.push_to_hub:
        push_to_hub(result, args.push_to_hub, args.private, token)


def folder_bytes(folder: Path) -> int:
    return sum(file.stat().st_size for file in folder.rglob("*") if file.is_file())


def size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


if __name__ == "__main__":
    run_main(main, interrupted="interrupted; what was being exported was removed, earlier exports stand")
