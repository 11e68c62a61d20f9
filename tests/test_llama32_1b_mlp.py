"""llama32_1b_mlp on CPU through Unsloth's CPU backend: smoke run, adapters only on the MLP, attention weights
bit-identical after training (and the check catches a change), Q&A formats mapped to messages, held-out split."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import cpu_training_precision, read_jsonl, run_folders, run_to_completion

RECIPE = "llama32_1b_mlp"
SAMPLE = Path(__file__).resolve().parent.parent / "recipes" / "data" / "repo_qa_sample.jsonl"
MLP_MODULES = [f"model.layers.{layer}.mlp.{name}" for layer in (0, 1) for name in ("down_proj", "gate_proj", "up_proj")]


def train_losses(folder):
    return [(r["step"], r["loss"]) for r in read_jsonl(folder / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    folder, result = run_to_completion(RECIPE, "--smoke", output_dir=tmp_path_factory.mktemp("smoke"))
    return folder, json.loads((folder / "manifest.json").read_text())


@pytest.fixture(scope="module")
def recipe():
    from recipes import llama32_1b_mlp
    return llama32_1b_mlp


@pytest.fixture(scope="module")
def tokenizer(recipe):
    from common.chat import set_chat_template
    from common.smoke import train_tokenizer
    corpus = [line.strip() for line in recipe.SAMPLE_DATA.read_text().splitlines()]
    return set_chat_template(train_tokenizer(corpus, "llama-3.1"), "llama-3.1")


def test_smoke_run_writes_every_output_with_the_card_settings(smoke_run):
    folder, manifest = smoke_run
    for name in ("config.json", "manifest.json", "metrics.jsonl", "results.md", "adapter/adapter_model.safetensors",
                 "adapter/adapter_config.json", "adapter/tokenizer_config.json"):
        assert (folder / name).exists(), name
    assert not (folder / "FAILED").exists()
    adapter_config = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter_config["target_modules"]) == ["down_proj", "gate_proj", "up_proj"]
    assert (adapter_config["r"], adapter_config["lora_alpha"], adapter_config["lora_dropout"]) == (16, 16, 0.0)
    settings = json.loads((folder / "config.json").read_text())["hyperparameters"]
    assert (settings["lr_scheduler_type"], settings["weight_decay"], settings["max_seq_length"]) == ("linear", 0.01, 2048)
    assert manifest["precision"] == cpu_training_precision() and manifest["precision_requested"] == "fp32" and manifest["seed"] == 3407 and len(manifest["data"]["sha256"]) == 64
    sample = read_jsonl(SAMPLE)  # every row of the bundled sample is a usable Q&A pair: none dropped
    assert (manifest["data"]["rows"], manifest["data"]["kept"]) == (len(sample), len(sample))
    assert (manifest["data"]["train"], manifest["data"]["eval"]) == (len(sample) - 3, 3)  # smoke: 3 held out
    assert [step for step, _ in train_losses(folder)] == list(range(1, 13))  # smoke: 12 steps, logged every step


def test_only_mlp_modules_carry_adapters(smoke_run):
    folder, manifest = smoke_run
    assert manifest["lora_modules"] == MLP_MODULES and manifest["lora_only_on_mlp"] is True
    saved = load_file(folder / "adapter" / "adapter_model.safetensors")
    assert saved and all(".mlp." in key and ".lora_" in key for key in saved), sorted(saved)


def test_attention_weights_are_bit_identical_after_training(smoke_run):
    folder, manifest = smoke_run
    assert manifest["attention_weights_checked"] == 8  # 2 layers x q, k, v, o
    assert manifest["attention_weights_changed"] == [] and manifest["attention_frozen"] is True
    # Not vacuous: training did move the MLP adapters (LoRA B starts at zero).
    saved = load_file(folder / "adapter" / "adapter_model.safetensors")
    assert all(saved[key].abs().sum() > 0 for key in saved if "lora_B" in key)
    assert "8 attention weights bit-identical after training: yes" in (folder / "results.md").read_text()


def test_held_out_questions_answered_before_and_after(smoke_run):
    folder, manifest = smoke_run
    assert manifest["held_out_loss_after"] < manifest["held_out_loss_before"]
    # the last 3 of the sample's rows after the seeded shuffle (seed 3407)
    assert manifest["held_out_questions"] == ["Can I keep my settings in a file instead of flags?",
                                              "Which data formats can --data read?",
                                              "Does a smoke run need the internet or a GPU?"]
    results = (folder / "results.md").read_text()
    assert "| question | reference answer | before | after |" in results
    rows = [line for line in results.splitlines() if line.startswith("| ") and not line.startswith("| question")]
    assert len(rows) == len(manifest["held_out_questions"]) == 3
    for row, question in zip(rows, manifest["held_out_questions"]):
        assert row.startswith(f"| {question} | ") and row.count(" | ") == 3
    assert f"{manifest['held_out_loss_before']:.4f} before training, {manifest['held_out_loss_after']:.4f} after" in results


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_qa_alpaca_and_messages_rows_map_to_the_same_conversations(recipe, tokenizer, tmp_path):
    pairs = [(f"What does flag number {i} do?", f"Flag {i} sets option {i}.") for i in range(12)]
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": q, "answer": a} for q, a in pairs])
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": q, "input": "", "output": a} for q, a in pairs])
    messages = write_jsonl(tmp_path / "messages.jsonl", [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs])
    domain = "You answer questions about flags."
    splits = [recipe.domain_conversations(recipe.Config(data=source, held_out_questions=3, system_prompt=domain),
                                          tokenizer) for source in (qa, alpaca, messages)]
    assert splits[0][:2] == splits[1][:2] == splits[2][:2]
    train, held_out, data = splits[0]
    system = {"role": "system", "content": domain}
    expected = [[system, {"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in pairs]
    assert sorted(map(str, train + held_out)) == sorted(map(str, expected))
    assert (len(train), len(held_out), data["train"], data["eval"]) == (9, 3, 9, 3)
    assert not {str(c) for c in held_out} & {str(c) for c in train}


def test_held_out_split_is_seeded_and_system_prompt_optional(recipe, tokenizer, tmp_path):
    rows = [{"question": f"Question {i}?", "answer": f"Answer {i}."} for i in range(20)]
    rows[0]["system"] = "A row's own system prompt."
    source = write_jsonl(tmp_path / "qa.jsonl", rows)
    first = recipe.domain_conversations(recipe.Config(data=source, system_prompt="Domain."), tokenizer)
    assert recipe.domain_conversations(recipe.Config(data=source, system_prompt="Domain."), tokenizer)[:2] == first[:2]
    assert recipe.domain_conversations(recipe.Config(data=source, seed=1), tokenizer)[1] != first[1]
    conversations = first[0] + first[1]
    own = [c for c in conversations if c[1]["content"] == "Question 0?"][0]
    assert own[0] == {"role": "system", "content": "A row's own system prompt."}  # the row's own wins
    assert sum(c[0] == {"role": "system", "content": "Domain."} for c in conversations) == 19
    train, held_out, _ = recipe.domain_conversations(recipe.Config(data=source, system_prompt=""), tokenizer)
    with_system = [c for c in train + held_out if c[0]["role"] == "system"]
    assert len(train + held_out) == 20 and [c[1]["content"] for c in with_system] == ["Question 0?"]


def test_data_mistakes_are_one_line_user_errors(recipe, tokenizer, tmp_path):
    from common.errors import UserError
    with pytest.raises(UserError, match=r"give --data, e\.g\. --data my_qa\.jsonl with rows like"):
        recipe.main(["--output-dir", str(tmp_path / "outputs")])  # the card's data is private: there is no default
    assert not (tmp_path / "outputs").exists()
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"prompt": "Q?", "reply": "A."}] * 4)
    with pytest.raises(UserError, match=r"wrong\.jsonl: no supported format; found columns \['prompt', 'reply'\]"):
        recipe.domain_conversations(recipe.Config(data=wrong), tokenizer)
    few = write_jsonl(tmp_path / "few.jsonl", [{"question": "Q?", "answer": "A."}] * 4)
    with pytest.raises(UserError, match=r"--held-out-questions 5: use 1 to 3 for .*few\.jsonl"):
        recipe.domain_conversations(recipe.Config(data=few), tokenizer)


def test_check_catches_a_changed_attention_weight_and_attention_adapters(recipe):
    from unsloth import FastLanguageModel
    from common.data import read_rows
    from common.smoke import tiny_model
    folder = tiny_model("llama-3.1", read_rows(str(SAMPLE))[:10])

    def model_with_adapters(targets):
        model, _ = FastLanguageModel.from_pretrained(folder, max_seq_length=256, load_in_4bit=True)
        before = recipe.attention_fingerprints(model)
        return FastLanguageModel.get_peft_model(model, r=4, lora_alpha=4, target_modules=targets), before

    model, before = model_with_adapters(list(recipe.MLP))
    assert recipe.mlp_only_check(model, before)["attention_frozen"] is True
    with torch.no_grad():
        weight = model.base_model.model.model.layers[1].self_attn.k_proj.weight
        weight.data.view(-1)[0] += 1  # one packed 4-bit pair: the smallest change there is
    check = recipe.mlp_only_check(model, before)
    assert check["attention_weights_changed"] == ["model.layers.1.self_attn.k_proj"]
    assert check["attention_frozen"] is False and check["lora_only_on_mlp"] is True

    model, before = model_with_adapters(["q_proj", *recipe.MLP])
    check = recipe.mlp_only_check(model, before)
    assert check["lora_only_on_mlp"] is False
    assert "model.layers.0.self_attn.q_proj" in check["lora_modules"]


def test_interrupted_run_resumes_to_the_same_losses(recipe, smoke_run, tmp_path):
    uninterrupted, _ = smoke_run
    recipe.main(["--smoke", "--stop-after-step", "6", "--output-dir", str(tmp_path)])
    (folder,) = run_folders(tmp_path, RECIPE)
    assert (folder / "STOPPED").exists() and not (folder / "results.md").exists()
    recipe.main(["--resume", str(folder)])
    assert run_folders(tmp_path, RECIPE) == [folder] and (folder / "results.md").exists()
    expected, got = train_losses(uninterrupted), train_losses(folder)
    assert [step for step, _ in got] == [step for step, _ in expected] == list(range(1, 13))
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in expected], rel=1e-4)
    assert json.loads((folder / "manifest.json").read_text())["attention_frozen"] is True
