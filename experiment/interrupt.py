"""Stop cleanly on SIGINT/SIGTERM/SIGUSR2: finish the current step, save, tell the user how to resume.

SIGUSR2 is the early warning the SLURM launcher (submitit) asks SLURM to send before a job's time limit."""
import signal

import torch

from experiment.distributed import all_reduce_sum


class StopRequest:
    """Call it after each step: true once a stop signal arrived (on any rank, under torchrun).

    A second Ctrl-C stops at once. Under torchrun the ranks agree every `every` steps, so they all stop
    after the same step and none is left waiting in a collective."""

    def __init__(self, world, device, every=1):
        self.world, self.device, self.every = world, device, every
        self.signal = None
        self.calls = 0

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum)

    @property
    def exit_code(self):
        return 128 + int(self.signal or signal.SIGTERM)

    def __call__(self):
        if not self.world.distributed:
            return self.signal is not None
        self.calls += 1
        if self.calls % self.every:
            return False
        flag = torch.tensor([float(self.signal is not None)], device=self.device)
        stop = bool(all_reduce_sum(flag, self.world).item())
        if stop and self.signal is None:
            self.signal = signal.SIGTERM
        return stop
