"""llama3_8b on two GPUs as ./run.sh --gpus 2 starts it (python -m common.launch, torchrun), through Unsloth's GPU path: NCCL, the card's effective batch kept, and
Unsloth's token budget splitting every step on both ranks (the ranks agree on each step's number of passes, so Unsloth
never falls back to running a step unsplit). Chat rows with a long tail give the ranks steps of different sizes, which
is where their pass counts would differ. Skipped on a machine with fewer than two GPUs."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, read_jsonl, run_folders
from tests.gpu.conftest import long_tail_chat_data

SAMPLE = REPO / "recipes" / "data" / "finetome_sample.jsonl"
UNSPLIT = "UNSLOTH_TOKEN_BUDGET not splitting"  # what Unsloth prints when it runs a step's rows in one pass


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("token_budget", ["card", "auto"])
def test_two_gpus_train_one_run_with_every_step_split_on_both_ranks(real_shape_model, token_budget, tmp_path):
    from transformers import AutoTokenizer
    from common.chat import set_chat_template
    base = real_shape_model("llama-3-8b")
    tokenizer = set_chat_template(AutoTokenizer.from_pretrained(base), "llama-3")
    lengths = long_tail_chat_data(SAMPLE, tokenizer, 1024, tmp_path / "chats.jsonl")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-m", "common.launch", "--standalone", "--nproc_per_node", "2", "-m", "recipes.llama3_8b",
         "--model-name", base, "--data", str(tmp_path / "chats.jsonl"),
         "--max-samples", "0", "--max-steps", "10", "--warmup-steps", "2", "--eval-steps", "5",
         "--max-eval-samples", "8", "--sample-prompts", "1", "--max-new-tokens", "16", "--token-budget", token_budget,
         "--output-dir", str(tmp_path / "outputs")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert UNSPLIT not in log, [line for line in log.splitlines() if UNSPLIT in line]
    (folder,) = run_folders(tmp_path / "outputs", "llama3_8b")
    manifest = json.loads((folder / "manifest.json").read_text())
    print(f"\nllama3_8b on 2 x {manifest['gpu']} (--token-budget {token_budget}), rows of {min(lengths)}-{max(lengths)} "
          f"tokens: {manifest['tokens_per_s']:,.0f} tokens/s together, {manifest['tokens_per_s_per_gpu']:,.0f} a GPU, "
          f"median step {manifest['median_step_time_s']:.3f} s, peak by GPU {manifest['peak_gpu_memory_gib_per_gpu']} "
          f"GiB; {manifest['token_budget']}")
    assert manifest["batch"] == {"world_size": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4,
                                 "effective_batch": 16}
    assert manifest["batching"] == "token-budget"
    assert all(peak and peak > 1 for peak in manifest["peak_gpu_memory_gib_per_gpu"])  # both GPUs held the model
    losses = [r["loss"] for r in read_jsonl(folder / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 10 and all(math.isfinite(loss) for loss in losses)
    assert (folder / "adapter" / "adapter_model.safetensors").is_file() and (folder / "results.md").is_file()
    assert not list(Path(tmp_path / "outputs" / "llama3_8b").glob("*-2"))  # the second rank wrote no run of its own
