"""Parameter and multiply-accumulate counts; `python -m experiment.complexity` prints the README table."""

import argparse

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nets import AlexNet, AlexNetAC


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size=(1, 3, 32, 32)) -> int:
    """Multiply-accumulates of one eval-mode forward pass (FLOPs / 2, as torch's FlopCounterMode counts them).

    Counts convolutions and matrix products; BN, ReLU, pooling and bias additions are not counted.
    """
    weight = next(model.parameters(), None)
    factory = {} if weight is None else dict(device=weight.device, dtype=weight.dtype)
    x = torch.zeros(input_size, **factory)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for m, training in modes.items():
            m.training = training
    return counter.get_total_flops() // 2


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-classes", type=int, default=10)
    args = parser.parse_args(argv)
    variants = [
        ("AlexNet (BN)", lambda layout: AlexNet(args.num_classes, layout=layout)),
        ("AlexNetAC", lambda layout: AlexNetAC(args.num_classes, layout=layout)),
        ("deploy: AlexNet (bn=False)", lambda layout: AlexNet(args.num_classes, layout=layout, bn=False)),
    ]
    print("| Model | Layout | Input | Parameters | MACs |")
    print("|---|---|---|---:|---:|")
    for layout, pixels in (("cifar", 32), ("cifar", 224), ("imagenet", 224)):
        for name, build in variants:
            # Meta tensors carry shapes only: the counts are exact and the 224-px passes cost no compute.
            with torch.device("meta"):
                model = build(layout)
            params = count_parameters(model)
            macs = count_macs(model, (1, 3, pixels, pixels))
            print(f"| {name} | {layout} | {pixels}x{pixels} | {params:,} | {macs / 1e6:,.1f} M |")


if __name__ == "__main__":
    main()
