"""TinyLlama-1.1B-Chat QLoRA for tweet sentiment (tweet_eval), scored by macro-F1 over a constrained label choice.

Card: TinyLlama-1.1B-Chat-v1.0 in 4-bit NF4 (double quantization, bf16 compute; fp16 on a T4), LoRA on q,k,v,o;
tweet_eval sentiment as a chat whose system prompt asks for one word, loss on that word; macro-F1 on the test split.
Launch: ./run.sh tinyllama_sentiment          offline check on CPU: ./run.sh tinyllama_sentiment --smoke
Several GPUs: ./run.sh tinyllama_sentiment --gpus 2 (effective batch 32 kept: 2 accumulation steps become 1 a GPU)
"""
import unsloth  # noqa: F401  (first: Unsloth patches transformers, TRL and PEFT on import)

import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from sklearn.dummy import DummyClassifier
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support
from trl import SFTConfig, SFTTrainer
from trl.data_utils import common_prefix_length
from unsloth import FastLanguageModel

from common import distributed
from common.chat import generate_reply, set_chat_template
from common.data import drop_too_long, read_rows, split_train_eval
from common.errors import UserError, run_main
from common.model import load_model, quantization_in_use
from common.report import number, throughput_line
from common.session import base_model, start, trainer_arguments

RECIPE = Path(__file__).stem  # the file's name: a copied recipe is its own recipe, with its own run folders
SAMPLE_DATA = Path(__file__).parent / "data" / "tweet_sentiment_sample.jsonl"
LABELS = ("negative", "neutral", "positive")  # tweet_eval's label ids 0, 1, 2, in that order
SPLITS = ("train", "validation", "test")
SYSTEM_PROMPT = "You classify the sentiment of tweets. Reply with exactly one word: negative, neutral or positive."


@dataclass
class Config:
    """TinyLlama-1.1B-Chat QLoRA on tweet_eval sentiment, scored by macro-F1."""
    model_name: str = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"  # card: the chat model; Unsloth loads it in 4-bit
    load_in_4bit: bool = True  # card: QLoRA; Unsloth loads NF4 + double quant, computing in bf16 (fp16 on a T4)
    max_seq_length: int = 256  # a tweet (280 characters) plus the prompt is ~150 tokens; longer rows are dropped
    lora_r: int = 16  # choice: three labels need little capacity; 16 is Unsloth's default, ample on attention only
    lora_alpha: int = 32  # choice: alpha = 2 x rank, the usual scaling, so the lr below behaves as in QLoRA's runs
    lora_dropout: float = 0.0  # choice: under one epoch, no tweet is seen twice; 0 also keeps Unsloth's fast LoRA path
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # card: the attention projections
    data: str = "cardiffnlp/tweet_eval"  # card: TweetEval; or a local .csv/.jsonl with text, label (and split)
    hub_config: str = "sentiment"  # card: the sentiment subset, labels 0 negative, 1 neutral, 2 positive
    holdout_fraction: float = 0.1  # a local file with no split column: this much for validation and for test, seeded
    chat_template: str = "zephyr"  # TinyLlama-Chat's own template (<|system|>, <|user|>, <|assistant|>)
    balance: bool = False  # true: downsample every training class to the rarest one's count, seeded
    per_device_train_batch_size: int = 16  # tweets are short: 16 rows fit a T4 with room to spare
    gradient_accumulation_steps: int = 2  # card: gradient accumulation; effective batch 32
    learning_rate: float = 2e-4  # QLoRA's usual rate for a small adapter
    warmup_steps: int = 20  # a short linear warmup before the cosine decay
    lr_scheduler_type: str = "cosine"  # card: cosine schedule
    max_steps: int = 500  # choice: 16,000 tweets (a third of train); a one-word answer's loss flattens long before
    optim: str = "adamw_8bit"  # 8-bit AdamW states (bitsandbytes) save memory on small GPUs
    eval_steps: int = 100  # validation loss (and a checkpoint, for --resume) every 100 steps
    max_eval_samples: int = 500  # validation tweets for that loss: a stable number at little cost
    max_test_samples: int = 0  # 0: the whole standard test split (the card's metric); N: a seeded subset of N
    score_batch_size: int = 16  # test tweets scored per forward pass (each as three label sequences)
    generation_samples: int = 300  # first test tweets also answered by free greedy generation, for the parse rate
    max_new_tokens: int = 16  # room for a sentence, so a chatty reply is parsed whole rather than cut off
    seed: int = 3407  # Unsloth's customary seed: splits, balancing, shuffling, LoRA init


SMOKE = dict(data=str(SAMPLE_DATA), per_device_train_batch_size=8, gradient_accumulation_steps=1, warmup_steps=2,
             max_steps=12, learning_rate=2e-3, eval_steps=6, max_eval_samples=16, generation_samples=8,
             max_new_tokens=4)


def main(argv=None):
    # the system prompt goes into run.json now: a checkpoint of a stopped run chats and exports as trained
    session = start(RECIPE, Config, argv, SMOKE, chat_format=False, system_prompt=SYSTEM_PROMPT)
    cfg = session.cfg
    with session.folder:
        # 1. Data first (the smoke tokenizer is trained on it): labelled splits and their class balance.
        splits, train_rows, test_rows, data = labelled_data(cfg)
        print("labels: " + "; ".join(f"{split} {dict(c)}" for split, c in data["label_counts"].items()))

        # 2. The 4-bit base model in TinyLlama-Chat's template, LoRA on the attention projections. --smoke: the
        #    tokenizer learns the label words as the real one knows them, whole tokens.
        model_name = base_model(session, "zephyr", lambda: [{"text": SYSTEM_PROMPT}] + [
            {"text": row["text"], "answer": LABELS[row["label"]]} for rows in splits.values() for row in rows])
        model, tokenizer = load_model(model_name, cfg.max_seq_length, session.hardware.precision, cfg.load_in_4bit,
                                      target_modules=cfg.target_modules)
        tokenizer = set_chat_template(tokenizer, cfg.chat_template)
        model = FastLanguageModel.get_peft_model(
            model, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
            target_modules=list(cfg.target_modules), use_gradient_checkpointing="unsloth", random_state=cfg.seed)

        # 3. Zero-shot: LoRA's B matrices start at zero, so this is the base model's score.
        FastLanguageModel.for_inference(model)
        zero_shot, zero_shot_rows = evaluate(model, tokenizer, test_rows, cfg, "zero_shot")
        print(f"zero-shot: macro-F1 {zero_shot['constrained']['macro_f1']:.4f}")
        FastLanguageModel.for_training(model)

        # 4. Train on prompt/completion conversations: TRL puts the loss on the completion (the label word) only.
        dropped = Counter()
        train_set = sft_dataset(train_rows, tokenizer, cfg.max_seq_length, dropped)
        data.update(train=len(train_set), dropped={reason: n for reason, n in dropped.items() if n})
        trainer = SFTTrainer(
            model=model, processing_class=tokenizer, train_dataset=train_set,
            eval_dataset=sft_dataset(splits["validation"][:cfg.max_eval_samples], tokenizer, cfg.max_seq_length),
            args=trainer_arguments(session, SFTConfig, completion_only_loss=True, eval_strategy="steps",
                                   per_device_eval_batch_size=cfg.per_device_train_batch_size,
                                   save_steps=cfg.eval_steps,
                                   save_total_limit=1))  # the latest checkpoint is all --resume needs
        if not session.train(trainer):
            return
        distributed.only_main_continues()

        # 5. Fine-tuned: the same test tweets, the same scoring; the majority class is the score to beat.
        FastLanguageModel.for_inference(model)
        fine_tuned, fine_tuned_rows = evaluate(model, tokenizer, test_rows, cfg, "fine_tuned")
        metrics = {"majority_baseline": majority_baseline(splits["train"], test_rows),
                   "zero_shot": zero_shot, "fine_tuned": fine_tuned}

        # 6. Every test prediction (so the score can be audited), metrics.json, then the adapter, the run's record and
        #    results.md (last: it marks the run complete).
        predictions = [{"text": row["text"], "label": LABELS[row["label"]], **before, **after}
                       for row, before, after in zip(test_rows, zero_shot_rows, fine_tuned_rows)]
        (session.folder.path / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))
        session.folder.write_json("metrics.json", metrics)
        print(f"done: macro-F1 zero-shot {zero_shot['constrained']['macro_f1']:.4f}, fine-tuned "
              f"{fine_tuned['constrained']['macro_f1']:.4f}, majority class "
              f"{metrics['majority_baseline']['macro_f1']:.4f}; results in {session.folder.path}")
        results = results_markdown(cfg, data, metrics, session.recorder.summary())
        session.finish(model, tokenizer, trainer, data, results,
                       system_prompt=SYSTEM_PROMPT, quantization=quantization_in_use(model),
                       zero_shot_macro_f1=zero_shot["constrained"]["macro_f1"],
                       fine_tuned_macro_f1=fine_tuned["constrained"]["macro_f1"])


def labelled_data(cfg):
    """(splits, train rows after --balance, test rows within --max-test-samples, the data's summary)."""
    splits = load_splits(cfg.data, cfg.hub_config, cfg.holdout_fraction, cfg.seed)
    train_rows = balanced(splits["train"], cfg.seed) if cfg.balance else splits["train"]
    test_rows = splits["test"]
    if 0 < cfg.max_test_samples < len(test_rows):
        test_rows = random.Random(cfg.seed).sample(test_rows, cfg.max_test_samples)
    data = {"source": cfg.data, "hub_config": None if Path(cfg.data).exists() else cfg.hub_config,
            "label_counts": {split: label_counts(rows) for split, rows in splits.items()},
            "balance": f"downsampled to {len(train_rows) // len(LABELS):,} per class" if cfg.balance else "none",
            "test": len(test_rows)}
    return splits, train_rows, test_rows, data


def load_splits(source: str, hub_config: str, holdout_fraction: float, seed: int) -> dict[str, list[dict]]:
    """train/validation/test rows {text, label id}: the hub dataset's splits, a local file's `split` column, or a
    seeded holdout of a local file that has none."""
    if not Path(source).exists():
        return {split: labelled_rows(read_rows(source, split, hub_config), f"{source} ({split})") for split in SPLITS}
    raw = read_rows(source)
    rows = labelled_rows(raw, source)
    if all(row["split"] is None for row in rows):
        if not 0 < holdout_fraction < 0.5:
            raise UserError(f"--holdout-fraction {holdout_fraction}: use a value between 0 and 0.5")
        rest, test = split_train_eval(rows, holdout_fraction, seed)
        train, validation = split_train_eval(rest, holdout_fraction / (1 - holdout_fraction), seed)
        return {"train": train, "validation": validation, "test": test}
    splits = {split: [row for row in rows if row["split"] == split] for split in SPLITS}
    found = Counter(row["split"] for row in rows)
    if not all(splits.values()) or set(found) - set(SPLITS):
        raise UserError(f"{source}: the split column needs train, validation and test rows (only those); found "
                        f"{dict(found)}")
    return splits


def labelled_rows(rows: list[dict], source: str) -> list[dict]:
    """Check the text and label columns and map labels (0/1/2 or the words) to ids; rows with empty text are skipped."""
    columns = set().union(*(row.keys() for row in rows[:100])) if rows else set()
    if not {"text", "label"} <= columns:
        raise UserError(f"{source}: needs columns text and label; found {sorted(columns) or 'no rows'}")
    unknown = sorted({repr(row.get("label")) for row in rows if label_id(row.get("label")) is None})
    if unknown:
        raise UserError(f"{source}: unknown label value(s) {', '.join(unknown[:10])}; use 0/1/2 or {'/'.join(LABELS)}")
    return [{"text": str(row["text"]).strip(), "label": label_id(row["label"]), "split": row.get("split")}
            for row in rows if str(row.get("text") or "").strip()]


def label_id(value) -> int | None:
    text = str(value).strip().lower()
    return LABELS.index(text) if text in LABELS else int(text) if text in ("0", "1", "2") else None


def label_counts(rows: list[dict]) -> Counter:
    return Counter({word: sum(row["label"] == i for row in rows) for i, word in enumerate(LABELS)})


def balanced(rows: list[dict], seed: int) -> list[dict]:
    """Seeded downsampling: every class cut to the rarest class's count, so no class dominates the loss."""
    by_class = [[row for row in rows if row["label"] == i] for i in range(len(LABELS))]
    smallest = min(len(group) for group in by_class)
    if smallest == 0:
        raise UserError(f"--balance: the training split has no rows of some class ({dict(label_counts(rows))})")
    rng = random.Random(seed)
    kept = [row for group in by_class for row in rng.sample(group, smallest)]
    rng.shuffle(kept)
    return kept


def prompt_messages(text: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}]


def sft_dataset(rows: list[dict], tokenizer, max_seq_length: int, dropped: Counter | None = None) -> Dataset:
    """TRL's conversational prompt/completion rows; rows too long for max_seq_length are dropped (truncating would
    cut off the answer) and counted in `dropped`."""
    conversations = [prompt_messages(row["text"]) + [{"role": "assistant", "content": LABELS[row["label"]]}]
                     for row in rows]
    conversations = drop_too_long(conversations, tokenizer, max_seq_length, Counter() if dropped is None else dropped)
    return Dataset.from_list([{"prompt": messages[:2], "completion": messages[2:]} for messages in conversations])


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                         return_dict=True)["input_ids"]


@torch.no_grad()
def label_log_likelihoods(model, tokenizer, texts: list[str], batch_size: int) -> torch.Tensor:
    """[tweets, 3] log P(answer | prompt) for each label's answer, tokenized exactly as in training (the word and the
    end of turn, after TRL's common prefix); right padding leaves the scored positions untouched."""
    sequences = []
    for text in texts:
        prompt_ids = chat_ids(tokenizer, prompt_messages(text), add_generation_prompt=True)
        for word in LABELS:
            ids = chat_ids(tokenizer, prompt_messages(text) + [{"role": "assistant", "content": word}])
            sequences.append((ids, common_prefix_length(prompt_ids, ids)))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores = []
    for first in range(0, len(sequences), batch_size * len(LABELS)):
        batch = sequences[first:first + batch_size * len(LABELS)]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in batch], device=model.device)
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch], device=model.device)
        logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits.float()
        token_log_probs = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        scores += [token_log_probs[row, answer_start - 1:len(ids) - 1].sum().item()
                   for row, (ids, answer_start) in enumerate(batch)]
    return torch.tensor(scores).view(len(texts), len(LABELS))


def parse_label(reply: str) -> int | None:
    """The label a free reply names: exactly one of the three words must appear in it, else it is unparseable."""
    named = {LABELS.index(word) for word in re.findall(r"[a-z]+", reply.lower()) if word in LABELS}
    return named.pop() if len(named) == 1 else None


def evaluate(model, tokenizer, rows: list[dict], cfg, name: str) -> tuple[dict, list[dict]]:
    """Constrained choice (the most likely label answer) on every row, free greedy generation on the first rows;
    returns the metrics and, per row, the `name` prediction (and reply)."""
    print(f"{name}: scoring {len(rows):,} test tweets, then {min(len(rows), cfg.generation_samples)} free replies")
    labels = [row["label"] for row in rows]
    chosen = label_log_likelihoods(model, tokenizer, [r["text"] for r in rows], cfg.score_batch_size).argmax(1).tolist()
    replies = [generate_reply(model, tokenizer, prompt_messages(row["text"]), cfg.max_new_tokens)
               for row in rows[:cfg.generation_samples]]
    parsed = [parse_label(reply) for reply in replies]
    free = {"rows": len(replies), "parse_rate": sum(p is not None for p in parsed) / max(len(replies), 1),
            "exact_word_rate": sum(r.strip(" .!").lower() in LABELS for r in replies) / max(len(replies), 1)}
    if replies:  # an unparseable reply counts as wrong (-1 is no class), as a naive evaluation would count it
        free.update(classification_metrics(labels[:len(replies)], [-1 if p is None else p for p in parsed]))
    per_row = [{name: LABELS[c]} for c in chosen]
    for row, reply in zip(per_row, replies):
        row[f"{name}_reply"] = reply
    return {"constrained": classification_metrics(labels, chosen), "free_generation": free}, per_row


def classification_metrics(labels: list[int], predicted: list[int]) -> dict:
    """scikit-learn's macro-F1, accuracy, per-class precision/recall/F1 and confusion matrix over the three classes."""
    ids = list(range(len(LABELS)))
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=ids, zero_division=0)
    return {"macro_f1": float(f1_score(labels, predicted, labels=ids, average="macro", zero_division=0)),
            "accuracy": float(accuracy_score(labels, predicted)),
            "per_class": {word: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                                 "support": int(support[i])} for i, word in enumerate(LABELS)},
            "confusion_matrix": confusion_matrix(labels, predicted, labels=ids).tolist()}


def majority_baseline(train_rows: list[dict], test_rows: list[dict]) -> dict:
    """Always the training split's most frequent class (before --balance): what a classifier must beat."""
    dummy = DummyClassifier(strategy="most_frequent").fit([[0]] * len(train_rows), [r["label"] for r in train_rows])
    predicted = dummy.predict([[0]] * len(test_rows)).tolist()
    return {"class": LABELS[predicted[0]], **classification_metrics([r["label"] for r in test_rows], predicted)}


def results_markdown(cfg, data, metrics, throughput) -> str:
    baseline = metrics["majority_baseline"]
    runs = {"zero-shot": metrics["zero_shot"], "fine-tuned": metrics["fine_tuned"]}
    constrained = {name: m["constrained"] for name, m in runs.items()}
    scored = {f"always '{baseline['class']}' (majority class)": baseline, **constrained}
    per_class = [[word, *(" / ".join(f"{m['per_class'][word][k]:.3f}" for k in ("precision", "recall", "f1"))
                          for m in constrained.values()), baseline["per_class"][word]["support"]] for word in LABELS]
    confusion = [[word, *(m["confusion_matrix"][i][j] for m in constrained.values() for j in range(len(LABELS)))]
                 for i, word in enumerate(LABELS)]
    free = [[name, f["rows"], f"{f['parse_rate']:.1%}", f"{f['exact_word_rate']:.1%}", number(f.get("macro_f1"), "", 4)]
            for name, f in ((name, m["free_generation"]) for name, m in runs.items())]
    source = f"{data['source']} ({data['hub_config']})" if data["hub_config"] else data["source"]
    return "\n".join([
        f"# {RECIPE}: TinyLlama-1.1B-Chat QLoRA, tweet sentiment by macro-F1", "",
        f"- data: {source}; trained on {data['train']:,} tweets (balance: {data['balance']}; dropped: "
        f"{data['dropped'] or 'none'}) for {cfg.max_steps} steps; {data['test']:,} test tweets",
        throughput_line(throughput),
        "- every test tweet with its label and predictions: predictions.jsonl; every number: metrics.json", "",
        *table(["split", *LABELS], [[split, *(n[w] for w in LABELS)] for split, n in data["label_counts"].items()]),
        "", "## Test split, constrained choice (the most likely of the three answers)", "",
        *table(["predictor", "macro-F1", "accuracy"],
               [[name, f"{m['macro_f1']:.4f}", f"{m['accuracy']:.4f}"] for name, m in scored.items()]),
        "", f"The card's author reports macro-F1 0.21 and could not reproduce better: about what always answering one "
        f"class scores (with three classes, at most 1/3 and here {baseline['macro_f1']:.4f} for '{baseline['class']}'), "
        "so that figure shows no learning; a fine-tuned macro-F1 counts only above the majority row.",
        "", *table(["class", *(f"{name} P / R / F1" for name in runs), "support"], per_class),
        "", "Confusion matrices (rows: the true class; columns: the predicted one)", "",
        *table(["true", *(f"{name}: {word}" for name in runs for word in LABELS)], confusion),
        "", "## Free greedy generation (first test tweets; an unparseable reply counts as wrong)", "",
        *table(["model", "tweets", "parseable", "exactly one word", "macro-F1"], free),
    ])


def table(header: list[str], rows: list[list]) -> list[str]:
    cells = [[f"{cell:,}" if isinstance(cell, int) else str(cell) for cell in row] for row in rows]
    return ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1),
            *("| " + " | ".join(row) + " |" for row in cells)]


if __name__ == "__main__":
    run_main(main)
