"""The CLIP vision tower at GeoChat's resolution: position-table interpolation and image-token counts.

GeoChat runs CLIP ViT-L/14 (trained at 336 px, a 24x24 patch grid plus CLS = 577 positions) at 504 px (36x36 + CLS
= 1297 positions). Its ``clip_interpolate_embeddings`` keeps the CLS row, resizes the 24x24 grid of rows to 36x36
with **bicubic, align_corners=True**, and puts the CLS row back in front. transformers' own
``interpolate_pos_encoding`` uses align_corners=False and gives different numbers, so it is not used here.

Row order: position ``1 + i * grid + j`` belongs to patch row ``i`` (top to bottom), column ``j`` (left to right),
which is the order of ``patch_embedding(pixels).flatten(2)`` in CLIP.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from kd_pipeline.config import ModelConfig

log = logging.getLogger(__name__)


def num_image_tokens(model_cfg: ModelConfig) -> int:
    """Image features per image after the CLS row is dropped: ``(image_size // patch_size) ** 2`` (1296 at 504 px)."""
    return (model_cfg.image_size // model_cfg.patch_size) ** 2


def grid_side(num_positions: int) -> int:
    """Patch-grid side of a position table with ``num_positions`` rows (CLS included); rejects non-square grids."""
    side = math.isqrt(num_positions - 1)
    if side * side != num_positions - 1:
        raise ValueError(f"a CLIP position table of {num_positions} rows is not CLS + a square grid of patches")
    return side


def interpolate_position_table(table: torch.Tensor, new_grid: int) -> torch.Tensor:
    """GeoChat's interpolation of a CLIP position table to a ``new_grid`` x ``new_grid`` patch grid.

    ``table`` is (1 + g*g, D); the result is (1 + new_grid*new_grid, D) in ``table``'s dtype. The maths runs in
    float32 (GeoChat interpolates the fp32 CLIP weights before casting the model to fp16).
    """
    old_grid = grid_side(table.shape[0])
    if old_grid == new_grid:
        return table.clone()
    hidden = table.shape[1]
    cls_row = table[:1].float()  # (1, D)
    patch_rows = table[1:].float()  # (g*g, D)
    grid = patch_rows.t().reshape(1, hidden, old_grid, old_grid)  # (1, D, g, g)
    resized = nn.functional.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=True)
    new_patch_rows = resized.reshape(hidden, new_grid * new_grid).t()  # (G*G, D)
    return torch.cat([cls_row, new_patch_rows], dim=0).to(table.dtype)  # (1 + G*G, D)


def _vision_embeddings(vision_tower: nn.Module) -> nn.Module:
    """The module holding ``position_embedding`` and ``patch_embedding`` (CLIPVisionEmbeddings)."""
    for module in vision_tower.modules():
        if isinstance(getattr(module, "position_embedding", None), nn.Embedding) and hasattr(module, "patch_embedding"):
            return module
    raise TypeError(f"{type(vision_tower).__name__} has no CLIP-style embeddings with a position_embedding table")


def position_table(vision_tower: nn.Module) -> nn.Parameter:
    """The tower's position table parameter, (1 + grid*grid, D)."""
    return _vision_embeddings(vision_tower).position_embedding.weight


def resize_vision_tower(vision_tower: nn.Module, image_size: int) -> bool:
    """Re-create the tower's position table for ``image_size`` pixels as GeoChat does, in place and frozen.

    Updates what CLIP's forward reads (the embeddings' ``image_size``, ``num_patches``, ``num_positions``,
    ``position_ids``) and the tower config's ``image_size``. Returns False when the tower is already at that size.
    """
    embeddings = _vision_embeddings(vision_tower)
    patch_size = embeddings.patch_size
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of the tower's patch size {patch_size}")
    old_table = embeddings.position_embedding.weight
    new_grid = image_size // patch_size
    if old_table.shape[0] == new_grid * new_grid + 1:
        return False
    new_table = interpolate_position_table(old_table.detach(), new_grid)  # (1 + G*G, D)
    replacement = nn.Embedding(new_table.shape[0], new_table.shape[1], device=new_table.device, dtype=new_table.dtype)
    replacement.weight = nn.Parameter(new_table, requires_grad=False)
    embeddings.position_embedding = replacement
    embeddings.image_size = image_size
    embeddings.num_patches = new_grid * new_grid
    embeddings.num_positions = new_grid * new_grid + 1
    # A non-persistent buffer, as CLIP registers it: it is rebuilt from the config, never read from a checkpoint.
    embeddings.register_buffer("position_ids", torch.arange(embeddings.num_positions, device=new_table.device)
                               .expand((1, -1)), persistent=False)
    vision_tower.config.image_size = image_size
    log.info("vision tower position table interpolated %d -> %d rows (bicubic, align_corners=True) for %d px",
             old_table.shape[0], new_table.shape[0], image_size)
    return True
