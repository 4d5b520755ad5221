"""experiment/errors.py: what an entry point's user sees when something goes wrong."""
import pytest
import torch
from omegaconf import OmegaConf

from experiment.errors import UserError, exit_on_user_error


def run(fn):
    """Call `fn` wrapped like an entry point; return the exit status (None when it returned)."""
    try:
        exit_on_user_error(fn)()
    except SystemExit as e:
        return e.code
    return None


def test_normal_return_passes_through():
    assert exit_on_user_error(lambda: 42)() == 42


def test_user_error_is_one_line_and_exit_2(capsys):
    def main():
        raise UserError("dataset root /x does not exist; set dataset.root")

    assert run(main) == 2
    out, err = capsys.readouterr()
    assert err == "error: dataset root /x does not exist; set dataset.root\n" and out == ""


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 71880000000000 bytes."),
    MemoryError(),
])
def test_host_out_of_memory_is_one_line(capsys, error):
    def main():
        raise error

    assert run(main) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the machine ran out of memory (") and "dataset.image_size" in err
    assert len(err.strip().splitlines()) == 1


def test_any_other_runtime_error_is_not_taken_for_one():
    def main():
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run(main)


def test_gpu_out_of_memory_suggests_a_smaller_batch(capsys):
    def main():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)\n"
                                          "If reserved but unallocated memory is large try setting ...")

    assert run(main) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the GPU ran out of memory (CUDA out of memory. Tried to allocate 20.00 GiB")
    assert "smaller dataset.batch_size" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_out_of_memory_without_a_message(capsys):
    def main():
        raise torch.cuda.OutOfMemoryError()

    assert run(main) == 2
    assert "smaller dataset.batch_size" in capsys.readouterr().err


def test_required_config_value_left_out(capsys):
    cfg = OmegaConf.create({"dataset": {"root": "???"}})

    def main():
        return cfg.dataset.root

    assert run(main) == 2
    assert capsys.readouterr().err == "error: dataset.root is required; pass dataset.root=... on the command line\n"


def test_ctrl_c_outside_the_training_loop(capsys):
    def main():
        raise KeyboardInterrupt

    assert run(main) == 130
    assert capsys.readouterr().err == "error: interrupted\n"


def test_programming_errors_are_not_hidden():
    def main():
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        exit_on_user_error(main)()
