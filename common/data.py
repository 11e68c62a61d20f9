"""Load a dataset (hub id or local file), standardise it to chat `messages`, filter by length, split.

Real exports are messy. Whatever can be mapped is mapped (role aliases, repeated roles merged, empty turns and a
leading assistant turn or trailing user turn trimmed); whatever cannot is dropped and counted by reason.
"""
import csv
import hashlib
import json
import os
import random
from collections import Counter
from collections.abc import Sequence
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
    """Rows of a local .json/.jsonl/.csv/.parquet file, or of a hub dataset's split. Unreadable .jsonl lines are
    left out; read_rows_and_bad_lines also says which."""
    return read_rows_and_bad_lines(source, split, hub_config)[0]


def read_rows_and_bad_lines(source: str, split: str = "train",
                            hub_config: str | None = None) -> tuple[list[dict], list[int]]:
    """(rows, numbers of the .jsonl lines left out because they are not a JSON object); a .jsonl file with more such
    lines than good ones, or any other file that does not parse, is refused. Other sources have no bad lines."""
    path = _local_path(source)
    if path is None:
        return _read_hub(source, split, hub_config), []
    return _read_by_check.pop(_file_key(path), None) or _read_local(path)


def check_data_source(source: str, split: str = "train", hub_config: str | None = None,
                      expect: dict[str, tuple[str, ...]] | None = FORMATS) -> None:
    """Fail in one line, before any model loads, on data the run would fail on later.

    A local file must exist, have a supported suffix, parse (see read_rows_and_bad_lines), hold at least one record
    and, unless expect is None, be in one of the formats of expect (name: the columns that identify it, as FORMATS);
    a recipe that checks its own columns passes expect=None. The rows read are handed to the run's next read of the
    same unchanged file, so it is parsed once. A hub id must name an existing dataset when the hub answers; offline
    (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE set, or no connection) nothing is checked, since the dataset can be in the
    local cache. split and hub_config are read_rows' own, so a recipe passes both the same arguments; a wrong split or
    config is reported by datasets when it loads.
    """
    path = _local_path(source)
    if path is None:
        _check_hub_dataset(source)
        return
    rows, bad_lines = _read_local(path)
    if not rows:
        raise UserError(f"{source}: the file holds no records; check the export or the path given to --data")
    if expect is not None:
        detect_format(rows, source, expect)
    _read_by_check[_file_key(path)] = rows, bad_lines


# check_data_source's read of a local file, kept only until the next read of that file: a large export is parsed
# once a run, and not held in memory through training
_read_by_check: dict[tuple, tuple[list[dict], list[int]]] = {}


def _file_key(path: Path) -> tuple:
    stat = path.stat()
    return path.resolve(), stat.st_size, stat.st_mtime_ns


def _local_path(source: str) -> Path | None:
    """The local file source names, or None for a hub dataset id; a missing or unsupported file is a UserError."""
    path = Path(source)
    if path.exists():
        if path.suffix not in LOCAL_SUFFIXES:
            raise UserError(f"{source}: unsupported file type {path.suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}")
        return path
    if path.suffix in LOCAL_SUFFIXES or source.startswith((".", "/", "~")):
        raise UserError(f"{source}: data file not found; check the path given to --data")
    return None


def _check_hub_dataset(source: str) -> None:
    if any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")
           for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
    try:
        HfApi().dataset_info(source, timeout=10)
    except GatedRepoError:  # a subclass of RepositoryNotFoundError, yet the dataset exists
        return
    except (RepositoryNotFoundError, HFValidationError):
        raise UserError(f"dataset {source} not found on the hub (a private one needs `hf auth login`); check --data "
                        f"or pass a local .jsonl/.json/.csv/.parquet file") from None
    except Exception:  # no connection, a timeout, a hub outage: the dataset may be cached, and loading it will tell
        return


SHOWN_LINES = 5  # bad line numbers named in a report or an error; the rest are counted


def _first_lines(numbers: Sequence[int]) -> str:
    shown = ", ".join(str(number) for number in numbers[:SHOWN_LINES])
    return f"line{'s' if len(numbers) > 1 else ''} {shown}{', ...' if len(numbers) > SHOWN_LINES else ''}"


def _read_local(path: Path) -> tuple[list[dict], list[int]]:
    bad_lines = []
    if path.suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if isinstance(row, dict):
                    rows.append(row)
                else:
                    bad_lines.append(number)
        given = len(rows) + len(bad_lines)
        # a few broken lines are a messy export, worth a count; mostly broken is the wrong file or not JSON Lines at
        # all (a pretty-printed JSON array saved as .jsonl), where training on the leftovers would hide the mistake
        if len(bad_lines) * 2 > given:
            raise UserError(f"{path}: {len(bad_lines):,} of {given:,} lines are not a JSON object "
                            f"({_first_lines(bad_lines)}); a .jsonl file holds one JSON object per line: re-export it "
                            f"as JSON Lines, or if it is one JSON array, rename it to .json")
    elif path.suffix == ".json":
        rows = _parse_json(path.read_text(encoding="utf-8"), path)
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
    return rows, bad_lines


def _parse_json(text: str, path: Path):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        truncated = text.rstrip()[-1:] not in ("]", "}")
        hint = ("the file looks truncated (it does not end with ] or }); re-export it" if truncated
                else "fix the JSON there")
        raise UserError(f"{path}: line {error.lineno} column {error.colno} (byte {error.pos}): invalid JSON "
                        f"({error.msg}); {hint}") from None


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


def detect_format(rows: list[dict], source: str, formats: dict[str, tuple[str, ...]] = FORMATS) -> str:
    columns = set().union(*(row.keys() for row in rows[:100])) if rows else set()
    for name, needed in formats.items():
        if all(column in columns for column in needed):
            return name
    expected = "; ".join(f"{name}: {', '.join(cols)}" for name, cols in formats.items())
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


TOO_LONG_WARNING = "sequence-length-is-longer-than-the-specified-maximum"


def token_count(tokenizer, messages: list[dict]) -> int:
    # transformers warns "Token indices sequence length is longer than the specified maximum ... will result in
    # indexing errors" the first time a tokenizer encodes more than model_max_length tokens, and marks it given in
    # tokenizer.deprecation_warnings (transformers 4.x to 5.x). Measuring is how too long conversations are found and
    # left out, so the mark is set for the measurement alone: training on a sequence that long still warns.
    given = tokenizer.deprecation_warnings.get(TOO_LONG_WARNING, False)
    tokenizer.deprecation_warnings[TOO_LONG_WARNING] = True
    try:
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    finally:
        tokenizer.deprecation_warnings[TOO_LONG_WARNING] = given


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


def report(total: int, kept: int, dropped: Counter, bad_lines: Sequence[int] = ()) -> str:
    """`kept 38 / 44; dropped: unreadable 2 (lines 14, 20), empty 2, ...`, bad_lines naming the unreadable ones."""
    where = {"unreadable": f" ({_first_lines(bad_lines)})"} if bad_lines else {}
    reasons = ", ".join(f"{reason} {count:,}{where.get(reason, '')}" for reason, count in dropped.items() if count)
    reasons = reasons or "none"
    return f"kept {kept:,} / {total:,}; dropped: {reasons}"


def prepare_chat_data(source: str, tokenizer, max_seq_length: int, max_samples: int, eval_fraction: float,
                      seed: int, system_prompt: str | None = None, long_conversations: str = "drop"):
    """The whole data step of a chat recipe: returns (train, eval, summary) with summary for the manifest. With
    long_conversations="split", train and eval are split by conversation first, so no conversation has windows in both.
    """
    if long_conversations not in ("drop", "split"):
        raise UserError(f"--long-conversations {long_conversations}: use drop or split")
    rows, bad_lines = read_rows_and_bad_lines(source)
    if max_samples and len(rows) > max_samples:
        rows = random.Random(seed).sample(rows, max_samples)
    dropped = Counter({"unreadable": len(bad_lines)} if bad_lines else {})
    conversations, reasons = to_conversations(rows, source, system_prompt)
    dropped.update(reasons)
    total = len(rows) + len(bad_lines)  # an unreadable line was a row the user gave
    split = Counter()
    if long_conversations == "drop":
        conversations = drop_too_long(conversations, tokenizer, max_seq_length, dropped)
        kept = len(conversations)
        line = report(total, kept, dropped, bad_lines)
        if kept < 2:
            raise UserError(f"{source}: too few conversations left after filtering ({line}); "
                            f"raise --max-seq-length or check the data's format")
        train, held_out = split_train_eval(conversations, eval_fraction, seed)
    else:
        train, held_out = split_train_eval(conversations, eval_fraction, seed)
        train, held_out = (split_too_long(part, tokenizer, max_seq_length, dropped, split) for part in (train, held_out))
        kept = len(conversations) - dropped["too long"]
        line = report(total, kept, dropped, bad_lines)
        if not train or (eval_fraction > 0 and not held_out):
            raise UserError(f"{source}: too few conversations left after splitting ({line}); "
                            f"raise --max-seq-length or check the data's format")
    if long_conversations == "split":
        line += (f"; {kept:,} conversations as {len(train) + len(held_out):,} windows ({split['conversations']:,} "
                 f"split, {split['exchanges too long']:,} single exchanges longer than {max_seq_length} dropped)")
    summary = {"source": source, "rows": total, "kept": kept, "dropped": dict(dropped),
               "unreadable_lines": bad_lines[:100],  # enough to find them, not a manifest the size of the file
               "long_conversations": long_conversations, "split": dict(split),
               "train": len(train), "eval": len(held_out), "report": line}
    return train, held_out, summary


def chat_data(cfg, tokenizer, label: str = "data") -> tuple[list, list, dict]:
    """prepare_chat_data with a chat recipe's own Config fields (data, max_seq_length, max_samples, eval_fraction, seed,
    long_conversations), and its report printed once: `label: kept ... ; train N, eval M`."""
    train, held_out, summary = prepare_chat_data(cfg.data, tokenizer, cfg.max_seq_length, cfg.max_samples,
                                                 cfg.eval_fraction, cfg.seed, long_conversations=cfg.long_conversations)
    print(f"{label}: {summary['report']}; train {summary['train']:,}, eval {summary['eval']:,}")
    return train, held_out, summary
