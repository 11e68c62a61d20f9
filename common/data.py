"""Load a dataset (hub id or local file), standardise it to chat `messages`, filter by length, split.

Real exports are messy. Whatever can be mapped is mapped (role aliases, repeated roles merged, empty turns and a
leading assistant turn or trailing user turn trimmed); whatever cannot is dropped and counted by reason.
"""
import csv
import hashlib
import json
import random
from collections import Counter
from pathlib import Path

from common.errors import UserError

LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
ROLE_ALIASES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "bot": "assistant", "model": "assistant", "chatgpt": "assistant"}
FORMATS = {  # name: columns that identify it
    "sharegpt": ("conversations",),
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
    "qa": ("question", "answer"),
}


def read_rows(source: str, split: str = "train", hub_config: str | None = None) -> list[dict]:
    """Rows of a local .json/.jsonl/.csv/.parquet file, or of a hub dataset's split."""
    path = Path(source)
    if path.exists():
        if path.suffix not in LOCAL_SUFFIXES:
            raise UserError(f"{source}: unsupported file type {path.suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}")
        return _read_local(path)
    if path.suffix in LOCAL_SUFFIXES or source.startswith((".", "/", "~")):
        raise UserError(f"{source}: data file not found; check the path given to --data")
    return _read_hub(source, split, hub_config)


def _read_local(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    rows.append(_parse_json(line, path, f"line {number}"))
    elif path.suffix == ".json":
        rows = _parse_json(path.read_text(encoding="utf-8"), path, None)
        if isinstance(rows, dict):  # {"data": [...]}-style wrappers: take the one list inside
            lists = [value for value in rows.values() if isinstance(value, list)]
            rows = lists[0] if len(lists) == 1 else rows
        if not isinstance(rows, list):
            raise UserError(f"{path}: expected a JSON array of records (or one object holding one)")
    elif path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
    else:
        import pyarrow.parquet
        try:
            rows = pyarrow.parquet.read_table(path).to_pylist()
        except Exception as error:
            raise UserError(f"{path}: not a readable parquet file ({error})") from None
    if rows and not all(isinstance(row, dict) for row in rows):
        raise UserError(f"{path}: every record must be an object with named fields")
    return rows


def _parse_json(text: str, path: Path, where: str | None):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        if where is None:
            where = f"line {error.lineno} column {error.colno} (byte {error.pos})"
            truncated = text.rstrip()[-1:] not in ("]", "}")
            hint = "the file looks truncated (it does not end with ] or }); re-export it" if truncated else "fix the JSON there"
        else:
            hint = "fix or remove that line"
        raise UserError(f"{path}: {where}: invalid JSON ({error.msg}); {hint}") from None


def _read_hub(source: str, split: str, hub_config: str | None) -> list[dict]:
    import datasets
    try:
        return datasets.load_dataset(source, hub_config, split=split).to_list()
    except Exception as error:
        reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise UserError(f"could not load dataset {source!r} from the hub ({reason}); "
                        f"without network, pass a local .jsonl/.json/.csv/.parquet file with --data") from None


def file_sha256(source: str) -> str | None:
    """SHA-256 of a local data file, for the manifest; None for a hub dataset."""
    path = Path(source)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def detect_format(rows: list[dict], source: str) -> str:
    columns = set().union(*(row.keys() for row in rows[:100])) if rows else set()
    for name, needed in FORMATS.items():
        if all(column in columns for column in needed):
            return name
    expected = "; ".join(f"{name}: {', '.join(cols)}" for name, cols in FORMATS.items())
    raise UserError(f"{source}: no supported format; found columns {sorted(columns)}, expected one of ({expected})")


def _turns(row: dict, fmt: str) -> list | None:
    if fmt == "sharegpt":
        return row.get("conversations")
    if fmt == "messages":
        return row.get("messages")
    prompt_key, answer_key = ("question", "answer") if fmt == "qa" else ("instruction", "output")
    prompt = str(row.get(prompt_key) or "")
    if fmt == "alpaca" and str(row.get("input") or "").strip():
        prompt = f"{prompt}\n\n{row['input']}"
    turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(row.get(answer_key) or "")}]
    if str(row.get("system") or "").strip():
        turns.insert(0, {"role": "system", "content": row["system"]})
    return turns


def clean_conversation(turns) -> tuple[list[dict] | None, str | None]:
    """(messages, None) for a usable conversation, or (None, reason) with reason in DROP_REASONS."""
    if turns is None or (isinstance(turns, list) and not turns):
        return None, "empty"
    if not isinstance(turns, list) or not all(isinstance(turn, dict) for turn in turns):
        return None, "malformed"
    messages = []
    for turn in turns:
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        role = ROLE_ALIASES.get(str(role).strip().lower()) if role is not None else None
        if role is None or (role == "system" and messages):
            return None, "bad roles"
        if not isinstance(content, str) or not content.strip():
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + content.strip()
        else:
            messages.append({"role": role, "content": content.strip()})
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    dialogue = messages[len(system):]
    while dialogue and dialogue[0]["role"] == "assistant":
        dialogue.pop(0)
    while dialogue and dialogue[-1]["role"] == "user":
        dialogue.pop()
    if not dialogue:
        return None, "no reply" if messages else "empty"
    return system + dialogue, None


def to_conversations(rows: list[dict], source: str, system_prompt: str | None = None):
    """Standardise rows to chat messages; returns (conversations, Counter of drop reasons)."""
    fmt = detect_format(rows, source)
    conversations, dropped = [], Counter()
    for row in rows:
        messages, reason = clean_conversation(_turns(row, fmt))
        if reason:
            dropped[reason] += 1
            continue
        if system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        conversations.append(messages)
    return conversations, dropped


def token_count(tokenizer, messages: list[dict]) -> int:
    return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def drop_too_long(conversations: list, tokenizer, max_seq_length: int, dropped: Counter) -> list:
    """Keep conversations whose chat-templated length fits max_seq_length; count the rest as 'too long'."""
    kept = [messages for messages in conversations if token_count(tokenizer, messages) <= max_seq_length]
    dropped["too long"] += len(conversations) - len(kept)
    return kept


def split_into_windows(messages: list[dict], tokenizer, max_seq_length: int) -> tuple[list[list[dict]], int]:
    """A conversation too long for max_seq_length, as windows of whole exchanges (a user turn and its reply), each a
    conversation of its own within max_seq_length after the chat template: the system prompt first when there is one,
    then a user turn, an assistant turn last. Returns (windows, exchanges dropped because alone they do not fit)."""
    system = messages[:1] if messages[0]["role"] == "system" else []
    dialogue = messages[len(system):]  # cleaned: user and assistant alternate, user first, assistant last
    windows, window, too_long = [], [], 0
    for exchange in (dialogue[i:i + 2] for i in range(0, len(dialogue), 2)):
        if window and token_count(tokenizer, system + window + exchange) <= max_seq_length:
            window = window + exchange
            continue
        if window:
            windows.append(system + window)
        window = exchange if token_count(tokenizer, system + exchange) <= max_seq_length else []
        too_long += not window
    return windows + ([system + window] if window else []), too_long


def split_too_long(conversations: list, tokenizer, max_seq_length: int, dropped: Counter, split: Counter) -> list:
    """Conversations within max_seq_length as they are, longer ones as windows (split_into_windows); one with no
    exchange that fits counts as 'too long' in dropped. split counts 'conversations' cut, their 'windows', and the
    'exchanges too long' dropped inside them."""
    fitted = []
    for messages in conversations:
        if token_count(tokenizer, messages) <= max_seq_length:
            fitted.append(messages)
            continue
        windows, too_long = split_into_windows(messages, tokenizer, max_seq_length)
        split["exchanges too long"] += too_long
        if not windows:
            dropped["too long"] += 1
            continue
        split["conversations"] += 1
        split["windows"] += len(windows)
        fitted += windows
    return fitted


def split_train_eval(items: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Seeded shuffle, then the last eval_fraction (at least one item) is held out for evaluation."""
    items = list(items)
    random.Random(seed).shuffle(items)
    n_eval = max(1, round(len(items) * eval_fraction)) if eval_fraction > 0 else 0
    return items[:len(items) - n_eval], items[len(items) - n_eval:]


def report(total: int, kept: int, dropped: Counter) -> str:
    reasons = ", ".join(f"{reason} {count:,}" for reason, count in dropped.items() if count) or "none"
    return f"kept {kept:,} / {total:,}; dropped: {reasons}"


def prepare_chat_data(source: str, tokenizer, max_seq_length: int, max_samples: int, eval_fraction: float,
                      seed: int, system_prompt: str | None = None, long_conversations: str = "drop"):
    """The whole data step of a chat recipe: returns (train, eval, summary) with summary for the manifest. With
    long_conversations="split", train and eval are split by conversation first, so no conversation has windows in both.
    """
    if long_conversations not in ("drop", "split"):
        raise UserError(f"--long-conversations {long_conversations}: use drop or split")
    rows = read_rows(source)
    if max_samples and len(rows) > max_samples:
        rows = random.Random(seed).sample(rows, max_samples)
    conversations, dropped = to_conversations(rows, source, system_prompt)
    split = Counter()
    if long_conversations == "drop":
        conversations = drop_too_long(conversations, tokenizer, max_seq_length, dropped)
        kept = len(conversations)
        if kept < 2:
            raise UserError(f"{source}: too few conversations left after filtering "
                            f"({report(len(rows), kept, dropped)}); raise --max-seq-length or check the data's format")
        train, held_out = split_train_eval(conversations, eval_fraction, seed)
    else:
        train, held_out = split_train_eval(conversations, eval_fraction, seed)
        train, held_out = (split_too_long(part, tokenizer, max_seq_length, dropped, split) for part in (train, held_out))
        kept = len(conversations) - dropped["too long"]
        if not train or (eval_fraction > 0 and not held_out):
            raise UserError(f"{source}: too few conversations left after splitting "
                            f"({report(len(rows), kept, dropped)}); raise --max-seq-length or check the data's format")
    line = report(len(rows), kept, dropped)
    if long_conversations == "split":
        line += (f"; {kept:,} conversations as {len(train) + len(held_out):,} windows ({split['conversations']:,} "
                 f"split, {split['exchanges too long']:,} single exchanges longer than {max_seq_length} dropped)")
    summary = {"source": source, "rows": len(rows), "kept": kept, "dropped": dict(dropped),
               "long_conversations": long_conversations, "split": dict(split),
               "train": len(train), "eval": len(held_out), "report": line}
    return train, held_out, summary
