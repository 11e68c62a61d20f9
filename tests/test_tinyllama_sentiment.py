"""tinyllama_sentiment on CPU through Unsloth's CPU backend: the smoke run and what it writes, loss on the answer only,
constrained label choice, metrics against hand counts and scikit-learn, data errors, --balance, and a learnability
check (a tiny model learns a synthetic cue-word task far above the majority baseline, twice to the same F1)."""
import json
import shutil
import random
from types import SimpleNamespace

import pytest
import torch
from sklearn.metrics import f1_score

from tests.conftest import REPO, cpu_training_precision, read_jsonl, run_folders, run_recipe_process, run_to_completion

RECIPE = "tinyllama_sentiment"
SAMPLE = REPO / "recipes" / "data" / "tweet_sentiment_sample.jsonl"
LABELS = ("negative", "neutral", "positive")
# Each class's tweets are made of its own six words: learnable from the text alone, by a model that reads it.
CUE_WORDS = {"negative": "awful terrible hate broken sad angry".split(),
             "neutral": "schedule meeting tuesday report bus station".split(),
             "positive": "love great wonderful happy brilliant amazing".split()}
# The learnability run: the recipe's code path with a higher learning rate; 16-bit on CPU, where bitsandbytes' 4-bit
# matmuls are ten times slower (the smoke run covers 4-bit, the GPU test runs this in 4-bit).
LEARN_FLAGS = ("--max-steps", "60", "--learning-rate", "1e-2", "--per-device-train-batch-size", "8",
               "--gradient-accumulation-steps", "1", "--warmup-steps", "5", "--eval-steps", "30",
               "--generation-samples", "8", "--max-new-tokens", "4", "--balance")


def write_learnable_data(path):
    """240 tweets of cue words, half neutral (so the majority baseline is a real bar), split 180/12/48."""
    rng = random.Random(0)
    with path.open("w") as handle:
        for split, count in (("train", 180), ("validation", 12), ("test", 48)):
            for i in range(count):
                label = ("negative", "neutral", "neutral", "positive")[i % 4]
                text = " ".join(rng.choices(CUE_WORDS[label], k=6))
                handle.write(json.dumps({"text": text, "label": label, "split": split}) + "\n")
    return path


def build_learnable_model(data_path, folder) -> str:
    """common.smoke's tiny Llama (2 layers, hidden 64, zephyr tokens) but with initializer_range 0.3: at the usual
    0.02 its attention is uniform over the ~40 prompt tokens and its logits are capped near 1, so LoRA learns the class
    prior in 60 steps but not to read the tweet; at 0.3 it learns the task. The tokenizer is trained on the system
    prompt, the texts and the label words, which it keeps whole as the real tokenizer does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from common.smoke import texts_in, train_tokenizer
    from recipes.tinyllama_sentiment import SYSTEM_PROMPT
    tokenizer = train_tokenizer([SYSTEM_PROMPT, *texts_in(read_jsonl(data_path))], "zephyr")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), tie_word_embeddings=True, initializer_range=0.3, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def assert_learned(folder):
    """Fine-tuned macro-F1 far above the majority baseline and above zero-shot; free replies are the label words."""
    metrics = json.loads((folder / "metrics.json").read_text())
    baseline = metrics["majority_baseline"]["macro_f1"]
    zero_shot, fine_tuned = (metrics[k]["constrained"]["macro_f1"] for k in ("zero_shot", "fine_tuned"))
    print(f"learnability: majority {baseline:.4f}, zero-shot {zero_shot:.4f}, fine-tuned {fine_tuned:.4f}")
    assert baseline == pytest.approx(2 / 9)  # always neutral on a half-neutral test split
    assert fine_tuned >= 0.6 and fine_tuned >= zero_shot + 0.3
    assert metrics["fine_tuned"]["free_generation"]["parse_rate"] >= 0.75
    return metrics


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    folder, result = run_to_completion(RECIPE, "--smoke", output_dir=tmp_path_factory.mktemp("smoke"))
    return folder, result


@pytest.fixture(scope="module")
def recipe():
    """The recipe module in-process (imports Unsloth's CPU backend once)."""
    import recipes.tinyllama_sentiment as module
    return module


@pytest.fixture(scope="module")
def tiny(recipe):
    """The smoke run's tiny model and tokenizer in fp32, in the zephyr template: Unsloth's CPU backend would pick bf16 on a
    CPU with bf16 hardware, and bf16 rounding (about 2e-3 here) is coarser than the scoring checks' 1e-4."""
    from unsloth import FastLanguageModel

    from common.chat import set_chat_template
    from common.smoke import tiny_model
    rows = read_jsonl(SAMPLE)
    folder = tiny_model("zephyr", [{"text": recipe.SYSTEM_PROMPT}] + [{"text": r["text"], "answer": LABELS[r["label"]]}
                                                                     for r in rows])
    model, tokenizer = FastLanguageModel.from_pretrained(folder, max_seq_length=256, load_in_4bit=False,
                                                         dtype=torch.float32)
    assert model.dtype == torch.float32
    return model.eval(), set_chat_template(tokenizer, "zephyr")


def test_a_checkpoint_of_an_unfinished_run_chats_with_the_system_prompt_it_trained_with(smoke_run, recipe, tmp_path):
    from after_training.trained_run import open_run
    run = tmp_path / "run"  # as a run stopped before the end: no manifest, no adapter/ yet, only checkpoints
    shutil.copytree(smoke_run[0], run, ignore=shutil.ignore_patterns("manifest.json", "adapter", "results.md"))
    checkpoint = next((run / "checkpoints").glob("checkpoint-*"))
    assert open_run(str(run), str(checkpoint)).system_prompt == recipe.SYSTEM_PROMPT


def test_smoke_run_writes_every_output(smoke_run):
    folder, result = smoke_run
    for name in ("config.json", "manifest.json", "metrics.jsonl", "metrics.json", "predictions.jsonl", "results.md",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/tokenizer_config.json"):
        assert (folder / name).exists(), name
    assert not (folder / "FAILED").exists()
    adapter = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (16, 32, 0.0)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["precision"] == cpu_training_precision() and manifest["precision_requested"] == "fp32" and manifest["seed"] == 3407 and len(manifest["data"]["sha256"]) == 64
    assert manifest["quantization"]["quant_type"] == "nf4" and manifest["quantization"]["double_quant"] is True
    assert "one word" in manifest["system_prompt"]
    losses = [r for r in read_jsonl(folder / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in losses] == list(range(1, 13))
    assert [r["step"] for r in read_jsonl(folder / "metrics.jsonl") if "eval_loss" in r] == [6, 12]
    counts = {word: sum(r["label"] == i and r["split"] == "train" for r in read_jsonl(SAMPLE))
              for i, word in enumerate(LABELS)}  # the bundled sample's train split, counted from the file
    assert f"labels: train {counts}" in result.stdout


def test_smoke_metrics_are_scikit_learns_on_the_written_predictions(smoke_run):
    folder, _ = smoke_run
    rows = read_jsonl(SAMPLE)
    test = [LABELS[r["label"]] for r in rows if r["split"] == "test"]
    predictions = read_jsonl(folder / "predictions.jsonl")
    assert [p["label"] for p in predictions] == test  # every test tweet, in order
    metrics = json.loads((folder / "metrics.json").read_text())
    for name in ("zero_shot", "fine_tuned"):
        predicted = [p[name] for p in predictions]
        expected = f1_score(test, predicted, labels=list(LABELS), average="macro", zero_division=0)
        assert metrics[name]["constrained"]["macro_f1"] == pytest.approx(expected, abs=1e-12)
        # The confusion matrix counted by hand from the written predictions (an unknown label would be in no cell).
        counted = [[sum(t == truth and p == guess for t, p in zip(test, predicted)) for guess in LABELS]
                   for truth in LABELS]
        assert metrics[name]["constrained"]["confusion_matrix"] == counted and sum(map(sum, counted)) == len(test)
        # smoke: --generation-samples 8, so the first 8 test tweets are also answered freely
        assert [f"{name}_reply" in p for p in predictions] == [True] * 8 + [False] * (len(test) - 8)
        assert metrics[name]["free_generation"]["rows"] == 8
    # The sample's train split has more neutral tweets than either other class (test_smoke_run_writes_every_output
    # reads the counts from the file), so the baseline always says neutral: on the test split its neutral precision is
    # n/N and recall 1, so its F1 is 2n/(n + N), and the other two classes score 0.
    train = [LABELS[r["label"]] for r in rows if r["split"] == "train"]
    assert train.count("neutral") > max(train.count("negative"), train.count("positive"))
    counts = {word: test.count(word) for word in LABELS}
    n, total = counts["neutral"], len(test)
    assert metrics["majority_baseline"]["class"] == "neutral"
    assert metrics["majority_baseline"]["macro_f1"] == pytest.approx(2 * n / (n + total) / 3)
    assert metrics["majority_baseline"]["accuracy"] == pytest.approx(n / total)
    results = (folder / "results.md").read_text()
    assert f"| always 'neutral' (majority class) | {2 * n / (n + total) / 3:.4f} | {n / total:.4f} |" in results
    assert f"| fine-tuned | {metrics['fine_tuned']['constrained']['macro_f1']:.4f} |" in results
    assert (f"The card's author reports macro-F1 0.21 and could not reproduce better: about what always answering one "
            f"class scores (with three classes, at most 1/3 and here {2 * n / (n + total) / 3:.4f} for 'neutral')") in results
    assert f"| test | {counts['negative']} | {counts['neutral']} | {counts['positive']} |" in results
    assert "## Free greedy generation" in results


def test_loss_is_on_the_answer_only(recipe, tiny, tmp_path):
    from collections import Counter

    from trl import SFTConfig, SFTTrainer
    model, tokenizer = tiny
    rows = [{"text": "Loved the match tonight!", "label": 2}, {"text": "Bus is late again", "label": 0},
            {"text": "word " * 300, "label": 1}]
    dropped = Counter()
    dataset = recipe.sft_dataset(rows, tokenizer, 128, dropped)
    assert len(dataset) == 2 and dropped["too long"] == 1  # dropped, not truncated: truncation would cut the answer
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset,
                         args=SFTConfig(output_dir=str(tmp_path), max_length=128, completion_only_loss=True,
                                        report_to="none"))
    for row, example in zip(rows, trainer.train_dataset):
        prompt = recipe.chat_ids(tokenizer, recipe.prompt_messages(row["text"]), add_generation_prompt=True)
        assert example["input_ids"][:len(prompt)] == prompt
        assert example["labels"][:len(prompt)] == [-100] * len(prompt)
        assert example["labels"][len(prompt):] == example["input_ids"][len(prompt):]
        assert tokenizer.decode(example["labels"][len(prompt):]) == LABELS[row["label"]] + "</s>\n"


def test_constrained_choice_scores_each_answer_as_trained(recipe, tiny):
    model, tokenizer = tiny
    texts = ["Best day ever!!", "🙂🙂 ok then", "positive negative neutral?", "x" * 300, "Train delayed again", "."]
    scores = recipe.label_log_likelihoods(model, tokenizer, texts, batch_size=4)
    assert scores.shape == (len(texts), 3) and torch.isfinite(scores).all() and (scores < 0).all()
    # Batching and right padding change nothing: one tweet at a time gives the same scores.
    alone = torch.cat([recipe.label_log_likelihoods(model, tokenizer, [text], batch_size=1) for text in texts])
    assert torch.allclose(scores, alone, atol=1e-4)
    # The score is log P(answer tokens | prompt), here computed directly for one tweet and one label.
    prompt = recipe.chat_ids(tokenizer, recipe.prompt_messages(texts[0]), add_generation_prompt=True)
    full = recipe.chat_ids(tokenizer, recipe.prompt_messages(texts[0]) + [{"role": "assistant", "content": "positive"}])
    assert full[:len(prompt)] == prompt
    with torch.no_grad():
        log_probs = model(torch.tensor([full])).logits[0].float().log_softmax(-1)
    expected = sum(log_probs[i - 1, full[i]].item() for i in range(len(prompt), len(full)))
    assert scores[0, 2].item() == pytest.approx(expected, abs=1e-4)


def test_every_row_gets_the_label_it_scores_highest(recipe, tiny, monkeypatch):
    model, tokenizer = tiny
    texts = ["Great!", "meh", "awful", "🙂", "ok ok ok"]
    rows = [{"text": text, "label": i % 3} for i, text in enumerate(texts)]  # neg, neutral, pos, neg, neutral
    # Scores made up so that each tweet's best label is known: positive, neutral, positive, negative, negative.
    made_up = {"Great!": [-3.0, -2.0, -1.0], "meh": [-2.0, -0.5, -4.0], "awful": [-9.0, -8.0, -7.0],
               "🙂": [-0.1, -0.2, -0.3], "ok ok ok": [-1.0, -1.5, -1.2]}
    batches = []

    def label_log_likelihoods(model_, tokenizer_, batch_texts, batch_size):
        batches.append(list(batch_texts))
        return torch.tensor([made_up[text] for text in batch_texts])
    monkeypatch.setattr(recipe, "label_log_likelihoods", label_log_likelihoods)
    cfg = SimpleNamespace(score_batch_size=2, generation_samples=2, max_new_tokens=3)
    metrics, per_row = recipe.evaluate(model, tokenizer, rows, cfg, "zero_shot")
    assert batches == [texts]  # every row scored, in order
    assert [row["zero_shot"] for row in per_row] == ["positive", "neutral", "positive", "negative", "negative"]
    assert [set(row) for row in per_row] == [{"zero_shot", "zero_shot_reply"}] * 2 + [{"zero_shot"}] * 3
    # By hand: right on rows 2, 3 and 4 of 5; negative P 1/2 R 1/2, neutral P 1 R 1/2, positive P 1/2 R 1.
    assert metrics["constrained"]["accuracy"] == pytest.approx(3 / 5)
    assert metrics["constrained"]["confusion_matrix"] == [[1, 0, 1], [1, 1, 0], [0, 0, 1]]
    assert metrics["constrained"]["macro_f1"] == pytest.approx((1 / 2 + 2 / 3 + 2 / 3) / 3)
    assert metrics["free_generation"]["rows"] == 2


def test_free_replies_are_parsed_only_when_they_name_one_label(recipe):
    assert recipe.parse_label("positive") == 2
    assert recipe.parse_label("The sentiment of this tweet is Negative.") == 0
    assert recipe.parse_label("neutral, leaning neutral") == 1
    assert recipe.parse_label("positive or negative") is None
    assert recipe.parse_label("I am not sure") is None
    assert recipe.parse_label("positively") is None


def test_metrics_match_hand_counts_and_scikit_learn(recipe):
    labels, predicted = [0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 2, 2]
    metrics = recipe.classification_metrics(labels, predicted)
    # By hand: negative P 1/1 R 1/2, neutral P 2/3 R 2/3, positive P 1/2 R 1/1; every class's F1 is 2/3.
    assert metrics["macro_f1"] == pytest.approx(2 / 3) and metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["per_class"]["negative"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3),
                                                "support": 2}
    assert metrics["per_class"]["positive"]["precision"] == 0.5
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 2, 1], [0, 0, 1]]
    assert metrics["macro_f1"] == pytest.approx(f1_score(labels, predicted, average="macro"))
    unparsed = recipe.classification_metrics([0, 1, 2], [0, -1, 2])  # an unparseable reply counts as wrong
    assert unparsed["accuracy"] == pytest.approx(2 / 3) and unparsed["per_class"]["neutral"]["recall"] == 0
    baseline = recipe.majority_baseline([{"label": label} for label in (1, 1, 1, 0, 2)],
                                        [{"label": label} for label in labels])
    assert baseline["class"] == "neutral" and baseline["accuracy"] == 0.5
    assert baseline["macro_f1"] == pytest.approx(2 / 9)  # neutral P 1/2 R 1 -> F1 2/3; the others 0


def test_local_files_load_with_words_or_ids(recipe, tmp_path):
    csv = tmp_path / "tweets.csv"
    csv.write_text("text,label,split\n" + "".join(f"tweet {i},{LABELS[i % 3].upper()},{s}\n"
                                                  for i, s in enumerate(["train"] * 6 + ["validation", "test"])))
    splits = recipe.load_splits(str(csv), "sentiment", 0.1, 0)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [6, 1, 1]
    assert [row["label"] for row in splits["train"]] == [0, 1, 2, 0, 1, 2]
    jsonl = tmp_path / "tweets.jsonl"  # no split column: a seeded 80/10/10 holdout
    jsonl.write_text("".join(json.dumps({"text": f"tweet {i}", "label": i % 3}) + "\n" for i in range(50)))
    splits = recipe.load_splits(str(jsonl), "sentiment", 0.1, 0)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [40, 5, 5]
    assert sorted(r["text"] for rows in splits.values() for r in rows) == sorted(f"tweet {i}" for i in range(50))
    assert recipe.load_splits(str(jsonl), "sentiment", 0.1, 0) == splits


@pytest.mark.parametrize("rows, message", [
    ([{"tweet": "hi", "label": 0}], "needs columns text and label; found ['label', 'tweet']"),
    ([{"text": "hi", "label": "happy"}, {"text": "yo", "label": 5}, {"text": "ok", "label": 1}],
     "unknown label value(s) 'happy', 5; use 0/1/2 or negative/neutral/positive"),
    ([{"text": "hi", "label": 0, "split": "train"}, {"text": "yo", "label": 1, "split": "test"}],
     "the split column needs train, validation and test rows (only those); found {'train': 1, 'test': 1}"),
])
def test_bad_data_is_a_one_line_error(recipe, tmp_path, rows, message):
    from common.errors import UserError
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(UserError) as error:
        recipe.main(["--data", str(path), "--output-dir", str(tmp_path / "out")])  # checked before any model loads
    assert str(error.value) == f"{path}: {message}"


def test_balance_downsamples_every_class_to_the_rarest(recipe):
    rows = [{"text": str(i), "label": label} for i, label in enumerate([0] * 5 + [1] * 20 + [2] * 9)]
    kept = recipe.balanced(rows, seed=1)
    assert [sum(r["label"] == c for r in kept) for c in range(3)] == [5, 5, 5]
    assert all(r in rows for r in kept) and len({r["text"] for r in kept}) == 15
    assert recipe.balanced(rows, seed=1) == kept and recipe.balanced(rows, seed=2) != kept


def test_tiny_model_learns_a_learnable_task_and_same_seed_gives_same_f1(tmp_path):
    data = write_learnable_data(tmp_path / "learnable.jsonl")
    base = build_learnable_model(data, tmp_path / "model")
    folders = []
    for _ in range(2):
        result = run_recipe_process(RECIPE, "--model-name", base, "--data", str(data), *LEARN_FLAGS,
                                    "--load-in-4bit", "false", output_dir=tmp_path / "out")
        assert result.returncode == 0, result.stderr[-4000:]
        folders = run_folders(tmp_path / "out", RECIPE)
    first, second = (assert_learned(folder) for folder in folders)
    assert first == second  # every number, to the last digit
    assert read_jsonl(folders[0] / "predictions.jsonl") == read_jsonl(folders[1] / "predictions.jsonl")
    data_summary = json.loads((folders[0] / "manifest.json").read_text())["data"]
    # write_learnable_data's 180 train tweets cycle negative, neutral, neutral, positive: 45, 90, 45; --balance keeps 45
    assert data_summary["balance"] == "downsampled to 45 per class" and data_summary["train"] == 135
