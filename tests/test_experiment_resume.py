"""experiment/resume.py: a resumed run keeps its stored recipe; only harmless trainer options may change."""
import pytest
from omegaconf import OmegaConf

from experiment.errors import UserError
from experiment.resume import resumed_config

STORED = {"model": {"name": "alexnet_ac"}, "optimizer": {"lr": 0.1}, "resume": None,
          "trainer": {"epochs": 30, "device": "cuda", "save_every": 1}}


def command_line(**trainer):
    return OmegaConf.create({**STORED, "resume": "run/checkpoints/last.pt", "trainer": {**STORED["trainer"], **trainer}})


def test_trainer_options_other_than_the_length_apply_on_top():
    cfg = command_line(device="cpu", save_every=5)
    resumed = resumed_config(cfg, STORED, ["trainer.device=cpu", "trainer.save_every=5"])
    assert (resumed.trainer.device, resumed.trainer.save_every, resumed.trainer.epochs) == ("cpu", 5, 30)
    assert resumed.resume == "run/checkpoints/last.pt"


def test_another_length_is_refused_since_the_schedule_would_jump():
    with pytest.raises(UserError, match=r"trainer.epochs=40 differs from the run being resumed \(trainer.epochs was "
                                        r"30\): its learning-rate schedule spans 30 epochs and would jump"):
        resumed_config(command_line(epochs=40), STORED, ["trainer.epochs=40"])


def test_the_same_length_or_none_given_is_accepted():
    assert resumed_config(command_line(), STORED, ["trainer.epochs=30"]).trainer.epochs == 30
    assert resumed_config(command_line(), STORED, []).trainer.epochs == 30


def test_changing_the_recipe_is_refused():
    cfg = OmegaConf.merge(command_line(), {"optimizer": {"lr": 0.2}})
    with pytest.raises(UserError, match=r"optimizer.lr=0.2 differs from the run being resumed \(optimizer.lr was 0.1\)"):
        resumed_config(cfg, STORED, ["optimizer.lr=0.2"])
