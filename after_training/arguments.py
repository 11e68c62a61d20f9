"""The command lines of `./run.sh chat` and `./run.sh export`, kept apart from the modules that import Unsloth: run.sh
checks them first, so --help and a mistyped flag answer in a second, before anything is installed or imported.

  python -m after_training.arguments chat RUN_DIR --prompt "Hi"     exit 0: the arguments parse; 2: argparse's message
"""
import argparse
import sys

from after_training.gguf import QUANTIZATIONS


def chat_arguments(argv):
    parser = argparse.ArgumentParser(prog="./run.sh chat", description="Chat with a trained run's model.")
    parser.add_argument("run_dir", help="a finished run folder, outputs/<recipe>/<stamp>")
    parser.add_argument("--prompt", help="answer this one message, print the reply and exit")
    parser.add_argument("--base", action="store_true", help="the base model without the adapter, for comparison")
    parser.add_argument("--system", help="system prompt (default: the run's own; '' for none)")
    parser.add_argument("--adapter", help="another adapter folder, e.g. RUN_DIR/checkpoints/checkpoint-200")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="reply length cap (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 (default) answers greedily, the same every time; 0.7 gives varied replies")
    parser.add_argument("--precision", default="auto",
                        choices=("auto", "bf16", "fp16", "fp32"), help="auto (the GPU decides), bf16, fp16 or fp32")
    return parser.parse_args(argv)


def export_arguments(argv):
    parser = argparse.ArgumentParser(prog="./run.sh export", description="Export a trained run's model.")
    parser.add_argument("run_dir", help="a finished run folder, outputs/<recipe>/<stamp>")
    parser.add_argument("--format", required=True, choices=("adapter", "merged16", "gguf"),
                        help="adapter: the LoRA adapter alone, to share; merged16: 16-bit transformers weights (vLLM); "
                             "gguf: llama.cpp / Ollama / LM Studio")
    parser.add_argument("--quantization", default="q4_k_m",
                        help=f"gguf only, comma-separated: {', '.join(QUANTIZATIONS)} (default q4_k_m)")
    parser.add_argument("--push-to-hub", metavar="USER/REPO", help="upload the export there (token: HF_TOKEN)")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    parser.add_argument("--adapter", help="another adapter folder, e.g. RUN_DIR/checkpoints/checkpoint-200")
    parser.add_argument("--export-dir", help="where the export folders go (default RUN_DIR/export); a merged 8B model "
                                             "and its GGUF files take about 43 GiB")
    parser.add_argument("--gguf-pre-tokenizer", help="for a tokenizer llama.cpp does not recognize: the known one it "
                                                     "splits like (llama-bpe for Llama 3, gpt-2 for GPT-2)")
    parser.add_argument("--precision", default="auto",
                        choices=("auto", "bf16", "fp16", "fp32"), help="auto (the GPU decides), bf16, fp16 or fp32")
    return parser.parse_args(argv)


if __name__ == "__main__":
    {"chat": chat_arguments, "export": export_arguments}[sys.argv[1]](sys.argv[2:])
