"""Evaluate a trained or deploy checkpoint on the test split:
`python eval.py ckpt=PATH [dataset.root=...] [out=PATH] [compare=OTHER.pt]`; options in configs/eval.yaml.

Writes <stem>.eval.json (acc1, acc5, loss, num_samples, per-class top-1, images/s) and <stem>.confusion.png
beside it.
With compare=, both checkpoints run on the same data in float32 and the differing predictions are counted:
for a trained model and its fusion both the accuracy difference and that count must be 0.
"""
from experiment.errors import interrupt_in_one_line

interrupt_in_one_line()  # before the slow imports below

import contextlib
import logging
import math
from pathlib import Path

import hydra

from experiment.checkpoint import load_checkpoint
from experiment.config import EVAL_RULES, check_values
from experiment.data import checkpoint_test_loader
from experiment.distributed import World, select_device
from experiment.errors import UserError, exit_on_user_error
from experiment.evaluation import evaluate
from experiment.figures import save_confusion_matrix
from experiment.models import exact_float32, model_from_checkpoint
from experiment.run_dir import check_outputs, is_eval_report
from experiment.tracking import write_json

log = logging.getLogger("eval")


@hydra.main(config_path="configs", config_name="eval", version_base="1.3")
@exit_on_user_error
def main(cfg):
    check_values(cfg, EVAL_RULES)
    out = Path(cfg.out) if cfg.out else Path(cfg.ckpt).with_name(f"{Path(cfg.ckpt).stem}.eval.json")
    png = out.with_name(f"{out.name.removesuffix('.json').removesuffix('.eval')}.confusion.png")
    # an earlier report of eval.py, and the confusion matrix beside it, are replaced; any other file is kept
    out, png = check_outputs([out, png], [cfg.ckpt, cfg.compare], replaceable=lambda p: is_eval_report(out))
    device = select_device(cfg.device, option="device")
    ckpt = load_checkpoint(cfg.ckpt)
    other = load_checkpoint(cfg.compare) if cfg.compare else None
    if other:  # checked before any work: only models of one task are compared
        check_same_task(ckpt, cfg.ckpt, other, cfg.compare)
    data_cfg, classes, loader = checkpoint_test_loader(ckpt, cfg.ckpt, cfg.dataset, device=device)

    def run(checkpoint, path, amp):
        result = evaluate(model_from_checkpoint(checkpoint, path).to(device), loader, num_classes=len(classes),
                          device=device, world=World(), amp=amp, return_predictions=True)
        if not math.isfinite(result["loss"]):  # finite weights can still overflow: no score from such outputs
            raise UserError(f"the model in {path} gives non-finite outputs (nan or inf) on the test split of "
                            f"{data_cfg.name}; its scores would mean nothing: use an earlier checkpoint of the run")
        return result

    # With compare=, both models run in exact float32 (no bf16, no TF32): a fusion must change no prediction.
    precise = exact_float32 if cfg.compare else contextlib.nullcontext
    with precise():
        result = run(ckpt, cfg.ckpt, cfg.amp and not cfg.compare)
    counts = result["confusion"].sum(1)  # a class can be left with no test image (dataset.skip_bad_images)
    per_class = [100 * hit / n if n else None for hit, n in zip(result["confusion"].diag().tolist(), counts.tolist())]
    report = {"checkpoint": str(cfg.ckpt), "model": ckpt["config"]["model"]["name"], "dataset": data_cfg.name,
              "acc1": result["acc1"], "acc5": result["acc5"], "loss": result["loss"],
              "num_samples": result["num_samples"], "img_per_s": result["num_samples"] / result["seconds"],
              "per_class_acc1": dict(zip(classes, per_class))}  # null: no images of that class
    log.info("%s on %s: top-1 %.2f%%, top-5 %.2f%%, loss %.4f, %d images, %.0f img/s", report["model"],
             data_cfg.name, report["acc1"], report["acc5"], report["loss"], report["num_samples"], report["img_per_s"])
    log.info("per-class top-1: %s", "  ".join(f"{c} {'no images' if a is None else f'{a:.1f}'}"
                                              for c, a in report["per_class_acc1"].items()))

    if other:
        with precise():
            theirs = run(other, cfg.compare, False)
        differing = int((result["predictions"] != theirs["predictions"]).sum())
        report["compare"] = {"checkpoint": str(cfg.compare), "model": other["config"]["model"]["name"],
                             "acc1": theirs["acc1"], "acc1_difference": theirs["acc1"] - result["acc1"],
                             "differing_predictions": differing}
        log.info("compare %s: top-1 %.2f%% (difference %+.4f points), %d of %d predictions differ (float32)",
                 report["compare"]["model"], theirs["acc1"], theirs["acc1"] - result["acc1"], differing,
                 result["num_samples"])

    write_json(out, report)
    save_confusion_matrix(result["confusion"], classes, png)
    log.info("wrote %s and %s", out, png)


def check_same_task(ckpt, path, other, other_path):
    """compare= counts differing predictions: that means something only for two models of one task, the same
    classes of the same dataset (a model and its fusion, two seeds, two architectures)."""
    mine, theirs = ckpt["config"]["dataset"].get("name"), other["config"]["dataset"].get("name")
    if other["num_classes"] != ckpt["num_classes"]:
        differ = f"predicts {other['num_classes']} classes, {path} {ckpt['num_classes']}"
    elif theirs != mine:
        differ = f"was trained on dataset {theirs}, {path} on {mine}"
    elif other.get("classes") and ckpt.get("classes") and list(other["classes"]) != list(ckpt["classes"]):
        differ = f"was trained on other classes than {path}"
    else:
        return
    raise UserError(f"{other_path} {differ}; compare checkpoints of the same task")


if __name__ == "__main__":
    main()
