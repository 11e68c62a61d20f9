"""GGUF files through llama.cpp's own converter and quantizer, offline.

The converter (convert_hf_to_gguf.py with its conversion/ and gguf-py/ packages) comes from the llama-cpp-python
source package, the quantizer from the llama_cpp module that package builds: ./run.sh export installs both on first
use (requirements-export.txt), so nothing is cloned or downloaded at export time. Each step runs in its own process
(`python -m after_training.gguf convert|quantize ...`) with its output in the export's log.
"""
import subprocess
import sys
from pathlib import Path

from common.config import REPO_ROOT
from common.errors import UserError

CONVERTER = REPO_ROOT / ".export-tools" / "llama.cpp"  # where ./run.sh export unpacks llama.cpp's converter
# llama.cpp's names, each with the bits a weight takes in its files (f16 and q8_0 exact; the k-quants mix types,
# measured on a Llama-3-8B: q4_k_m 4.58 GiB where f16 is 14.96): what the free-disk check before an export counts.
QUANTIZATIONS = {"f16": 16, "q8_0": 8.5, "q6_k": 6.6, "q5_k_m": 5.7, "q4_k_m": 4.9, "q4_0": 4.5, "q3_k_m": 3.9,
                 "q2_k": 3.4}
NOT_RECOGNIZED = "BPE pre-tokenizer was not recognized"


def check_quantizations(names: list[str]) -> list[str]:
    unknown = [name for name in names if name not in QUANTIZATIONS]
    if unknown or not names:
        raise UserError(f"--quantization {','.join(names)}: use some of {', '.join(QUANTIZATIONS)}")
    return names


def check_tools():
    if not (CONVERTER / "convert_hf_to_gguf.py").is_file():
        raise UserError(f"llama.cpp's converter is not in {CONVERTER}; export through ./run.sh export, which installs "
                        "it on first use")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise UserError("llama-cpp-python is not installed; export through ./run.sh export, which installs it "
                        "(requirements-export.txt) on first use") from None


def _run_step(args: list[str], log: Path, what: str):
    with log.open("a") as handle:
        handle.write(f"$ {' '.join(args)}\n")
        handle.flush()
        result = subprocess.run([sys.executable, "-m", "after_training.gguf", *args], stdout=handle,
                                stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    if result.returncode != 0:
        text = log.read_text()
        if NOT_RECOGNIZED in text:
            raise UserError("llama.cpp does not recognize this tokenizer's pre-tokenizer; name the one it derives "
                            "from with --gguf-pre-tokenizer (llama-bpe for Llama 3, gpt-2 for GPT-2)")
        if "No space left on device" in text:
            raise UserError(f"{what} ran out of disk in {log.parent}; free some space or choose another disk with "
                            "--export-dir")
        lines = [line.split("\r")[-1].strip() for line in text.splitlines()]  # a progress bar's last state
        reason = next((line for line in reversed(lines) if "error loading model" in line), None) or next(
            (line for line in reversed(lines) if line), "no output")
        raise UserError(f"{what} failed: {reason[:200]} (full output in {log})")


def convert(merged_dir: Path, outfile: Path, log: Path, pre_tokenizer: str | None = None):
    """HF folder -> f16 GGUF with llama.cpp's convert_hf_to_gguf.py."""
    _run_step(["convert", str(merged_dir), str(outfile), pre_tokenizer or ""], log, "llama.cpp's converter")


def quantize(f16_file: Path, outfile: Path, quantization: str, log: Path):
    """f16 GGUF -> a quantized GGUF with llama.cpp's quantizer (llama_model_quantize)."""
    _run_step(["quantize", str(f16_file), str(outfile), quantization], log, f"llama.cpp's quantizer ({quantization})")


def check_loads(gguf_file: Path, log: Path):
    """llama.cpp reads the file's metadata and vocabulary back, as every program that runs it will."""
    _run_step(["check", str(gguf_file)], log, f"llama.cpp loading {gguf_file.name}")


def _convert_main(merged_dir: str, outfile: str, pre_tokenizer: str):
    sys.path.insert(0, str(CONVERTER))
    import convert_hf_to_gguf
    if pre_tokenizer:  # a tokenizer trained by hand: say which known pre-tokenizer its splitting follows
        from conversion.base import TextModel
        TextModel.get_vocab_base_pre = lambda self, tokenizer: pre_tokenizer
    from conversion.base import ModelBase
    load_hparams = ModelBase.load_hparams

    def load_hparams_with_gpt2_context(dir_model, is_mistral_format):
        # transformers 5 writes GPT-2's context length as n_positions only; llama.cpp's GPT-2 converter reads n_ctx.
        config = load_hparams(dir_model, is_mistral_format)
        if config.get("model_type") == "gpt2":
            config.setdefault("n_ctx", config.get("n_positions"))
        return config
    ModelBase.load_hparams = staticmethod(load_hparams_with_gpt2_context)
    sys.argv = ["convert_hf_to_gguf.py", merged_dir, "--outfile", outfile, "--outtype", "f16"]
    convert_hf_to_gguf.main()


def _quantize_main(f16_file: str, outfile: str, quantization: str):
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quantization.upper()}")
    if llama_cpp.llama_model_quantize(f16_file.encode(), outfile.encode(), params) != 0:
        sys.exit(f"llama_model_quantize returned an error for {quantization}")


def _check_main(gguf_file: str):
    import llama_cpp
    llama_cpp.Llama(model_path=gguf_file, vocab_only=True, verbose=True)  # verbose: llama.cpp's reason goes to the log


if __name__ == "__main__":
    step, *arguments = sys.argv[1:]
    {"convert": _convert_main, "quantize": _quantize_main, "check": _check_main}[step](*arguments)
