"""Tests for experiment/figures.py: the kernel skeleton and its figure, the confusion matrix."""
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from experiment.figures import kernel_skeleton, kernel_skeleton_figure, save_confusion_matrix, save_kernel_skeleton
from test_experiment_report import assert_png


def cross_model():
    """conv "0": 3x3, zero except the centre cross (centre |w| = 2, arms |w| = 1, signs mixed).
    conv "2": 1x1 and conv "3": 3x1 are not square KxK with K > 1 and must be skipped.
    conv "4": 5x5 with |w| growing with the column index."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 1),
                          nn.Conv2d(3, 3, (3, 1)), nn.Conv2d(3, 4, 5, bias=False))
    with torch.no_grad():
        cross = torch.zeros(3, 2, 3, 3)
        cross[:, :, 1, 1] = -2.0
        cross[:, :, 0, 1] = cross[:, :, 2, 1] = 1.0
        cross[:, :, 1, 0] = -1.0
        cross[:, :, 1, 2] = 1.0
        model[0].weight.copy_(cross)
        columns = torch.arange(1.0, 6.0).expand(5, 5)
        model[4].weight.copy_(columns * torch.tensor([1.0, -1.0]).repeat(6).view(4, 3, 1, 1))
    return model


def test_kernel_skeleton_known_weights_and_model_untouched():
    model = cross_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    skeletons = kernel_skeleton(model)
    assert [name for name, _ in skeletons] == ["0", "4"]
    expected_cross = torch.tensor([[0.0, 0.5, 0.0], [0.5, 1.0, 0.5], [0.0, 0.5, 0.0]])
    torch.testing.assert_close(skeletons[0][1], expected_cross)
    torch.testing.assert_close(skeletons[1][1], torch.arange(1.0, 6.0).expand(5, 5) / 5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_kernel_skeleton_all_zero_layer_stays_zero():
    conv = nn.Conv2d(1, 1, 3)
    nn.init.zeros_(conv.weight)
    ((_, skeleton),) = kernel_skeleton(nn.Sequential(conv))
    assert torch.equal(skeleton, torch.zeros(3, 3))


def test_kernel_skeleton_figure_and_png(tmp_path):
    skeletons = {"alexnet": kernel_skeleton(cross_model()),
                 "alexnet_ac (fused)": kernel_skeleton(cross_model())[:1]}
    fig = kernel_skeleton_figure(skeletons)
    assert isinstance(fig, Figure)
    images = [ax for ax in fig.axes if ax.images]
    assert len(images) == 3
    assert all(ax.images[0].get_clim() == (0.0, 1.0) for ax in images)
    assert [ax.get_title() for ax in images] == ["0", "4", "0"]
    path = save_kernel_skeleton(skeletons, tmp_path / "skeleton.png")
    assert path == tmp_path / "skeleton.png"
    assert_png(path)


def test_kernel_skeleton_figure_goes_to_tensorboard(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with SummaryWriter(tmp_path) as writer:
        writer.add_figure("kernel_skeleton", kernel_skeleton_figure({"m": kernel_skeleton(cross_model())}))
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert events.Tags()["images"] == ["kernel_skeleton"]
    assert events.Images("kernel_skeleton")[0].width > 100


def test_kernel_skeleton_figure_needs_a_layer():
    with pytest.raises(ValueError, match="no kernel skeletons"):
        kernel_skeleton_figure({"linear": kernel_skeleton(nn.Linear(2, 2))})


def test_confusion_matrix_png(tmp_path):
    counts = torch.tensor([[50, 2, 0], [3, 40, 7], [0, 0, 0]])  # an empty row must not divide by zero
    path = save_confusion_matrix(counts, ["cat", "dog", "bird"], tmp_path / "cm" / "confusion.png")
    assert path == tmp_path / "cm" / "confusion.png"
    assert_png(path)


def test_confusion_matrix_shape_mismatch(tmp_path):
    with pytest.raises(ValueError, match=r"shape \(2, 2\), expected \(3, 3\)"):
        save_confusion_matrix([[1, 0], [0, 1]], ["a", "b", "c"], tmp_path / "cm.png")


def test_kernel_skeleton_figure_wraps_layers_for_a_tensorboard_card():
    layers = kernel_skeleton(cross_model()) * 3  # 6 layers
    wide = kernel_skeleton_figure({"m": layers})
    card = kernel_skeleton_figure({"m": layers}, layers_per_row=3)
    drawn = [ax for ax in card.axes if ax.images]
    assert [ax.get_title() for ax in drawn] == ["0", "4"] * 3
    assert len({round(ax.get_position().y0, 3) for ax in drawn}) == 2  # two rows of three
    width, height = card.get_size_inches()
    assert width < wide.get_size_inches()[0] / 1.5 and width / height < 2.5
    assert drawn[0].title.get_fontsize() > [ax for ax in wide.axes if ax.images][0].title.get_fontsize()


def test_kernel_skeleton_figure_of_a_deep_network_shows_an_even_spread_of_layers():
    layers = [(f"conv{i}", torch.rand(3, 3)) for i in range(40)]
    fig = kernel_skeleton_figure({"deep": layers}, max_layers=5)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["conv0", "conv10", "conv20", "conv29", "conv39"]
