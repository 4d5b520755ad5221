"""One SGD step of a model built from the library as train.py builds it; rank 0 saves the loss, the
gradients and the updated weights to OUT:

    torchrun --nproc_per_node=2 tests/distributed_step.py OUT [overrides]   # DDP: rank r takes slice r

tests/test_distributed.py compares that with `first_step` in one process. Dropout must be off
(model.dropout=0) for the results to be comparable.
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiment.run_dir import register_resolvers  # noqa: E402
from experiment.data import build_loaders, load_dataset  # noqa: E402
from experiment.distributed import all_reduce_sum, cleanup, init_distributed, select_device, wrap_ddp  # noqa: E402
from experiment.models import build_model  # noqa: E402
from experiment.optim import build_optimizer  # noqa: E402


def first_step(overrides, chunks=1):
    """Rank 0: {"loss", "grads", "params", "batch"} after one step on the first global batch; None elsewhere.
    `chunks` > 1 computes BatchNorm statistics per chunk of the batch, as DDP ranks without SyncBatchNorm do."""
    register_resolvers()
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    # float32 throughout, so that only the order of summation differs between the runs
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    world = init_distributed(select_device(cfg.trainer.device).type)
    device = select_device(cfg.trainer.device, world.local_rank)
    try:
        data = load_dataset(cfg.dataset)
        train_loader, _ = build_loaders(data, cfg.dataset, device=device, seed=cfg.seed, rank=world.rank,
                                        world_size=world.size)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, len(data.classes)).to(device)
        optimizer = build_optimizer(model, cfg.optimizer)
        ddp_model = wrap_ddp(model, world, device, sync_bn=cfg.trainer.sync_bn)
        ddp_model.train()
        x, y = next(train_loader.epoch(0))
        loss = sum(F.cross_entropy(ddp_model(xc), yc) for xc, yc in zip(x.chunk(chunks), y.chunk(chunks))) / chunks
        loss.backward()
        grads = {name: p.grad.detach().cpu().clone() for name, p in model.named_parameters()}
        optimizer.step()
        global_loss = all_reduce_sum(loss.detach().clone(), world) / world.size
        if world.is_main:
            return {"loss": global_loss.cpu(), "grads": grads, "batch": len(y) * world.size,
                    "params": {name: p.detach().cpu() for name, p in model.named_parameters()}}
    finally:
        cleanup(world)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    result = first_step(args.overrides)
    if result is not None:
        torch.save(result, args.out)


if __name__ == "__main__":
    main()
