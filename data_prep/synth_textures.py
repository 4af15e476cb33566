"""Background textures of the synthetic remote-sensing scenes, drawn with numpy.

Each scene class has one texture function ``(rng, image_size) -> (image, masks)``: ``image`` is a (S, S, 3) float
array in 0-255 (before imaging conditions), ``masks`` maps region names ("water", "land", "road", "paved") to
(S, S) bool masks that say where objects of a kind may stand (see ``SceneClass.regions`` in ``synth_world``).
Textures are defined in fractions of the image side, so any image size works; the few pixel-sized details
(roads, piers, crop rows) were tuned at REFERENCE_SIZE and scale with the image.

Smooth noise is written here (a few lines of value noise): numpy has none, and PIL's ``effect_noise`` is white
noise from PIL's own unseeded generator, which would break the byte-identical-by-seed guarantee.
"""

from __future__ import annotations

import math

import numpy as np

REFERENCE_SIZE = 56  # image side at which the pixel-sized details (roads, piers, stripes) were tuned

Texture = tuple[np.ndarray, dict[str, np.ndarray]]  # (S, S, 3) float image, region name -> (S, S) bool mask


def value_noise(rng: np.random.Generator, image_size: int, cells: int) -> np.ndarray:
    """Smooth noise (S, S) in [0, 1]: random values on a (cells+1)^2 lattice, smoothstep-interpolated."""
    lattice = rng.random((cells + 1, cells + 1))  # (C+1, C+1)
    position = (np.arange(image_size) + 0.5) * cells / image_size  # (S,)
    index = np.minimum(position.astype(int), cells - 1)  # (S,)
    fraction = position - index
    fraction = fraction * fraction * (3 - 2 * fraction)  # smoothstep: no visible lattice creases
    upper_rows, lower_rows = lattice[index], lattice[index + 1]  # (S, C+1) each
    top = upper_rows[:, index] * (1 - fraction)[None, :] + upper_rows[:, index + 1] * fraction[None, :]  # (S, S)
    bottom = lower_rows[:, index] * (1 - fraction)[None, :] + lower_rows[:, index + 1] * fraction[None, :]  # (S, S)
    return top * (1 - fraction)[:, None] + bottom * fraction[:, None]  # (S, S)


def fractal_noise(rng: np.random.Generator, image_size: int, cells: int, octaves: int = 3) -> np.ndarray:
    """Sum of value-noise octaves (S, S), normalised to [0, 1]."""
    total = sum(0.5 ** octave * value_noise(rng, image_size, cells * 2 ** octave) for octave in range(octaves))
    return (total - total.min()) / max(total.max() - total.min(), 1e-9)


def _jittered(rng: np.random.Generator, colour: tuple[int, int, int], spread: float = 12.0) -> np.ndarray:
    return np.asarray(colour, dtype=float) + rng.normal(0.0, spread, 3)  # (3,)


def _coordinates(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (S, S) as fractions of the image side: (x, y)."""
    fractions = (np.arange(image_size) + 0.5) / image_size
    return np.meshgrid(fractions, fractions)


def _forest(rng: np.random.Generator, image_size: int) -> Texture:
    canopy = fractal_noise(rng, image_size, 9)  # (S, S)
    image = _jittered(rng, (34, 78, 38)) * (0.65 + 0.7 * canopy)[..., None]  # (S, S, 3)
    clearing = value_noise(rng, image_size, 3) > rng.uniform(0.72, 0.9)
    image[clearing] = _jittered(rng, (115, 125, 70))
    return image, {}


def _meadow(rng: np.random.Generator, image_size: int) -> Texture:
    patches = value_noise(rng, image_size, 3)[..., None]  # (S, S, 1)
    image = _jittered(rng, (110, 150, 70)) * (1 - patches) + _jittered(rng, (150, 160, 85)) * patches
    trees = fractal_noise(rng, image_size, 11) > rng.uniform(0.8, 0.95)
    image[trees] = _jittered(rng, (40, 85, 40))
    return image, {}


def _farmland(rng: np.random.Generator, image_size: int) -> Texture:
    palette = [(95, 140, 60), (150, 160, 70), (140, 110, 70), (185, 165, 110), (80, 120, 50)]
    x, y = _coordinates(image_size)
    column_cuts = np.sort(rng.uniform(0.15, 0.85, rng.integers(1, 4)))
    row_cuts = np.sort(rng.uniform(0.15, 0.85, rng.integers(1, 4)))
    field_column, field_row = np.searchsorted(column_cuts, x), np.searchsorted(row_cuts, y)  # (S, S) each
    image = np.zeros((image_size, image_size, 3))
    for row in range(len(row_cuts) + 1):
        for column in range(len(column_cuts) + 1):
            in_field = (field_row == row) & (field_column == column)
            direction = rng.choice([0.0, math.pi / 2, rng.uniform(0, math.pi)])
            period_px = rng.uniform(2.5, 5.0) * image_size / REFERENCE_SIZE
            phase = (x * math.cos(direction) + y * math.sin(direction)) * image_size / period_px
            stripes = 0.85 + 0.15 * (np.sin(2 * math.pi * phase) > 0)  # (S, S)
            colour = _jittered(rng, palette[rng.integers(len(palette))])
            image[in_field] = colour * stripes[in_field][:, None]
    track_half_width = 0.8 / REFERENCE_SIZE  # dirt tracks between fields
    boundary = (np.abs(x[..., None] - column_cuts).min(-1) < track_half_width) | \
               (np.abs(y[..., None] - row_cuts).min(-1) < track_half_width)
    image[boundary] = _jittered(rng, (160, 140, 100))
    return image, {}


def _desert(rng: np.random.Generator, image_size: int) -> Texture:
    x, y = _coordinates(image_size)
    direction = rng.uniform(0, math.pi)
    frequency = rng.uniform(3, 7)
    warp = 3 * value_noise(rng, image_size, 3)
    dunes = np.sin(2 * math.pi * frequency * (x * math.cos(direction) + y * math.sin(direction)) + warp)
    grain = fractal_noise(rng, image_size, 14)
    image = _jittered(rng, (205, 175, 125)) * (0.9 + 0.1 * dunes + 0.08 * grain)[..., None]
    return image, {}


def _water(rng: np.random.Generator, image_size: int) -> np.ndarray:
    depth = value_noise(rng, image_size, 4)[..., None]  # (S, S, 1)
    return _jittered(rng, (35, 65, 100), 8.0) * (0.85 + 0.25 * depth)  # (S, S, 3)


def _lake(rng: np.random.Generator, image_size: int) -> Texture:
    x, y = _coordinates(image_size)
    centre_x, centre_y = rng.uniform(0.3, 0.7, 2)
    radial = 1 - np.hypot(x - centre_x, y - centre_y) / 0.7
    height = 0.8 * radial + 0.6 * value_noise(rng, image_size, 2)  # (S, S)
    coverage = rng.uniform(0.4, 0.85)
    water = height > np.quantile(height, 1 - coverage)
    shore_colour = (70, 105, 55) if rng.random() < 0.7 else (125, 120, 105)  # some lakes sit in towns
    shore_texture = fractal_noise(rng, image_size, 7)[..., None]
    image = _jittered(rng, shore_colour) * (0.75 + 0.5 * shore_texture)
    rim = (height > np.quantile(height, 1 - coverage - 0.06)) & ~water
    image[rim] = _jittered(rng, (190, 170, 120))
    image[water] = _water(rng, image_size)[water]
    return image, {"water": water}


def _harbour(rng: np.random.Generator, image_size: int) -> Texture:
    x, y = _coordinates(image_size)
    direction = rng.uniform(0, 2 * math.pi)
    across = (x - 0.5) * math.cos(direction) + (y - 0.5) * math.sin(direction)  # signed distance to the coast
    along = -(x - 0.5) * math.sin(direction) + (y - 0.5) * math.cos(direction)
    coast_offset = rng.uniform(-0.25, 0.15) + 0.04 * value_noise(rng, image_size, 3)
    water = across > coast_offset
    land_texture = fractal_noise(rng, image_size, 9)[..., None]
    image = _jittered(rng, (125, 125, 120)) * (0.8 + 0.4 * land_texture)
    image[water] = _water(rng, image_size)[water]
    piers = np.zeros_like(water)
    for pier_position in rng.uniform(-0.4, 0.4, rng.integers(0, 5)):
        pier_length, pier_half_width = rng.uniform(0.12, 0.3), rng.uniform(0.8, 1.6) / REFERENCE_SIZE
        piers |= water & (np.abs(along - pier_position) < pier_half_width) & (across < coast_offset + pier_length)
    image[piers] = _jittered(rng, (170, 170, 165))
    return image, {"water": water & ~piers, "land": ~water}


def _residential(rng: np.random.Generator, image_size: int, house_probability: float,
                 ground_colour: tuple[int, int, int], tree_threshold: float) -> Texture:
    """Road grid + lattice of house roofs; density and ground colour make it dense or sparse."""
    pixel_x, pixel_y = np.meshgrid(np.arange(image_size), np.arange(image_size))
    px_scale = image_size / REFERENCE_SIZE  # fine structure keeps its proportions at any image size
    block_px = rng.uniform(image_size / 5, image_size / 3)
    road_width_px = rng.uniform(1.2, 2.2) * px_scale
    offset_x, offset_y = rng.uniform(0, block_px, 2)
    road = ((pixel_x + offset_x) % block_px < road_width_px) | ((pixel_y + offset_y) % block_px < road_width_px)
    ground_texture = fractal_noise(rng, image_size, 9)[..., None]
    image = _jittered(rng, ground_colour) * (0.8 + 0.4 * ground_texture)
    cell_px = rng.uniform(3.0, 5.0) * px_scale
    cells_per_side = int(image_size / cell_px) + 2
    roof_palette = np.array([(150, 80, 70), (110, 110, 115), (180, 170, 150), (120, 95, 80)], dtype=float)
    roof_index = rng.integers(len(roof_palette), size=(cells_per_side, cells_per_side))
    has_house = rng.random((cells_per_side, cells_per_side)) < house_probability
    cell_x, cell_y = (pixel_x / cell_px).astype(int), (pixel_y / cell_px).astype(int)  # (S, S) each
    gap_px = 0.8 * px_scale  # bare ground between neighbouring houses
    inside_cell = ((pixel_x % cell_px) >= gap_px) & ((pixel_y % cell_px) >= gap_px)
    houses = has_house[cell_y, cell_x] & inside_cell & ~road
    roof_noise = rng.normal(0.0, 8.0, (image_size, image_size, 1))
    image[houses] = (roof_palette[roof_index[cell_y, cell_x]] + roof_noise)[houses]
    trees = (fractal_noise(rng, image_size, 11) > tree_threshold) & ~road & ~houses
    image[trees] = _jittered(rng, (40, 85, 40))
    image[road] = _jittered(rng, (85, 85, 90), 6.0)
    return image, {"road": road}


def _dense_residential(rng: np.random.Generator, image_size: int) -> Texture:
    return _residential(rng, image_size, rng.uniform(0.5, 0.95), (125, 130, 110), rng.uniform(0.85, 1.0))


def _sparse_residential(rng: np.random.Generator, image_size: int) -> Texture:
    return _residential(rng, image_size, rng.uniform(0.2, 0.6), (95, 135, 65), rng.uniform(0.7, 0.9))


def _industrial(rng: np.random.Generator, image_size: int) -> Texture:
    x, y = _coordinates(image_size)
    concrete_texture = fractal_noise(rng, image_size, 9)[..., None]
    image = _jittered(rng, (150, 150, 145)) * (0.85 + 0.3 * concrete_texture)
    roof_palette = [(170, 175, 180), (120, 130, 140), (190, 190, 185), (100, 115, 130)]
    for _ in range(rng.integers(2, 6)):
        left, top = rng.uniform(0.0, 0.8, 2)
        width, height = rng.uniform(0.12, 0.35, 2)
        warehouse = (x >= left) & (x < left + width) & (y >= top) & (y < top + height)
        image[warehouse] = _jittered(rng, roof_palette[rng.integers(len(roof_palette))], 6.0)
    return image, {}


def _airport(rng: np.random.Generator, image_size: int) -> Texture:
    x, y = _coordinates(image_size)
    grass = (120, 140, 80) if rng.random() < 0.6 else (170, 160, 120)
    image = _jittered(rng, grass) * (0.85 + 0.3 * fractal_noise(rng, image_size, 4))[..., None]
    direction = rng.uniform(0, math.pi)
    centre_x, centre_y = rng.uniform(0.3, 0.7, 2)
    across = (x - centre_x) * math.sin(direction) - (y - centre_y) * math.cos(direction)
    along = (x - centre_x) * math.cos(direction) + (y - centre_y) * math.sin(direction)
    runway_half_width = rng.uniform(0.045, 0.07)
    runway = np.abs(across) < runway_half_width
    apron_left, apron_top = rng.uniform(0.0, 0.45, 2)
    apron_width, apron_height = rng.uniform(0.45, 0.6, 2)
    apron = (x >= apron_left) & (x < apron_left + apron_width) & (y >= apron_top) & (y < apron_top + apron_height)
    image[apron] = _jittered(rng, (150, 150, 150), 6.0)
    image[runway] = _jittered(rng, (70, 70, 75), 5.0)
    dashes = np.sin(along * 60) > 0.3  # a dash about every 1/10 of the image side
    centre_line = runway & (np.abs(across) < 0.25 * runway_half_width) & dashes
    image[centre_line] = np.array([225.0, 225.0, 225.0])
    return image, {"paved": apron | runway}


TEXTURES = {
    "forest": _forest, "meadow": _meadow, "farmland": _farmland, "desert": _desert, "lake": _lake,
    "harbour": _harbour, "dense residential": _dense_residential, "sparse residential": _sparse_residential,
    "industrial area": _industrial, "airport": _airport,
}


def imaging_conditions(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Per-image illumination, colour cast, haze and sensor noise; returns (S, S, 3) uint8."""
    image = image * rng.uniform(0.85, 1.15) + rng.normal(0.0, 8.0, 3)
    if rng.random() < 0.3:
        haze = rng.uniform(0.05, 0.3)
        image = image * (1 - haze) + 200.0 * haze
    image = image + rng.normal(0.0, rng.uniform(2.0, 7.0), image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
