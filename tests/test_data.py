"""Data loading: the user's files fail loudly with file and line; splits are deterministic."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from common.config import RunConfig
from common.data.files import load_labeled_file
from common.data.partition import client_data, global_test_set
from common.errors import DataError
from tests.conftest import needs_wordnet


def write(tmp_path, name, text, encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def test_csv_with_blank_lines_and_bom_loads(tmp_path):
    path = write(tmp_path, "d.csv", "\ufefftext,label\nhello there,pos\n\nawful stuff,neg\n")
    data = load_labeled_file(path, "text", "label")
    assert data.texts == ["hello there", "awful stuff"]
    assert [data.label_names[i] for i in data.labels] == ["pos", "neg"]


def test_jsonl_with_integer_labels_loads(tmp_path):
    rows = [{"t": "a b", "y": 1}, {"t": "c d", "y": 0}, {"t": "e", "y": 1}]
    path = write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    data = load_labeled_file(path, "t", "y")
    assert data.label_names == ["0", "1"] and data.labels == [1, 0, 1]


@pytest.mark.parametrize("name,content,kwargs,message", [
    ("d.csv", "text,label\nok,a\nfine,b\nweird,c\n", {"labels": "a,b"},
     r"d\.csv:4: label 'c' is not one of the configured labels a, b"),
    ("d.csv", "text,label\nok,a\n,b\n", {}, r"d\.csv:3: empty text"),
    ("d.csv", "text,label\nok,a\nno label,\n", {}, r"d\.csv:3: empty label"),
    ("d.csv", "body,label\nok,a\n", {}, r"d\.csv:1: no column 'text'"),
    ("d.csv", "text,label\nok,a,extra\n", {}, r"d\.csv:2: more fields than the header"),
    ("d.jsonl", '{"text": "x", "label": "a"}\n{"text": "y", "label": \n', {}, r"d\.jsonl:2: invalid JSON"),
    ("d.jsonl", '{"text": "x", "label": "a"}\n{"text": "y"}\n', {}, r"d\.jsonl:2: missing key 'label'"),
    ("d.jsonl", '["x", "a"]\n', {}, r"d\.jsonl:1: expected a JSON object"),
    ("d.csv", "text,label\nok,a\nok too,a\n", {}, "classification needs at least two"),
    ("d.txt", "whatever", {}, "unsupported file type .txt"),
])
def test_malformed_files_name_file_and_line(tmp_path, name, content, kwargs, message):
    path = write(tmp_path, name, content)
    with pytest.raises(DataError, match=message):
        load_labeled_file(path, "text", "label", **kwargs)


def test_non_utf8_file_names_the_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("text,label\nok,a\ncaf\xe9,b\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"d\.csv:3: not valid UTF-8"):
        load_labeled_file(path, "text", "label")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_labeled_file(tmp_path / "nope.csv", "text", "label")


def _file_config(tmp_path, n_per_class=60, **overrides):
    lines = ["text,label"] + [f"example {i} of class {c},{c}" for c in "abc" for i in range(n_per_class)]
    path = write(tmp_path, "toy.csv", "\n".join(lines) + "\n")
    return RunConfig(dataset=str(path), examples_per_class=0, **overrides)


def test_partitions_are_deterministic_disjoint_and_exclude_the_global_test(tmp_path):
    config = _file_config(tmp_path)
    test_texts = set(global_test_set(config).texts)
    seen: set[str] = set()
    for pid in range(3):
        first, again = client_data(config, pid, 3), client_data(config, pid, 3)
        assert first.train.texts == again.train.texts
        texts = set(first.train.texts) | set(first.test.texts)
        assert not texts & test_texts and not texts & seen
        seen |= texts
    assert len(seen) + len(test_texts) == 180


def test_iid_partitions_have_equal_sizes(tmp_path):
    config = _file_config(tmp_path, partitioner="iid")
    sizes = {len(client_data(config, pid, 4).train) + len(client_data(config, pid, 4).test) for pid in range(4)}
    assert max(sizes) - min(sizes) <= 1


def test_too_few_examples_for_the_clients_is_a_clear_error(tmp_path):
    config = _file_config(tmp_path, n_per_class=5)
    with pytest.raises(DataError, match="too few for 20 clients"):
        client_data(config, 0, 20)


@needs_wordnet
def test_wordnet_has_ten_balanced_capped_classes():
    config = RunConfig(examples_per_class=100)
    test = global_test_set(config)
    assert len(test.label_names) == 10
    data = client_data(config, 0, 1)
    counts = Counter(data.train.labels + data.test.labels + test.labels)
    assert set(counts.values()) == {100}


@needs_wordnet
def test_iid_partitions_cover_every_class_evenly():
    config = RunConfig(examples_per_class=200, partitioner="iid")
    for pid in range(4):
        counts = Counter(client_data(config, pid, 4).train.labels)
        assert len(counts) == 10 and max(counts.values()) < 3 * min(counts.values())


@needs_wordnet
def test_dirichlet_partitions_are_label_skewed():
    config = RunConfig(examples_per_class=200, dirichlet_alpha=0.1)
    shares = []
    for pid in range(4):
        labels = client_data(config, pid, 4).train.labels
        shares.append(Counter(labels).most_common(1)[0][1] / len(labels))
    assert max(shares) > 0.3  # IID would give ~0.1 per class
