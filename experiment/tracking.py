"""What a run reports: TensorBoard event files and metrics.json in the run directory, tqdm bars on a
terminal and plain log lines elsewhere. Only rank 0 reports; on the other ranks the tracker does nothing."""
import hashlib
import json
import re

from experiment.checkpoint import atomic_write


def write_json(path, obj):
    """Atomic JSON write (see `experiment.checkpoint.atomic_write`)."""
    return atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


# The final metrics shown in the HPARAMS tab, when a run's metrics.json has them.
FINAL_METRICS = ("best_acc1", "final_acc1", "test_acc1")
# Their scalar tags' group: after train/ and val/ in the Time Series tab, which sorts groups by name.
FINAL_METRICS_GROUP = "whole_run"
# The hparams a comparison varies (params with the model): TensorBoard shows the first five hparams, those
# marked as differing first.
VARIED_HPARAMS = ("model", "params", "seed")
# The tag groups of the comparison report's verdict (experiment.report): its figures, then its numbers (a tag
# filter lists tags in name order, and "/" sorts before "_"). The address below opens on both.
VERDICT_GROUP, VERDICT_NUMBERS_GROUP = "verdict", "verdict_numbers"


def session_group(config):
    """The HParams session group of a run: its model and dataset, and a hash of its resolved config (a dict)
    without the seed and the resume path, so that exactly the seeds of one arm of one recipe share it."""
    recipe = {k: v for k, v in config.items() if k not in ("seed", "resume")}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{config['model']['name']}_{config['dataset']['name']}_{digest}"


def baseline_of(model: str) -> str | None:
    """Baseline name of an AC model ('alexnet_ac_imagenet' -> 'alexnet_imagenet', 'resnet18_ac' -> 'resnet18');
    None for others."""
    head, marker, tail = model.partition("_ac")
    return head + tail if head and marker and tail[:1] in ("", "_") else None


def tensorboard_url(models) -> str:
    """The TensorBoard address that opens on the verdict: Time Series filtered to the verdict's tags (its
    figures first, then its numbers), smoothing 0, and each arm's runs (its seeds, its mean) in one colour, by a
    regex that captures the model's name in the names of the sweep's runs and the report's (longest name first,
    so that alexnet_ac is not read as alexnet)."""
    names = sorted(set(models), key=lambda m: (-len(m), m))
    return (f"http://127.0.0.1:6006/?smoothing=0&runColorGroup=regex:({'|'.join(map(re.escape, names))})"
            f"&tagFilter=^{VERDICT_GROUP}#timeseries")


def arms(model: str) -> list[str]:
    """The two arms ``model`` belongs to, by the configs' naming (``<name>_ac`` is the AC model of ``<name>``;
    the imagenet layout puts ``_ac`` before ``_imagenet``)."""
    if baseline_of(model):
        return [model, baseline_of(model)]
    head, imagenet, _ = model.partition("_imagenet")
    return [f"{head}_ac{imagenet}", model]


class RunTracker:
    def __init__(self, run_dir, enabled=True):
        self.enabled = enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir))

    def scalars(self, values, step):
        if self.writer:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()

    def image_grid(self, tag, images, mean, std, step=0):
        """A grid of normalised float images, shown un-normalised."""
        if self.writer:
            import torch
            from torchvision.utils import make_grid

            mean = torch.tensor(mean).view(1, -1, 1, 1)
            std = torch.tensor(std).view(1, -1, 1, 1)
            images = (images.detach().float().cpu() * std + mean).clamp(0, 1)
            self.writer.add_image(tag, make_grid(images, nrow=8), step)

    def figure(self, tag, fig, step=0):
        if self.writer:
            self.writer.add_figure(tag, fig, step)

    def hparams(self, hparams, metrics, group, step=0):
        """Hyper-parameters and final metrics for TensorBoard's HPARAMS tab, in this run's own event file.

        ``group`` names the session group: runs that share it (the seeds of one arm) are one row of the
        tab, their metrics averaged. The tab reads a metric's value from the scalar of the same tag in the
        session's run, so the final metrics in ``metrics`` (`FINAL_METRICS`, those present) are also written
        as one-point scalars at ``step``, under `FINAL_METRICS_GROUP`; nothing else is written as a scalar.
        """
        if self.writer:
            from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2, summary_v2

            values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
            final = {f"{FINAL_METRICS_GROUP}/{name}": float(metrics[name]) for name in FINAL_METRICS
                     if metrics.get(name) is not None}
            experiment = api_pb2.Experiment(
                hparam_infos=[api_pb2.HParamInfo(name=name, type=_hparam_type(value), differs=name in VARIED_HPARAMS)
                              for name, value in values.items()],
                metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in final])
            file_writer = self.writer._get_file_writer()
            file_writer.add_summary(_hparams_plugin_summary("experiment", experiment))
            file_writer.add_summary(summary_v2.hparams_pb(values, trial_id=group))
            file_writer.add_summary(_hparams_plugin_summary(
                "session_end_info", plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS)))
            for tag, value in final.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()

    def close(self):
        if self.writer:
            self.writer.close()


def _hparam_type(value):
    from tensorboard.plugins.hparams import api_pb2

    return (api_pb2.DATA_TYPE_BOOL if isinstance(value, bool) else api_pb2.DATA_TYPE_STRING if isinstance(value, str)
            else api_pb2.DATA_TYPE_FLOAT64)


def _hparams_plugin_summary(kind, message):
    """A Summary holding one HParams plugin message (``kind``: experiment or session_end_info)."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    tag = {"experiment": metadata.EXPERIMENT_TAG, "session_end_info": metadata.SESSION_END_INFO_TAG}[kind]
    data = metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(**{kind: message}))
    return Summary(value=[Summary.Value(tag=tag, metadata=data, tensor=metadata.NULL_TENSOR)])
