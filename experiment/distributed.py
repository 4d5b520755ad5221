"""Process-group setup for torchrun; a plain `python train.py` is a world of one and needs none of it."""
import datetime
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from experiment.errors import UserError


@dataclass
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.size > 1


def init_distributed(device_type):
    """Join the process group torchrun describes in the environment (NCCL on GPUs, gloo on CPU)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return World()
    world = World(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    if device_type == "cuda":
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))
    if not world.is_main:  # rank 0 reports for all; the others speak up only for errors
        logging.getLogger().setLevel(logging.ERROR)
    return world


def broadcast_object(obj, world):
    """Rank 0's value of `obj` on every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(tensor, world):
    """Sum a tensor over all ranks (in place) and return it."""
    if world.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


@contextmanager
def local_main_first(world):
    """Run the block in each machine's first process, then in the others: a dataset download happens once per
    machine instead of every process writing the same files at once."""
    if world.local_rank != 0:
        dist.barrier()
    yield
    if world.distributed and world.local_rank == 0:
        dist.barrier()


def cleanup(world, together=True):
    """End the process group. `together`: first wait for every rank (a normal end, or a stop all ranks agreed on).
    A rank that tore the group down and exited while another still worked (rank 0 writing the end-of-run report)
    was now and then aborted by gloo ("terminate called without an active exception"), failing the torchrun job.
    After an error on one rank alone the others may never arrive: no waiting then."""
    if world.distributed and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def select_device(name, local_rank=0, option="trainer.device"):
    """auto | cpu | cuda -> torch.device; `option` names the setting in error messages."""
    if name not in ("auto", "cpu", "cuda"):
        raise UserError(f"{option}={name} is not a choice; use auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{option}=cuda but no CUDA device is visible; use {option}=cpu (or auto)")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def all_gather_object(obj, world):
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not world.distributed:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def wrap_ddp(model, world, device, sync_bn=False):
    """DistributedDataParallel under torchrun (with SyncBatchNorm if asked, which reaches ACB branches too);
    the model itself otherwise."""
    if not world.distributed:
        return model
    if sync_bn and device.type != "cuda":
        raise UserError("trainer.sync_bn=true needs GPUs (PyTorch's SyncBatchNorm does not run on CPU); "
                        "drop it, or train on CUDA devices")
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model):
    """The bare network inside DDP / torch.compile wrappers: its state_dict has no `module.` prefixes."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model
