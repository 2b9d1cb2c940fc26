"""Atomic JSON writes (util/files.py)."""
import json

import pytest

from util.files import write_json


def test_indented_json_ends_in_a_newline_and_compact_json_does_not(tmp_path):
    path = tmp_path / "out.json"
    write_json({"a": [1, 2]}, path, indent=1)
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert path.read_text().endswith("]\n}\n")
    write_json({"a": [1, 2]}, tmp_path / "compact.json")
    assert (tmp_path / "compact.json").read_text() == '{"a": [1, 2]}'


def test_a_failed_write_keeps_the_old_file_and_leaves_no_partial_one(tmp_path):
    path = tmp_path / "out.json"
    write_json({"kept": True}, path)
    with pytest.raises(TypeError):
        write_json({"fine": 1, "not json": object()}, path)   # fails halfway through the dump
    assert json.loads(path.read_text()) == {"kept": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
