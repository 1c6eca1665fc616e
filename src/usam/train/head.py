"""The mask classifier: SAM mask-token embedding -> C+1 logits (index 0 is background)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from usam.core.config import ConfigError
from usam.formats.embedding_shards import TOKENS_PER_POINT

INPUT_VIEWS = ("own_first", "tokens", "mask_token")


def input_dim(view: str, embed_dim: int) -> int:
    """'own_first': the mask's own token, then the point's 4 tokens (1280-d, our default);
    'tokens': the 4 flattened tokens (the paper's words); 'mask_token': the own token alone."""
    token_dim = embed_dim // TOKENS_PER_POINT
    dims = {"own_first": embed_dim + token_dim, "tokens": embed_dim, "mask_token": token_dim}
    if view not in dims:
        raise ConfigError(f"model.input_view={view!r} is not one of {INPUT_VIEWS}")
    return dims[view]


def own_token(embeddings: torch.Tensor, multimask: torch.Tensor) -> torch.Tensor:
    """The mask's own token from embeddings (..., 4*T) and multimask indices (...): (..., T).

    Multimask output i of SAM comes from mask token i + 1 (token 0 is the single-mask
    output), so the mask's own token is slice ``multimask + 1`` of the 4 tokens.
    """
    tokens = embeddings.unflatten(-1, (TOKENS_PER_POINT, -1))
    index = (multimask.long() + 1)[..., None, None].expand(*tokens.shape[:-2], 1, tokens.shape[-1])
    return tokens.gather(-2, index).squeeze(-2)


def select_input_view(embeddings: torch.Tensor, multimask: torch.Tensor, view: str) -> torch.Tensor:
    """The head's input from stored embeddings (..., 4*T) and multimask indices (...).

    The up to 3 masks of one point share its 4 tokens, so under 'tokens' they get one
    input and one prediction; the other views give each mask its own.
    """
    embeddings = embeddings.float()
    if view == "tokens":
        return embeddings
    if view == "mask_token":
        return own_token(embeddings, multimask)
    if view == "own_first":
        return torch.cat([own_token(embeddings, multimask), embeddings], dim=-1)
    raise ConfigError(f"model.input_view={view!r} is not one of {INPUT_VIEWS}")


class MaskClassifierHead(nn.Module):
    """4 linear layers, as in the paper; the widths of the 3 hidden layers are configurable."""

    def __init__(
        self,
        in_dim: int,
        num_outputs: int,
        hidden_dims: Sequence[int] = (512, 256, 128),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if len(hidden_dims) != 3:
            raise ConfigError(
                f"model.head.hidden_dims={list(hidden_dims)} must list 3 widths "
                "(the head has 4 linear layers)"
            )
        layers: list[nn.Module] = []
        widths = [in_dim, *hidden_dims]
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(width_in, width_out), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        layers.append(nn.Linear(widths[-1], num_outputs))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)
