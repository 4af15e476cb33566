"""GeoChat's position-table interpolation against an independent numpy bicubic, and image-token counts."""

import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from kd_pipeline.config import ModelConfig
from kd_pipeline.models import (build_model, interpolate_position_table, meta_model, num_image_tokens,
                                position_table, projector_features, resize_vision_tower)


def cubic_weights(out_size: int, in_size: int, a: float = -0.75) -> np.ndarray:
    """(out, in) matrix of Keys' cubic convolution with align_corners=True and edge-clamped taps (PyTorch's rule)."""

    def kernel(distance: float) -> float:
        d = abs(distance)
        if d <= 1:
            return (a + 2) * d**3 - (a + 3) * d**2 + 1
        if d < 2:
            return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
        return 0.0

    weights = np.zeros((out_size, in_size))
    scale = (in_size - 1) / (out_size - 1)
    for out_index in range(out_size):
        source = out_index * scale
        base = int(np.floor(source))
        for tap in range(base - 1, base + 3):
            weights[out_index, min(max(tap, 0), in_size - 1)] += kernel(source - tap)
    return weights


def reference_table(table: np.ndarray, new_grid: int) -> np.ndarray:
    """CLS row kept; grid[i, j] = row 1 + i*g + j, resized separably; written back in the same row-major order."""
    old_grid = int(round((table.shape[0] - 1) ** 0.5))
    grid = np.zeros((old_grid, old_grid, table.shape[1]))
    for i in range(old_grid):
        for j in range(old_grid):
            grid[i, j] = table[1 + i * old_grid + j]
    weights = cubic_weights(new_grid, old_grid)
    resized = np.einsum("Ia,Jb,abd->IJd", weights, weights, grid)
    out = np.zeros((1 + new_grid * new_grid, table.shape[1]))
    out[0] = table[0]
    for i in range(new_grid):
        for j in range(new_grid):
            out[1 + i * new_grid + j] = resized[i, j]
    return out


def test_577_to_1297_rows_match_numpy_bicubic_align_corners():
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(577, 8, generator=generator)
    result = interpolate_position_table(table, 36)
    expected = reference_table(table.double().numpy(), 36)
    assert result.shape == (1297, 8)
    assert torch.equal(result[0], table[0])
    np.testing.assert_allclose(result.double().numpy(), expected, atol=2e-5, rtol=0)
    # align_corners=True keeps the four corner rows exactly (align_corners=False would not).
    for old_row, new_row in ((1, 1), (24, 36), (553, 1261), (576, 1296)):
        torch.testing.assert_close(result[new_row], table[old_row], atol=1e-5, rtol=0)


def test_fp16_table_is_interpolated_in_float32_and_returned_in_fp16():
    table = torch.randn(17, 4).half()
    result = interpolate_position_table(table, 6)
    assert result.dtype == torch.float16
    np.testing.assert_allclose(result.double().numpy(), reference_table(table.double().numpy(), 6), atol=2e-3)


def test_non_square_table_is_rejected():
    with pytest.raises(ValueError, match="not CLS \\+ a square grid"):
        interpolate_position_table(torch.zeros(20, 4), 6)


def test_resize_tower_recreates_a_frozen_table_and_runs_at_the_new_size():
    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              patch_size=14, image_size=56)
    tower = CLIPVisionModel(config).eval()
    original = position_table(tower).detach().clone()
    assert resize_vision_tower(tower, 84)
    table = position_table(tower)
    assert table.shape == (37, 16) and not table.requires_grad
    np.testing.assert_allclose(table.detach().double().numpy(), reference_table(original.double().numpy(), 6),
                               atol=2e-5)
    with torch.no_grad():
        hidden = tower(torch.randn(1, 3, 84, 84), output_hidden_states=True).hidden_states[-2]
    assert hidden.shape == (1, 37, 16)
    assert not resize_vision_tower(tower, 84)


def test_1296_image_tokens_from_a_small_tower_at_504_px():
    model_cfg = ModelConfig(image_size=504, vision_hidden_size=16, vision_heads=2, vision_layers=2,
                            hidden_size=32, num_heads=2, intermediate_size=64, num_layers=1)
    model = build_model(model_cfg, vocab_size=50, image_token_id=49).eval()
    with torch.no_grad():
        features = projector_features(model, torch.randn(1, 3, 504, 504))
    assert num_image_tokens(model_cfg) == 1296
    assert features.shape == (1, 1296, 32)


def test_full_size_meta_model_has_1297_positions_and_1296_image_tokens():
    model = meta_model("geochat-7b")
    assert position_table(model.model.vision_tower).shape == (1297, 1024)
    assert model.config.image_seq_length == 1296
    features = projector_features(model, torch.empty(1, 3, 504, 504, device="meta"))
    assert features.shape == (1, 1296, 4096)
