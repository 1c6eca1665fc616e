"""Where the Python API runs: ``device="auto"`` by default (CUDA when torch sees a GPU, else
the CPU, through ``usam.core.devices.resolve_device``), so the README's example runs SAM on
the GPU of a GPU machine; a GPU that is not there is refused by name."""

from __future__ import annotations

import inspect

import pytest
import torch

from usam.core.config import ConfigError
from usam.inference.annotator import Annotator
from usam.inference.predictor import Predictor, load_head

from helpers.evaluation import head_checkpoint

NO_GPU = "device=cuda asks for CUDA, but torch sees no GPU here; use auto or cpu"
HAS_GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return head_checkpoint(tmp_path_factory.mktemp("head") / "head.ckpt")


@pytest.mark.parametrize(
    "function", [Predictor.__init__, Predictor.from_checkpoint, Annotator.from_checkpoint]
)
def test_every_python_entry_defaults_to_auto(function):
    assert inspect.signature(function).parameters["device"].default == "auto"


@pytest.mark.skipif(HAS_GPU, reason="the GPU machine's case is the test below")
def test_auto_puts_the_head_on_the_cpu_without_a_gpu(ckpt):
    predictor = Predictor.from_checkpoint(ckpt)
    assert predictor.device == torch.device("cpu")
    assert next(predictor.head.parameters()).device == torch.device("cpu")


@pytest.mark.skipif(HAS_GPU, reason="a real GPU takes the head; the test below checks that")
def test_auto_asks_for_cuda_when_torch_sees_a_gpu(ckpt, monkeypatch):
    """torch told there is a GPU on a machine without one: moving the head there is what
    fails, so the default did ask for CUDA (a default of cpu would not)."""
    head = load_head(ckpt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises((RuntimeError, AssertionError), match="(?i)nvidia|cuda"):
        Predictor(head)
    assert next(head.head.parameters()).device == torch.device("cpu")


@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
def test_auto_runs_the_head_and_sam_on_the_gpu(ckpt):
    annotator = Annotator.from_checkpoint(ckpt)
    assert annotator.predictor.device.type == "cuda"
    assert annotator.engine.device.type == "cuda"
    prediction = annotator(torch.zeros(64, 64, 3, dtype=torch.uint8).numpy())
    assert prediction.height == 64 and prediction.width == 64


@pytest.mark.parametrize("device", ["cuda", torch.device("cuda")])
def test_a_gpu_that_is_not_there_is_refused_by_name(ckpt, monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as raised:
        Annotator.from_checkpoint(ckpt, device=device)
    assert str(raised.value) == NO_GPU


def test_the_cpu_stays_the_cpu_when_asked_for(ckpt, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    annotator = Annotator.from_checkpoint(ckpt, device="cpu")
    assert annotator.predictor.device == torch.device("cpu")
    assert annotator.engine.device == torch.device("cpu")
