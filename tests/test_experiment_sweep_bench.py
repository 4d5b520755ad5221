"""experiment/sweep_bench.py: the generated folder is a valid one, and the figures come from the timeline."""
import json

import pytest

from conftest import ROOT
from experiment.data import check_folder_layout
from experiment.errors import UserError
from experiment.sweep_bench import make_folder, parse_args, summarise


def test_the_generated_folder_has_every_class_in_both_splits_and_is_reused(tmp_path):
    root = make_folder(tmp_path / "f", images=60, size=8, classes=3)
    assert check_folder_layout(root) == ["class0", "class1", "class2"]
    assert len(list(root.rglob("*.png"))) == 60 and len(list((root / "val").rglob("*.png"))) == 6
    stamp = (root / "train" / "class0" / "0.png").stat().st_mtime_ns
    make_folder(root, images=60, size=8, classes=3)
    assert (root / "train" / "class0" / "0.png").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="not a folder this benchmark made with these options"):
        make_folder(root, images=61, size=8, classes=3)


def test_figures_from_a_timeline(tmp_path):
    for job, seconds in ((0, 4.0), (1, 3.0)):
        (tmp_path / f"{job}_run").mkdir()
        (tmp_path / f"{job}_run" / "metrics.json").write_text(json.dumps({"train_seconds": seconds}))
    lines = [(0.5, "[HYDRA] Launching 2 jobs locally"), (0.6, "[HYDRA] \t#0 : seed=0"),
             (2.1, "alexnet on folder: 1 parameters, 10 classes, 5 training steps per epoch, cpu, 1 process(es)"),
             (6.0, "done: ..."), (6.2, "[HYDRA] \t#1 : seed=1"),
             (6.7, "alexnet on folder: 1 parameters, 10 classes, 5 training steps per epoch, cpu, 1 process(es)"),
             (10.0, "done: ...")]
    result = summarise(lines, exited=10.5, status=0, counts=[0, 2, 4, 0], sweep_dir=tmp_path)
    assert result["launch_to_first_step_s"] == pytest.approx({0: 1.5, 1: 0.5})
    assert result["last_line_to_exit_s"] == pytest.approx(0.5)
    assert result["busy_fraction"] == pytest.approx(7.0 / 10.5)
    assert (result["max_child_processes"], result["child_processes_at_end"], result["jobs_finished"]) == (4, 0, 2)


@pytest.mark.parametrize("argv, says", [(["--images", "0"], "--images=0 must be at least 1"),
                                        (["--size", "4"], "--size=4 is too small"),
                                        (["--repo", "/nonexistent"], "holds no train.py"),
                                        (["--json", "README.md/x.json"], "README.md is a file, not a folder"),
                                        (["--json", "tests"], "it is a folder; pass a file name as --json="),
                                        (["--json", "README.md"], "would replace a file this tool did not write")])
def test_bad_options_are_one_line(argv, says, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(UserError, match=says):
        parse_args(argv)


def test_json_replaces_only_an_earlier_result_of_the_benchmark(tmp_path):
    earlier = tmp_path / "sweep.json"
    earlier.write_text(json.dumps({"launch_to_first_step_s": {}, "last_line_to_exit_s": 1.0, "busy_fraction": 0.5}))
    assert parse_args(["--json", str(earlier)]).json == earlier
    (tmp_path / "other.json").write_text(json.dumps({"busy_fraction": 0.5}))
    with pytest.raises(UserError, match="would replace a file this tool did not write"):
        parse_args(["--json", str(tmp_path / "other.json")])
