import json

import pytest

from mobileprune.files import write_json


def test_write_json_replaces_whole_or_not_at_all(tmp_path):
    path = write_json(tmp_path / "step_1" / "done.json", {"step": 1, "val": 0.5}, indent=None)
    assert json.loads(path.read_text()) == {"step": 1, "val": 0.5}
    with pytest.raises(TypeError):  # fails while encoding: the file on disk is the previous one
        write_json(path, {"step": 1, "val": object()})
    assert json.loads(path.read_text()) == {"step": 1, "val": 0.5}
    write_json(path, {"step": 2})
    assert json.loads(path.read_text()) == {"step": 2} and [p.name for p in path.parent.iterdir()] == ["done.json"]
