"""What a backend module declares about each SAM it offers; ``usam.sam.registry`` merges
the declarations of every backend module into one table.

A backend module (``sam1_backend``, ``sam2_backend``, ``hq_backend``) lists its models as
``SPECS``, a tuple of :class:`SamSpec`: how to build each, where its official weights
are, which engine makes its masks, and how to recognise a state dict of its family
(``read_encoder``), so that the registry itself knows no model family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from usam.sam.mask_engine import PointGridEngine

# (kind, width, depth) of an image encoder, e.g. ("ViT", 768, 12)
EncoderShape = tuple[str, int, int]
_RANDOM_LOGIT_SCALE = 100.0


@dataclass(frozen=True)
class SamSpec:
    """One buildable SAM. ``checkpoint_name`` is None for architectures with no official weights.

    ``encoder_kind``, ``encoder_width`` and ``encoder_depth`` are what ``read_encoder``
    reads off a state dict of this family (None for another family's), which is how a
    checkpoint given for the wrong model type is named. ``sha256`` is None where no
    checksum is published or agreed on: the download is then not verified, and the
    SHA-256 of the file loaded is what the shard manifest records. ``backend`` names
    the model family in shard manifests; ``engine`` makes its automatic masks;
    ``state_key`` is where a checkpoint file keeps the state dict (SAM 2's files hold it
    under ``model``); ``decoder_attribute`` names the mask decoder and
    ``mask_mlp_attributes`` its MLPs that make mask logits; ``require`` fails early,
    naming the install line, when the family's optional package is missing.
    """

    model_type: str
    build: Callable[[], torch.nn.Module]
    backend: str
    engine: type[PointGridEngine]
    read_encoder: Callable[[dict[str, Any]], EncoderShape | None]
    encoder_kind: str
    encoder_width: int
    encoder_depth: int
    checkpoint_name: str | None = None
    sha256: str | None = None
    url_base: str = ""
    state_key: str | None = None
    decoder_attribute: str = "mask_decoder"
    mask_mlp_attributes: tuple[str, ...] = ("output_hypernetworks_mlps",)
    require: Callable[[str], None] | None = None

    @property
    def encoder_shape(self) -> EncoderShape:
        return (self.encoder_kind, self.encoder_width, self.encoder_depth)

    @property
    def url(self) -> str | None:
        return None if self.checkpoint_name is None else self.url_base + self.checkpoint_name

    @property
    def random_weights(self) -> bool:
        """True when the architecture has no trained weights to load."""
        return self.checkpoint_name is None


def make_mask_like(model: torch.nn.Module, spec: SamSpec) -> None:
    """Make an untrained decoder's masks look like masks rather than noise.

    With default initialisation the decoder's 2x2 transposed convolutions print a 4x4
    checkerboard on every mask, so each spans the whole image and NMS keeps one; their
    kernels are made uniform, and the MLPs that make mask logits scaled up so that
    logits sit as far from 0 as a trained SAM's and stability scores spread over [0, 1].
    """
    decoder = getattr(model, spec.decoder_attribute)
    with torch.no_grad():
        for layer in decoder.modules():
            if isinstance(layer, torch.nn.ConvTranspose2d):
                uniform = layer.weight.mean(dim=(2, 3), keepdim=True)
                layer.weight.copy_(uniform.expand_as(layer.weight))
        for name in spec.mask_mlp_attributes:
            mlps = getattr(decoder, name)
            for mlp in mlps if isinstance(mlps, torch.nn.ModuleList) else [mlps]:
                mlp.layers[-1].weight.mul_(_RANDOM_LOGIT_SCALE)
