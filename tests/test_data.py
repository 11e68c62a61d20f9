"""Loading and standardising the common dataset formats, with every drop reason counted and bad files named."""
import csv
import json
import logging
from collections import Counter

import pytest

from common.data import (clean_conversation, drop_too_long, prepare_chat_data, read_rows, read_rows_and_bad_lines,
                         report, split_train_eval, to_conversations)
from common.errors import UserError
from common.smoke import train_tokenizer

USER, ASSISTANT, SYSTEM = "user", "assistant", "system"
CONTENT_ONLY = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def msg(role, content):
    return {"role": role, "content": content}


def test_sharegpt_roles_are_mapped():
    rows = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                               {"from": "gpt", "value": "Hello."}]}]
    conversations, dropped = to_conversations(rows, "x")
    assert conversations == [[msg(SYSTEM, "Be brief."), msg(USER, "Hi"), msg(ASSISTANT, "Hello.")]]
    assert not +dropped


def test_openai_messages_pass_through_and_system_prompt_is_added():
    rows = [{"messages": [msg(USER, "2+2?"), msg(ASSISTANT, "4")]}]
    conversations, _ = to_conversations(rows, "x", system_prompt="You answer maths.")
    assert conversations == [[msg(SYSTEM, "You answer maths."), msg(USER, "2+2?"), msg(ASSISTANT, "4")]]


def test_alpaca_input_is_appended_only_when_present():
    rows = [{"instruction": "Translate", "input": "bonjour", "output": "hello"},
            {"instruction": "Say hi", "input": "", "output": "hi"}]
    conversations, _ = to_conversations(rows, "x")
    assert conversations[0] == [msg(USER, "Translate\n\nbonjour"), msg(ASSISTANT, "hello")]
    assert conversations[1] == [msg(USER, "Say hi"), msg(ASSISTANT, "hi")]


def test_question_answer_rows():
    conversations, _ = to_conversations([{"question": "What is --smoke?", "answer": "An offline run."}], "x")
    assert conversations == [[msg(USER, "What is --smoke?"), msg(ASSISTANT, "An offline run.")]]


@pytest.mark.parametrize("turns, expected", [
    ([], (None, "empty")),
    (None, (None, "empty")),
    ("text", (None, "malformed")),
    ([{"from": "human", "value": "  "}, {"from": "gpt", "value": ""}], (None, "empty")),
    ([{"from": "narrator", "value": "x"}, {"from": "gpt", "value": "y"}], (None, "bad roles")),
    ([{"from": "human", "value": "a"}, {"from": "system", "value": "late"}, {"from": "gpt", "value": "b"}], (None, "bad roles")),
    ([{"from": "human", "value": "anyone?"}], (None, "no reply")),
])
def test_unusable_conversations_are_dropped_with_a_reason(turns, expected):
    assert clean_conversation(turns) == expected


def test_repairable_conversations_are_repaired():
    starts_with_assistant = [{"from": "gpt", "value": "Hi!"}, {"from": "human", "value": "2+2?"},
                             {"from": "gpt", "value": "4"}, {"from": "human", "value": "thanks"}]
    assert clean_conversation(starts_with_assistant) == ([msg(USER, "2+2?"), msg(ASSISTANT, "4")], None)
    repeated = [msg(USER, "Name a colour."), msg(USER, "Just one."), msg(ASSISTANT, ""), msg(ASSISTANT, "Red.")]
    assert clean_conversation(repeated) == ([msg(USER, "Name a colour.\n\nJust one."), msg(ASSISTANT, "Red.")], None)


def test_drop_counts_and_report_line():
    rows = [{"conversations": []}, {"conversations": [{"from": "bot", "value": "x"}]},
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
    conversations, dropped = to_conversations(rows, "x")
    assert len(conversations) == 1 and dropped == Counter({"empty": 1, "no reply": 1})
    assert report(1234, 1000, Counter({"empty": 12, "bad roles": 3, "too long": 219})) == \
        "kept 1,000 / 1,234; dropped: empty 12, bad roles 3, too long 219"


def test_length_filter_uses_chat_templated_token_count():
    tokenizer = train_tokenizer(["short words here"] * 50, "llama-3")
    tokenizer.chat_template = CONTENT_ONLY
    short, long = [msg(USER, "hi"), msg(ASSISTANT, "yo")], [msg(USER, "word " * 300), msg(ASSISTANT, "yo")]
    dropped = Counter()
    assert drop_too_long([short, long], tokenizer, 64, dropped) == [short]
    assert dropped["too long"] == 1


def test_measuring_a_too_long_conversation_does_not_warn_about_indexing_errors(caplog):
    tokenizer = train_tokenizer(["short words here"] * 50, "llama-3")
    tokenizer.chat_template = CONTENT_ONLY
    tokenizer.model_max_length = 32
    long = [msg(USER, "word " * 300), msg(ASSISTANT, "yo")]
    transformers_logger = logging.getLogger("transformers")  # it does not propagate to the root logger caplog hears
    transformers_logger.addHandler(caplog.handler)
    try:
        assert drop_too_long([long], tokenizer, 64, Counter()) == []
        assert "Token indices sequence length is longer" not in caplog.text
        tokenizer("word " * 300)  # outside the measurement the warning is still given, once
        assert "Token indices sequence length is longer" in caplog.text
    finally:
        transformers_logger.removeHandler(caplog.handler)


def test_split_is_seeded_and_sized():
    train, held_out = split_train_eval(range(100), 0.2, seed=1)
    assert (len(train), len(held_out)) == (80, 20) and sorted(train + held_out) == list(range(100))
    assert split_train_eval(range(100), 0.2, seed=1) == (train, held_out)
    assert split_train_eval(range(100), 0.2, seed=2) != (train, held_out)


def test_local_formats_load(tmp_path):
    rows = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    (tmp_path / "d.json").write_text(json.dumps({"data": rows}))
    with open(tmp_path / "d.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["question", "answer"])
        writer.writeheader()
        writer.writerows(rows)
    import pyarrow
    import pyarrow.parquet
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "d.parquet")
    for suffix in ("jsonl", "json", "csv", "parquet"):
        assert read_rows(str(tmp_path / f"d.{suffix}")) == rows, suffix


def test_unreadable_jsonl_lines_are_dropped_counted_and_named(tmp_path):
    tokenizer = train_tokenizer(["q a words"] * 20, "llama-3")
    tokenizer.chat_template = CONTENT_ONLY
    good = [json.dumps({"question": f"q{i}", "answer": f"a{i}"}) for i in range(5)]
    data = tmp_path / "messy.jsonl"  # line 3 is cut short, line 5 blank, line 7 JSON but not an object
    data.write_text("\n".join([good[0], good[1], '{"question": "q", "ans', good[2], "", good[3], '["q", "a"]',
                               good[4]]) + "\n")
    rows, bad_lines = read_rows_and_bad_lines(str(data))
    assert rows == [json.loads(line) for line in good] and bad_lines == [3, 7]
    assert read_rows(str(data)) == rows
    train, held_out, summary = prepare_chat_data(str(data), tokenizer, 64, 0, 0.2, 0)
    assert len(train) + len(held_out) == 5
    assert (summary["rows"], summary["kept"], summary["unreadable_lines"]) == (7, 5, [3, 7])
    assert summary["dropped"] == {"unreadable": 2, "too long": 0}
    assert summary["report"] == "kept 5 / 7; dropped: unreadable 2 (lines 3, 7)"


def test_report_names_the_first_unreadable_lines():
    assert report(44, 38, Counter({"unreadable": 1, "empty": 2}), [14]) == \
        "kept 38 / 44; dropped: unreadable 1 (line 14), empty 2"
    assert report(44, 30, Counter({"unreadable": 7, "too long": 7}), [2, 3, 5, 8, 13, 21, 34]) == \
        "kept 30 / 44; dropped: unreadable 7 (lines 2, 3, 5, 8, 13, ...), too long 7"


def test_bad_files_are_named_with_the_line(tmp_path):
    not_json_lines = tmp_path / "pretty.jsonl"  # a JSON array, pretty-printed and saved as .jsonl
    not_json_lines.write_text(json.dumps([{"question": "q", "answer": "a"}] * 2, indent=2))
    with pytest.raises(UserError, match=r"pretty.jsonl: 10 of 10 lines are not a JSON object \(lines 1, 2, 3, 4, 5, "
                                        r"\.\.\.\); a .jsonl file holds one JSON object per line: re-export it as JSON "
                                        r"Lines, or if it is one JSON array, rename it to .json$"):
        read_rows(str(not_json_lines))
    mostly_broken = tmp_path / "bad.jsonl"
    mostly_broken.write_text('{"question": "q", "answer": "a"}\n{"question": "q2", "answer": \nnull\n')
    with pytest.raises(UserError, match=r"bad.jsonl: 2 of 3 lines are not a JSON object \(lines 2, 3\)"):
        read_rows(str(mostly_broken))
    truncated = tmp_path / "cut.json"
    truncated.write_text('[{"question": "q", "answer": "a"}, {"question": "q2", "ans')
    with pytest.raises(UserError, match=r"cut.json: line 1 column \d+ \(byte \d+\): invalid JSON .*truncated"):
        read_rows(str(truncated))
    with pytest.raises(UserError, match="missing.jsonl: data file not found"):
        read_rows(str(tmp_path / "missing.jsonl"))


def test_unknown_columns_list_what_was_found_and_expected():
    with pytest.raises(UserError) as error:
        to_conversations([{"prompt": "p", "reply": "r"}], "mine.csv")
    message = str(error.value)
    assert "mine.csv: no supported format; found columns ['prompt', 'reply']" in message
    assert "sharegpt: conversations" in message and "alpaca: instruction, output" in message


def test_empty_after_filtering_names_the_filter(tmp_path):
    tokenizer = train_tokenizer(["some words"] * 20, "llama-3")
    tokenizer.chat_template = CONTENT_ONLY
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"question": "word " * 200, "answer": "a"}) + "\n" for _ in range(3)))
    with pytest.raises(UserError, match=r"too few conversations left after filtering \(kept 0 / 3; dropped: too long 3\)"):
        prepare_chat_data(str(data), tokenizer, 32, 0, 0.2, 0)
