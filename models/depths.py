"""Features from every depth of a backbone, computed in the same pass as its embedding.

Lower layers hold general features (edges, textures; a sentence's words), higher ones
the pretraining task's. Beside its final embedding each exported graph gives `depths`:
one pooled vector per depth, each L2-normalised, concatenated (Head2Toe, Evci et al.
2022, trains a linear head on such features). The depths of an image network are its
stages as timm names them (`feature_info`), average-pooled; those of a text encoder are
its layers but the last (whose pooling is the embedding), each a masked mean over the
tokens. A declared ONNX model gives no stages: its embedding is its only depth.

Export-time code (imports torch). How wide each depth is travels with the graph, in its
metadata (`models.export.write_depth_widths`), so that whoever runs it can cut the rows
into depths without building the module.
"""

from __future__ import annotations

from typing import Any

import torch


def pooled_image_depths(stages: list[torch.Tensor]) -> torch.Tensor:
    """Stage outputs ([batch, channels, h, w] each) to one row of unit-length means."""
    return torch.cat([_unit(stage.mean(dim=(2, 3))) for stage in stages], dim=1)


def pooled_text_depths(layers: list[torch.Tensor], attention_mask: torch.Tensor) -> torch.Tensor:
    """Layer outputs ([batch, tokens, dim] each) to one row of unit-length masked means."""
    mask = attention_mask.unsqueeze(-1).to(layers[0].dtype)
    count = mask.sum(dim=1).clamp(min=1e-9)
    return torch.cat([_unit((layer * mask).sum(dim=1) / count) for layer in layers], dim=1)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=1)


class Outputs(torch.nn.Module):
    """A module whose `forward_with_depths` (its embedding or hidden states, and its
    depths) is what its export traces."""

    def __init__(self, module: Any) -> None:
        super().__init__()
        self.module = module
        # Traced in eval mode: an export restores the wrapper's mode to all it holds.
        self.eval()

    def forward(self, *inputs: torch.Tensor):
        return self.module.forward_with_depths(*inputs)
