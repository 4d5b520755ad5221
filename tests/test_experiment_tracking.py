"""experiment.tracking: what RunTracker writes, read back with TensorBoard's own reader."""
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata

from experiment.tracking import RunTracker, arms, session_group, tensorboard_url

HPARAMS = {"model": "alexnet_ac", "dataset": "digits", "seed": 1, "epochs": 5, "batch_size": 64, "lr": 0.05,
           "params": 895130}


def read_events(run_dir):
    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    events.Reload()
    return events


def config(seed=0, model="alexnet_ac", lr=0.05, resume=None):
    return {"seed": seed, "resume": resume, "model": {"name": model, "width": 0.25},
            "dataset": {"name": "digits", "batch_size": 64}, "optimizer": {"lr": lr}}


def test_session_group_is_shared_by_the_seeds_of_one_recipe_only():
    group = session_group(config())
    assert group.startswith("alexnet_ac_digits_")
    assert session_group(config(seed=3)) == session_group(config(resume="x/last.pt")) == group
    assert session_group(config(model="alexnet")) != group
    assert session_group(config(lr=0.1)) != group


@pytest.mark.parametrize("with_test", [False, True])
def test_hparams_session_group_and_final_metrics(tmp_path, with_test):
    metrics = {"best_acc1": 97.5, "final_acc1": 96.25, "epochs": 5, **({"test_acc1": 95.0} if with_test else {})}
    tracker = RunTracker(tmp_path)
    tracker.hparams(HPARAMS, metrics, group="alexnet_ac_digits_0123abcd", step=5)
    tracker.close()
    events = read_events(tmp_path)
    plugin = events.PluginTagToContent("hparams")
    start = metadata.parse_session_start_info_plugin_data(plugin[metadata.SESSION_START_INFO_TAG])
    assert start.group_name == "alexnet_ac_digits_0123abcd"
    assert start.hparams["seed"].number_value == 1 and start.hparams["model"].string_value == "alexnet_ac"
    end = metadata.parse_session_end_info_plugin_data(plugin[metadata.SESSION_END_INFO_TAG])
    assert end.status == 1  # STATUS_SUCCESS

    expected = {"whole_run/best_acc1": 97.5, "whole_run/final_acc1": 96.25,
                **({"whole_run/test_acc1": 95.0} if with_test else {})}
    experiment = metadata.parse_experiment_plugin_data(plugin[metadata.EXPERIMENT_TAG])
    assert [m.name.tag for m in experiment.metric_infos] == list(expected)
    # TensorBoard shows five hparams, the differing ones first: model and seed must be among them.
    assert {h.name for h in experiment.hparam_infos if h.differs} == {"model", "params", "seed"}
    # The HPARAMS tab reads each metric's value from the scalar of that tag in the run; there is no other scalar.
    assert sorted(events.Tags()["scalars"]) == sorted(expected)
    for tag, value in expected.items():
        assert [(e.step, e.value) for e in events.Scalars(tag)] == [(5, value)]


def test_hparams_skips_metrics_that_are_missing(tmp_path):
    tracker = RunTracker(tmp_path)
    tracker.hparams(HPARAMS, {"best_acc1": None, "final_acc1": None}, group="g")
    tracker.close()
    events = read_events(tmp_path)
    assert events.Tags()["scalars"] == []
    experiment = metadata.parse_experiment_plugin_data(events.PluginTagToContent("hparams")[metadata.EXPERIMENT_TAG])
    assert list(experiment.metric_infos) == []


def test_disabled_tracker_writes_nothing(tmp_path):
    tracker = RunTracker(tmp_path, enabled=False)
    tracker.hparams(HPARAMS, {"best_acc1": 1.0}, group="g")
    tracker.close()
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_url_opens_on_the_verdict_with_arms_coloured():
    url = tensorboard_url(["alexnet", "alexnet_ac", "alexnet"])
    assert url == ("http://127.0.0.1:6006/?smoothing=0&runColorGroup=regex:(alexnet_ac|alexnet)"
                   "&tagFilter=^verdict#timeseries")
    assert arms("alexnet_ac") == arms("alexnet") == ["alexnet_ac", "alexnet"]
    assert arms("alexnet_imagenet") == arms("alexnet_ac_imagenet") == ["alexnet_ac_imagenet", "alexnet_imagenet"]
    assert arms("resnet18") == ["resnet18_ac", "resnet18"]
