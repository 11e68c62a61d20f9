"""check_data_source: the --data mistakes a run would stop on after loading a model, refused in one line before it."""
import json

import httpx
import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import RepositoryNotFoundError

import common.data
from common.data import FORMATS, check_data_source, read_rows_and_bad_lines
from common.errors import UserError

QA = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]


def write_jsonl(path, rows, extra_lines=()):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "".join(line + "\n" for line in extra_lines))
    return str(path)


@pytest.mark.parametrize("name, content, expected", [
    ("missing.jsonl", None, r"missing.jsonl: data file not found; check the path given to --data$"),
    ("notes.txt", "q: a\n", r"notes.txt: unsupported file type '.txt'; use one of .json, .jsonl, .csv, .parquet$"),
    ("broken.jsonl", '{"question": "q", "answer": "a"}\n{"question"\n[]\n',
     r"broken.jsonl: 2 of 3 lines are not a JSON object \(lines 2, 3\); a .jsonl file holds one JSON object per line"),
    ("cut.json", '[{"question": "q", "answer": "a"}, {"quest', r"cut.json: line 1 column \d+ .*invalid JSON"),
    ("shape.jsonl", '{"prompt": "p", "reply": "r"}\n', r"shape.jsonl: no supported format; found columns "
                                                       r"\['prompt', 'reply'\]"),
    ("blank.jsonl", "\n\n", r"blank.jsonl: the file holds no records; check the export or the path given to --data$"),
    ("header.csv", "question,answer\n", r"header.csv: the file holds no records"),
])
def test_local_mistakes_are_one_line(tmp_path, name, content, expected):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match=expected):
        check_data_source(str(tmp_path / name))


def test_expect_names_the_formats_a_recipe_reads(tmp_path):
    labelled = tmp_path / "labels.csv"
    labelled.write_text("text,label\ngood film,positive\n")
    check_data_source(str(labelled), expect=None)  # a recipe with its own columns checks them itself
    with pytest.raises(UserError, match=r"no supported format; found columns \['label', 'text'\]"):
        check_data_source(str(labelled))
    qa = write_jsonl(tmp_path / "qa.jsonl", QA)
    check_data_source(qa)
    with pytest.raises(UserError, match=r"qa.jsonl: no supported format; .*expected one of \(alpaca: instruction, "
                                        r"output\)$"):
        check_data_source(qa, expect={"alpaca": FORMATS["alpaca"]})


def test_a_checked_file_is_parsed_once_unless_it_changes(tmp_path, monkeypatch):
    reads = []
    read_local = common.data._read_local
    monkeypatch.setattr(common.data, "_read_local", lambda path: reads.append(path) or read_local(path))
    data = tmp_path / "d.jsonl"
    write_jsonl(data, QA, extra_lines=["not json"])
    check_data_source(str(data))
    assert read_rows_and_bad_lines(str(data)) == (QA, [3])
    assert len(reads) == 1
    assert read_rows_and_bad_lines(str(data)) == (QA, [3])  # handed over once, then read again
    assert len(reads) == 2
    check_data_source(str(data))
    write_jsonl(data, QA[:1])
    assert read_rows_and_bad_lines(str(data)) == (QA[:1], [])


def not_found(self, repo_id, **kwargs):
    request = httpx.Request("GET", f"https://huggingface.co/api/datasets/{repo_id}")
    raise RepositoryNotFoundError("404 Client Error", response=httpx.Response(404, request=request))


def unreachable(self, repo_id, **kwargs):
    raise httpx.ConnectError("[Errno -2] Name or service not known")


def test_a_hub_dataset_must_exist_when_the_hub_answers(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    asked = []
    monkeypatch.setattr(HfApi, "dataset_info", lambda self, repo_id, timeout=None: asked.append((repo_id, timeout)))
    check_data_source("mlabonne/FineTome-100k")
    assert asked == [("mlabonne/FineTome-100k", 10)]
    monkeypatch.setattr(HfApi, "dataset_info", not_found)
    with pytest.raises(UserError, match=r"^dataset mlabonne/FineTome-1k not found on the hub .*check --data or pass a "
                                        r"local .jsonl/.json/.csv/.parquet file$"):
        check_data_source("mlabonne/FineTome-1k")
    monkeypatch.setattr(HfApi, "dataset_info", unreachable)
    check_data_source("mlabonne/FineTome-1k")  # no network: it may be in the local cache


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_offline_the_hub_is_not_asked(monkeypatch, variable):
    monkeypatch.setenv(variable, "1")
    monkeypatch.setattr(HfApi, "dataset_info", not_found)
    check_data_source("mlabonne/FineTome-1k")
