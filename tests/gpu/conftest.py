"""GPU tests train on random-init models of the cards' real shapes, built on the GPU by bench/shapes.py (weights
random: right for speed, memory and pipeline checks, meaningless for quality), and run the recipes in this process:
importing Unsloth takes about 40 s, once for the suite instead of once a recipe.

Every recipe test runs twice (the `precision` fixture): in bf16, as on an A100 or H100, and in fp16 with the process
capped at a T4's 15 GiB, as on a free Colab T4. Each run's peak memory, tokens/s and fp16 health go into a table printed
at the end of the session (and appended to the file GPU_TEST_REPORT names, one JSON line a run). GPU_TEST_MODELS names
a folder that keeps the built models between sessions."""
import unsloth  # noqa: F401  (before transformers, as in the recipes: the adapter reload then runs the fast path)

import importlib
import json
import math
import os
from pathlib import Path

import pytest
import torch

from bench.shapes import build_model, prepared_model, release_gpu_memory  # noqa: F401  (build_model: for GPU tests)
from common.data import read_rows, to_conversations, token_count
from tests.conftest import read_jsonl, run_folders, the_new_run_folder

T4_MEMORY_GIB = 15  # a 16 GB T4 as CUDA reports it: an fp16 run allocating more fails here as it would there
# An fp16 step is skipped when its gradients overflow (the logged grad_norm is then inf or nan) while the GradScaler
# lowers its scale from 65,536: a few at the start are normal; more means the recipe does not train in fp16.
MAX_OVERFLOW_STEPS = {"bf16": 0, "fp16": 5}
PROBE_IDS = list(range(5, 37))  # fixed token ids inside every test tokenizer: the logits a reloaded adapter must give
MEASURED: list[dict] = []
PROBED: dict = {}


def long_tail_chat_data(sample: Path, tokenizer, max_seq_length: int, path: Path) -> list[int]:
    """The sample's conversations as they are, plus the long tail real chat data has: multi-turn conversations chained
    from the sample's, each as long as the next whole conversation allows within max_seq_length (chat template
    applied), so a step meets full-length rows. Writes them to `path` as messages rows; returns their token counts."""
    conversations = to_conversations(read_rows(str(sample)), str(sample))[0]
    chained, current, parts = [], [], 0
    for conversation in conversations:
        turns = [turn for turn in conversation if turn["role"] != "system"]
        if current and token_count(tokenizer, current + turns) > max_seq_length:
            chained += [current] if parts > 1 else []
            current, parts = [], 0
        current, parts = current + turns, parts + 1
    rows = [c for c in conversations + chained if token_count(tokenizer, c) <= max_seq_length]
    path.write_text("".join(json.dumps({"messages": row}) + "\n" for row in rows))
    return [token_count(tokenizer, row) for row in rows]


@pytest.fixture(scope="session")
def real_shape_model(tmp_path_factory):
    """real_shape_model('llama-3-8b') -> folder of a random-init model of that shape (built once)."""
    models = Path(os.environ["GPU_TEST_MODELS"]) if os.environ.get("GPU_TEST_MODELS") else tmp_path_factory.mktemp("models")
    return lambda shape: prepared_model(shape, models)


@pytest.fixture(params=["bf16", "fp16"])
def precision(request) -> str:
    return request.param


@pytest.fixture
def run_recipe(tmp_path, precision, logits_at_save):
    """Run a recipe's main() here at the test's precision, as `python -m recipes.<name> --precision ...` would, and
    return the one run folder it wrote; fp16 runs are capped at T4_MEMORY_GIB. Fails the test when a loss is not finite
    or more steps overflowed than MAX_OVERFLOW_STEPS allows."""
    def run(recipe: str, *args: str, output_dir: Path | None = None) -> Path:
        output_dir = output_dir or tmp_path / "outputs"
        before = set(run_folders(output_dir, recipe))
        release_gpu_memory()
        if precision == "fp16":
            torch.cuda.set_per_process_memory_fraction(T4_MEMORY_GIB * 2**30 / torch.cuda.mem_get_info()[1])
        module = importlib.import_module(f"recipes.{recipe}")
        # A T4's 15 GiB makes --token-budget auto keep the card's passes; the cap does not change the total memory
        # auto reads, so the fp16 runs ask for the card's passes as a T4 would get them.
        as_on_a_t4 = ["--token-budget", "card"] if precision == "fp16" and hasattr(module.Config, "token_budget") else []
        try:
            module.main([*args, *as_on_a_t4, "--precision", precision, "--output-dir", str(output_dir)])
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
            release_gpu_memory()
        folder = the_new_run_folder(output_dir, recipe, before)
        record_and_check_training(recipe, precision, folder)
        return folder
    return run


def trained_parts(folder: Path, manifest: dict) -> list[tuple[str, Path, dict]]:
    """(label, metrics file, manifest entry) for each training a run did: GPT-2's study trains a side a rank, a rank
    sweep a rank, every other run once."""
    if manifest.get("runs"):
        return [(f"{e['side']} r{e['rank']}", folder / "metrics" / f"{e['side']}-r{e['rank']}.jsonl", e)
                for e in manifest["runs"]]
    if manifest.get("sweep"):
        return [(f"r{e['rank']}", folder / "sweep" / f"r{e['rank']}" / "metrics.jsonl", e) for e in manifest["sweep"]]
    return [("", folder / "metrics.jsonl", manifest)]


def record_and_check_training(recipe: str, precision: str, folder: Path):
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["precision"] == precision, manifest["precision"]
    for label, metrics, entry in trained_parts(folder, manifest):
        logs = [r for r in read_jsonl(metrics) if "loss" in r]
        overflowed = [r["step"] for r in logs if not math.isfinite(r.get("grad_norm", 0.0))]
        assert logs and all(math.isfinite(r["loss"]) for r in logs), f"{metrics}: a loss is not finite"
        assert len(overflowed) <= MAX_OVERFLOW_STEPS[precision], f"{metrics}: gradients overflowed at steps {overflowed}"
        row = {"recipe": f"{recipe} {label}".strip(), "precision": precision, "steps": len(logs),
               "peak_gpu_memory_gib": entry["peak_gpu_memory_gib"], "tokens_per_s": entry["tokens_per_s"],
               "overflow_steps": len(overflowed), "final_loss": logs[-1]["loss"]}
        MEASURED.append(row)
        if os.environ.get("GPU_TEST_REPORT"):
            with open(os.environ["GPU_TEST_REPORT"], "a") as report:
                report.write(json.dumps(row) + "\n")


def pytest_terminal_summary(terminalreporter):
    if not MEASURED:
        return
    terminalreporter.write_line("\n| recipe | precision | steps | peak GiB | tokens/s | overflowed steps | final loss |"
                                "\n|---|---|---:|---:|---:|---:|---:|")
    for row in MEASURED:
        terminalreporter.write_line(
            f"| {row['recipe']} | {row['precision']} | {row['steps']} | "
            f"{row['peak_gpu_memory_gib']:.2f} | {row['tokens_per_s']:,.0f} | {row['overflow_steps']} | "
            f"{row['final_loss']:.4f} |")


def probe_logits(model) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([PROBE_IDS], device=model.device)).logits.float().cpu()
    model.train(was_training)
    return logits


@pytest.fixture(scope="session")
def probing_saves():
    """PeftModel.save_pretrained probes the model's logits on PROBE_IDS before saving, into PROBED, for the whole
    session: Unsloth keeps a reference to the save_pretrained it first sees, so one wrapper must serve every test."""
    from peft import PeftModel
    save_pretrained = PeftModel.save_pretrained

    def probing_save_pretrained(self, save_directory, *args, **kwargs):
        if not Path(save_directory).name.startswith("checkpoint-"):
            folder = Path(save_directory)  # adapters are written as <name>.partial, then renamed
            PROBED[folder.with_name(folder.name.removesuffix(".partial")).resolve()] = probe_logits(self)
        return save_pretrained(self, save_directory, *args, **kwargs)
    PeftModel.save_pretrained = probing_save_pretrained
    yield
    PeftModel.save_pretrained = save_pretrained


@pytest.fixture
def logits_at_save(probing_saves) -> dict:
    """{adapter folder: the trained model's logits on PROBE_IDS just before the recipe saved it there}. Checkpoints
    are not probed: the recipe saves its final adapter outside the Trainer."""
    PROBED.clear()
    return PROBED


def assert_reload_reproduces_training(model, trained_logits: torch.Tensor):
    """A reloaded adapter gives the logits the trained model gave before saving, and not the base model's: the
    difference after reloading (rounding in the compute dtype) must be under a quarter of what the adapter changes, by
    L2 norm over the probe's logits. A missing, stale or foreign adapter fails."""
    reloaded = probe_logits(model)
    with model.disable_adapter():
        base = probe_logits(model)
    adapter_effect = (trained_logits - base).norm().item()
    reload_error = (reloaded - trained_logits).norm().item()
    print(f"reload check: |reloaded - trained| {reload_error:.3e}, |trained - base| {adapter_effect:.3e} (L2 over "
          f"{trained_logits.numel():,} logits), ratio {reload_error / max(adapter_effect, 1e-30):.3f}")
    assert adapter_effect > 0 and reload_error <= 0.25 * adapter_effect, (reload_error, adapter_effect)
