import pytest
import torch
import torchvision

from experiment.models import deploy_checkpoint
from experiment.errors import UserError
from experiment.models import (build_model, check_input_fits, deploy_config, export_onnx, model_from_checkpoint,
                               onnx_logit_difference)
from nets import ACBlock, AlexNet, fuse_model

RESNET = {"name": "resnet18_ac", "source": "torchvision", "arch": "resnet18", "ac": True, "kernel_sizes": [3, 5],
          "gamma_init": 1 / 3}


@pytest.mark.parametrize("arch", ["os.system", "torchvision.models.resnet18", "get_model", "ResNet", "fasterrcnn_resnet50_fpn"])
def test_torchvision_arch_is_one_of_torchvisions_classification_builders(arch):
    with pytest.raises(UserError, match="not a torchvision classification builder"):
        build_model({**RESNET, "arch": arch}, 10)


@pytest.mark.parametrize("change, message", [({"ac": "yes"}, "model.ac"), ({"kernel_sizes": [4]}, "kernel_sizes")])
def test_bad_torchvision_options_are_user_errors(change, message):
    with pytest.raises(UserError, match=message):
        build_model({**RESNET, **change}, 10)


def test_deploy_config_rebuilds_the_fused_torchvision_model():
    torch.manual_seed(0)
    model = build_model(RESNET, 10)
    assert type(model) is torchvision.models.ResNet and any(isinstance(m, ACBlock) for m in model.modules())
    fused = fuse_model(model)
    ckpt = deploy_checkpoint({"config": {"model": RESNET}, "num_classes": 10}, fused, "best.pt")
    assert ckpt["config"]["model"]["name"] == "resnet18_ac_deploy" and ckpt["config"]["model"]["ac"] is False
    rebuilt = model_from_checkpoint(ckpt)
    assert type(rebuilt) is torchvision.models.ResNet
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), fused(x))


def test_deploy_config_of_alexnet_is_unchanged():
    fused = fuse_model(AlexNet(width=0.125, classifier_width=16))
    cfg = deploy_config({"name": "alexnet", "arch": "AlexNet"}, fused)
    assert cfg == {"name": "alexnet_deploy", "arch": "AlexNet", **{k: v for k, v in fused.options.kwargs().items()
                                                                  if k != "num_classes"}}


@pytest.mark.parametrize("layout, hint", [("imagenet", "imagenet layout needs at least 63 pixels"),
                                          ("cifar", "use larger images or another model")])
def test_input_too_small_says_what_to_do(layout, hint):
    model = AlexNet(layout=layout, width=0.125, classifier_width=16)
    with pytest.raises(UserError, match=hint):
        check_input_fits(model, torch.randn(1, 3, 1, 1) if layout == "cifar" else torch.randn(1, 3, 32, 32), "m")


def test_onnx_export_is_made_and_checked_in_memory():
    model = AlexNet(10, width=0.125, classifier_width=32, bn=False).eval()
    x = torch.randn(3, 3, 32, 32)
    exported = export_onnx(model, x[:2])
    assert isinstance(exported, bytes)  # fuse.py writes it only after this check (test_fuse: an earlier export stays)
    check = onnx_logit_difference(exported, model, x)  # a batch size other than the example's: dynamic batch
    assert check["num_samples"] == 3 and check["max_abs"] < 1e-4 and check["argmax_agree"] == 1.0
