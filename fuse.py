"""Fold a trained model (AlexNet, AlexNetAC, or an acified torchvision model) into its deploy form and prove nothing changed:
`python fuse.py ckpt=outputs/.../checkpoints/best.pt [out=PATH] [onnx=true]`; options in configs/fuse.yaml.

Exit status: 0 when the fused model's logits match within `tolerance` (and the ONNX file's too), 1 when not
(nothing is written then), 2 for a usage error.
"""
from experiment.errors import interrupt_in_one_line

interrupt_in_one_line()  # before the slow imports below

import logging
import sys
import time
from pathlib import Path

import hydra
import torch

from experiment.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from experiment.complexity import count_macs, count_parameters
from experiment.config import FUSE_RULES, check_values
from experiment.data import checkpoint_test_loader
from experiment.distributed import select_device
from experiment.errors import exit_on_user_error
from experiment.models import (deploy_checkpoint, export_onnx, logit_difference, model_from_checkpoint,
                               onnx_logit_difference)
from experiment.run_dir import check_outputs, is_deploy_checkpoint
from nets import fuse_model

log = logging.getLogger("fuse")


@hydra.main(config_path="configs", config_name="fuse", version_base="1.3")
@exit_on_user_error
def main(cfg):
    check_values(cfg, FUSE_RULES)
    start = time.perf_counter()
    ckpt = load_checkpoint(cfg.ckpt)
    if ckpt.get("deploy"):
        log.info("%s is already a deploy checkpoint: nothing to fuse", cfg.ckpt)
        return
    out = Path(cfg.out) if cfg.out else Path(cfg.ckpt).with_name(f"{Path(cfg.ckpt).stem}_deploy.pt")
    onnx_path = out.with_suffix(".onnx") if cfg.onnx else None
    # an earlier deploy checkpoint of fuse.py, and the ONNX file beside it, are replaced; any other file is kept
    out, *_ = check_outputs([out, onnx_path], [cfg.ckpt], replaceable=lambda p: is_deploy_checkpoint(out))
    device = select_device(cfg.device, option="device")
    model = model_from_checkpoint(ckpt, cfg.ckpt).to(device).eval()
    fused = fuse_model(model)

    # The proof: random input, then a real test batch, in float32.
    _, _, loader = checkpoint_test_loader(ckpt, cfg.ckpt, cfg.dataset, device=device)
    real, _ = next(loader.epoch(0))
    real = real[:cfg.check_batch]
    noise = torch.randn((cfg.check_batch, *real.shape[1:]), generator=torch.Generator().manual_seed(0)).to(device)
    checks = {"random input": logit_difference(model, fused, noise), "test batch": logit_difference(model, fused, real)}
    onnx_model = None
    if onnx_path:
        onnx_model = export_onnx(fused.cpu(), real[:2].cpu())
        checks["onnx, test batch"] = onnx_logit_difference(onnx_model, fused.cpu(), real.cpu())
    for name, c in checks.items():
        log.info("%-17s max |logit diff| %.3e (relative %.3e), argmax agreement %.1f%% on %d images",
                 name, c["max_abs"], c["max_rel"], 100 * c["argmax_agree"], c["num_samples"])
    if any(not c["max_abs"] <= cfg.tolerance for c in checks.values()):  # a NaN difference fails too
        log.error("fusion is NOT exact: a logit differs by more than tolerance=%.1e; nothing written", cfg.tolerance)
        sys.exit(1)
    # Written only now that every check passed, each atomically: an earlier export stays until then.
    save_checkpoint(deploy_checkpoint(ckpt, fused, cfg.ckpt), out)
    if onnx_model:
        atomic_write(onnx_path, lambda f: f.write(onnx_model), what="ONNX file")
    size = real.shape[1:]
    log.info("parameters %s -> %s, multiply-accumulates per %s image %s -> %s",
             f"{count_parameters(model):,}", f"{count_parameters(fused):,}", "x".join(map(str, size)),
             f"{count_macs(model, (1, *size)):,}", f"{count_macs(fused, (1, *size)):,}")
    log.info("wrote %s%s in %.1fs", out, f" and {onnx_path}" if onnx_path else "", time.perf_counter() - start)


if __name__ == "__main__":
    main()
