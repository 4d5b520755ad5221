"""What a run reports: TensorBoard event files and metrics.json in the run directory, tqdm bars on a
terminal and plain log lines elsewhere. Only rank 0 reports; on the other ranks the tracker does nothing."""
import json
import sys

from experiment.checkpoint import atomic_write


def write_json(path, obj):
    """Atomic JSON write (see `experiment.checkpoint.atomic_write`)."""
    return atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def use_progress_bars(enabled):
    return enabled and sys.stderr.isatty()


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

    def hparams(self, hparams, metrics):
        """Hyper-parameters and final metrics, written into this run's own event file (TensorBoard's HPARAMS tab)."""
        if self.writer:
            from torch.utils.tensorboard.summary import hparams as hparams_summary

            hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
            experiment, session_start, session_end = hparams_summary(hparams, metrics)
            file_writer = self.writer._get_file_writer()
            for summary in (experiment, session_start, session_end):
                file_writer.add_summary(summary)
            for tag, value in metrics.items():
                self.writer.add_scalar(tag, value)

    def close(self):
        if self.writer:
            self.writer.close()
