"""Train AlexNet, AlexNetAC or a torchvision classifier: `python train.py model=alexnet_ac [overrides]`; see configs/train.yaml.

One run, one directory (Hydra's run dir): config.yaml, train.log, TensorBoard events, checkpoints/last.pt
and best.pt, metrics.json. Runs the same under `torchrun --nproc_per_node=N train.py ...`; the run itself is
`experiment.training.train`.
"""
from experiment.errors import interrupt_in_one_line

interrupt_in_one_line()  # before the slow imports below

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from experiment.errors import exit_on_user_error
from experiment.run_dir import check_run_dir_argument, register_resolvers
from experiment.training import train

register_resolvers()  # configs/train.yaml names the run directory and log file with them


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
@exit_on_user_error
def main(cfg):
    hydra_cfg = HydraConfig.get()
    # the command line's overrides as typed (a `${` in one is the run's to resolve, inside its checks)
    train(cfg, hydra_cfg.runtime.output_dir, OmegaConf.to_container(hydra_cfg.overrides.task))


if __name__ == "__main__":
    check_run_dir_argument(sys.argv[1:])
    main()
