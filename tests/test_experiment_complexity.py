from torch import nn

from experiment.complexity import count_macs, count_parameters, main


def test_count_macs_of_one_conv_matches_hand_formula():
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=0, groups=2)
    out_h, out_w = (15 - 3) // 2 + 1, (17 - 3) // 2 + 1
    assert count_macs(conv, (2, 4, 15, 17)) == 2 * 8 * out_h * out_w * (4 // 2) * 3 * 3
    assert count_macs(nn.Conv2d(3, 16, 3, padding=1), (1, 3, 32, 32)) == 16 * 32 * 32 * 3 * 9


def test_count_macs_of_linear_and_parameters():
    linear = nn.Linear(10, 5)
    assert count_macs(linear, (3, 10)) == 3 * 10 * 5
    assert count_parameters(linear) == 10 * 5 + 5


def test_count_macs_restores_each_module_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout())
    model.train()
    model[2].eval()
    count_macs(model, (2, 3, 8, 8))
    assert [m.training for m in model.modules()] == [True, True, True, False]
    assert model[1].num_batches_tracked.item() == 0  # ran in eval mode: BN statistics untouched


def test_main_prints_the_table(capsys):
    main(["--num-classes", "10"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| Model | Layout | Input | Parameters | MACs |"
    assert len(lines) == 2 + 9
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    # torchvision's AlexNet with a 10-class head: 57,044,810 parameters, ~710 M MACs at 224 px.
    deploy_imagenet = rows[8]
    assert deploy_imagenet[:3] == ["deploy: AlexNet (bn=False)", "imagenet", "224x224"]
    assert deploy_imagenet[3] == "57,044,810"
    assert deploy_imagenet[4] == "710.1 M"
