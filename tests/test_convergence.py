"""tools/convergence.py: the per-epoch table of training runs from their log.txt."""
import json

import pytest

from tools.convergence import read_run, run
from util.errors import UserError

KEY = "test_ratio_0.5_coco_eval_bbox"


def _log(folder, entries):
    folder.mkdir()
    (folder / "log.txt").write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    return folder


@pytest.fixture
def runs(tmp_path):
    long = _log(tmp_path / "long", [{"epoch": e, "train_loss": 1.0, KEY: [0.1 * (e + 1)] + [0.0] * 11}
                                    for e in range(3)])
    # Evaluated every second epoch only, and stopped after 2 epochs.
    short = _log(tmp_path / "short", [{"epoch": 0, "train_loss": 2.0}, {"epoch": 1, KEY: [0.25] + [0.0] * 11}])
    return long, short


def test_reads_the_first_statistic_of_each_evaluated_epoch(runs):
    assert read_run(runs[1], KEY) == {"epochs": [1], "values": [0.25]}
    assert read_run(runs[0], "train_loss") == {"epochs": [0, 1, 2], "values": [1.0, 1.0, 1.0]}


def test_prints_one_row_per_run_with_blanks_where_a_run_has_no_value(runs, tmp_path, capsys):
    output = tmp_path / "table.json"
    run([f"faithful={runs[0]}", f"fast={runs[1]}", "--output", str(output)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| run | epoch 1 | 2 | 3 |"
    assert lines[2] == "| faithful | 0.100 | 0.200 | 0.300 |"
    assert lines[3] == "| fast |  | 0.250 |  |"
    written = json.loads(output.read_text())
    assert written["key"] == KEY and written["runs"]["fast"] == {"epochs": [1], "values": [0.25]}


@pytest.mark.parametrize("problem,needle", [("missing", "does not exist"), ("garbled", "line 2"),
                                            ("no key", "no epoch holds")])
def test_unreadable_runs_are_one_line_errors_naming_the_log(tmp_path, problem, needle):
    folder = tmp_path / "run"
    if problem == "garbled":
        folder.mkdir()
        (folder / "log.txt").write_text('{"epoch": 0}\nnot json\n')
    elif problem == "no key":
        _log(folder, [{"epoch": 0, "train_loss": 1.0}])
    with pytest.raises(UserError, match=needle) as info:
        read_run(folder, KEY)
    assert "log.txt" in str(info.value) and "\n" not in str(info.value)


def test_a_run_without_a_name_is_a_user_error(runs):
    with pytest.raises(UserError, match="NAME=OUTPUT_DIR"):
        run([str(runs[0])])
