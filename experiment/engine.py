"""The training and evaluation loops.

Running sums stay on the device and are read back only for the progress bar and at the end of an epoch,
so a step never waits for the GPU to finish the one before.
"""
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from experiment.distributed import all_reduce_sum


class NonFiniteLoss(Exception):
    """`epoch` and `step` are 0-based like the loop's; the message counts from 1, as the logs do."""

    def __init__(self, epoch, step, steps_per_epoch=None):
        of = f" of {steps_per_epoch}" if steps_per_epoch else ""
        super().__init__(f"the training loss became non-finite (nan or inf) at epoch {epoch + 1}, step {step + 1}{of}")
        self.epoch, self.step = epoch, step


def autocast_context(device, amp):
    """bf16 autocast on CUDA when `amp`; float32 elsewhere."""
    device = torch.device(device)
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@dataclass
class TrainTotals:
    """Sums over the steps of one epoch so far; saved in an interrupted run's checkpoint."""

    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0
    seconds: float = 0.0

    def state_dict(self):
        return dict(self.__dict__)


def train_one_epoch(model, loader, optimizer, scheduler, *, epoch, device, amp=False, label_smoothing=0.0,
                    start_step=0, totals=None, stop_requested=lambda: False, progress=None, log_every=20):
    """Train for one epoch from `start_step`. Returns (totals, next_step); next_step < len(loader) means the
    epoch stopped early because `stop_requested()` became true after a finished step."""
    model.train()
    totals = totals or TrainTotals()
    # The loss sum continues from `totals` rather than starting at 0 and being added at the end: float
    # addition is not associative (late, tiny losses of a long epoch round differently), and only one running
    # sum makes a run resumed mid-epoch report the very same epoch loss as an uninterrupted one.
    loss_sum = torch.tensor(totals.loss_sum, device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    first_bad = torch.full((), -1, device=device, dtype=torch.int64)
    count, step = 0, start_step
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(loader.epoch(epoch, start_step), start=start_step):
        with autocast_context(device, amp):
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss = loss.detach()
        loss_sum += loss * len(y)
        correct += (logits.argmax(1) == y).sum()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        count += len(y)
        done = step + 1
        if done % log_every == 0 or done == len(loader):
            _check_finite(first_bad, epoch, len(loader))
            if progress is not None:
                seconds = time.perf_counter() - t0
                seen = totals.count + count
                progress.set_postfix(loss=f"{loss_sum.item() / seen:.3f}",
                                     acc=f"{100 * (totals.correct + correct.item()) / seen:.1f}",
                                     img_s=f"{count / max(seconds, 1e-9):.0f}", refresh=False)
                progress.update(done - progress.n)
        if stop_requested():
            step += 1
            break
    else:
        step = len(loader)
    _check_finite(first_bad, epoch, len(loader))
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    totals.loss_sum = loss_sum.item()
    totals.correct += int(correct.item())
    totals.count += count
    totals.seconds += time.perf_counter() - t0
    return totals, step


def _check_finite(first_bad, epoch, steps_per_epoch=None):
    bad = int(first_bad.item())
    if bad >= 0:
        raise NonFiniteLoss(epoch, bad, steps_per_epoch)


def reduce_train_totals(totals, device, world):
    """Sum the loss and accuracy counts over all ranks: the epoch's loss and top-1 on the whole data."""
    t = torch.tensor([totals.loss_sum, totals.correct, totals.count], dtype=torch.float64, device=device)
    loss_sum, correct, count = all_reduce_sum(t, world).tolist()
    return {"loss": loss_sum / max(count, 1), "acc1": 100.0 * correct / max(count, 1)}


@torch.no_grad()
def evaluate(model, loader, *, num_classes, device, world, amp=False, return_predictions=False):
    """Loss, top-1, top-5, per-class confusion counts and sample count over the whole test split, each
    sample counted once whatever the number of ranks."""
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    top1 = torch.zeros((), device=device, dtype=torch.int64)
    top5 = torch.zeros((), device=device, dtype=torch.int64)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.int64)
    predictions = []
    k = min(5, num_classes)
    t0 = time.perf_counter()
    for x, y in loader.epoch(0):
        with autocast_context(device, amp):
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        topk = logits.topk(k, dim=1).indices
        top1 += (topk[:, 0] == y).sum()
        top5 += (topk == y[:, None]).any(1).sum()
        confusion.index_add_(0, y * num_classes + topk[:, 0], torch.ones_like(y))  # bincount would sync on CUDA
        if return_predictions:
            predictions.append(topk[:, 0].cpu())
    stats = torch.cat([loss_sum.view(1), top1.view(1).double(), top5.view(1).double()])
    loss_sum, top1, top5 = all_reduce_sum(stats, world).tolist()
    confusion = all_reduce_sum(confusion, world).view(num_classes, num_classes).cpu()
    n = int(confusion.sum())
    result = {"loss": loss_sum / max(n, 1), "acc1": 100.0 * top1 / max(n, 1), "acc5": 100.0 * top5 / max(n, 1),
              "num_samples": n, "seconds": time.perf_counter() - t0, "confusion": confusion}
    if return_predictions:
        result["predictions"] = torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.int64)
    return result
