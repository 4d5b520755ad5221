"""Scoring a model on a split: loss, top-1, top-5 and confusion counts, each sample counted once whatever the
number of ranks; used by training (every eval_every epochs, and best.pt on the test split at the end),
eval.py and the distributed tests.
"""
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from experiment.distributed import all_reduce_sum


def autocast_context(device, amp):
    """bf16 autocast on CUDA when `amp`; float32 elsewhere."""
    device = torch.device(device)
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


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
