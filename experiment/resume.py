"""The config of a resumed run: the one stored in its checkpoint, so `python train.py resume=PATH` alone
continues exactly that run. Command-line `trainer.*` overrides apply on top (e.g. another device or
save interval); any other override must agree with the stored run, since changing the model, data or
recipe halfway would make a different experiment. `trainer.epochs` is part of the recipe: the learning-rate
schedule is laid out over the run's steps, and another length would make it jump."""
from omegaconf import OmegaConf

from experiment.errors import UserError

_IGNORED = ("resume", "hydra.")


def resumed_config(cfg, stored, overrides):
    """`cfg`: this command line's config; `stored`: the checkpoint's `config`; `overrides`: Hydra's task
    overrides (strings like "trainer.epochs=40"). Returns the config to continue with."""
    resumed = OmegaConf.create(stored)
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith(_IGNORED):
            continue
        if key.startswith("trainer.") and key != "trainer.epochs":
            OmegaConf.update(resumed, key, OmegaConf.select(cfg, key), force_add=True)
            continue
        now, then = OmegaConf.select(cfg, key), OmegaConf.select(resumed, key)
        if OmegaConf.is_config(now):
            now = OmegaConf.to_container(now, resolve=True)
        if OmegaConf.is_config(then):
            then = OmegaConf.to_container(then, resolve=True)
        if now != then and key == "trainer.epochs":
            raise UserError(f"{override} differs from the run being resumed (trainer.epochs was {then}): its "
                            f"learning-rate schedule spans {then} epochs and would jump; resume without "
                            f"trainer.epochs, or start a new run with the length you want")
        if now != then:
            raise UserError(f"{override} differs from the run being resumed ({key} was {then}); resume with "
                            f"only trainer.* overrides, or start a new run without resume=")
    resumed.resume = cfg.resume
    return resumed
