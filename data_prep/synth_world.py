"""The synthetic remote-sensing world: scene classes, objects, and their rendering with numpy + PIL.

A scene is a square RGB image of one scene class (forest, harbour, ...) whose background texture is drawn with numpy
(value noise, stripes, road grids, runways, water with piers) and whose objects (planes, ships, vehicles, storage
tanks, buildings) are flat-coloured rotated shapes drawn with PIL ``ImageDraw`` polygons.

Geometry lives on GeoChat's 0-100 grid: an object is the integer box ``x1 y1 x2 y2`` (its size before rotation,
centred on the object) plus an integer angle ``theta`` in [-90, 90] degrees, written as ``{<x1><y1><x2><y2>|<theta>}``.
Rotation convention (GeoChat's own drawing helper and the evaluation scorer, kd_pipeline/eval/boxes.py): theta
rotates the box about its centre, positive = CLOCKWISE as seen on the image, whose y axis points DOWN on screen. So in
image coordinates (x right, y down) a box point at offset (dx, dy) from the centre goes to
(dx cos t - dy sin t, dx sin t + dy cos t); at theta = +90 the point right of the centre moves straight down. The box's x1..x2 extent is the object's length axis (ship bow, plane
nose point towards +x before rotation).

Objects are drawn from their grid boxes (not the other way round), so the box text describes the drawn shape
exactly. They are drawn on a 4x supersampled canvas and box-averaged down: interior pixels keep the exact object
colour, edges are anti-aliased. Objects never overlap (their circumscribed circles are kept apart), so the pixel at
an object's centre shows that object's colour whenever the object is at least about 3 pixels wide.

Classes differ by texture and colour statistics, with per-image jitter (illumination, colour cast, haze, noise) and
two deliberately confusable pairs (dense vs sparse residential share the road grid and house lattice with
overlapping densities; lake vs harbour share the water colours, and harbours may have no piers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from data_prep.synth_textures import TEXTURES, imaging_conditions

GRID = 100  # box coordinates live on a 0-GRID grid of the image width/height
SUPERSAMPLE = 4  # objects are drawn at this factor and box-averaged down (anti-aliased edges, exact interiors)

COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 235),
    "grey": (150, 150, 155),
    "red": (205, 40, 40),
    "blue": (40, 80, 200),
    "black": (25, 25, 30),
    "yellow": (235, 200, 40),
    "orange": (240, 120, 30),
}

# Box area (grid units squared, before rotation) thresholds of the size groups used by the referring benchmark
# and by the size words of the captions ("a small red vehicle").
SIZE_GROUP_LIMITS = {"small": 100, "medium": 250}


@dataclass(frozen=True)
class ObjectKind:
    """One kind of object: its names, its size ranges on the grid and how it is drawn and oriented."""

    name: str
    plural: str
    length: tuple[int, int]  # box extent along the object's own axis (x1..x2 before rotation), grid units
    width_ratio: tuple[float, float]  # box extent across the axis, as a fraction of the length
    colours: tuple[str, ...]
    shape: str  # "rect", "ship", "plane" or "disc"
    rotates: bool  # False: theta is always 0 (storage tanks are discs)
    verb: str  # used in captions: "a large red ship moored in a harbour"


OBJECT_KINDS: dict[str, ObjectKind] = {
    kind.name: kind
    for kind in (
        ObjectKind("plane", "planes", (16, 28), (0.85, 1.1), ("white", "grey", "red"), "plane", True, "parked"),
        ObjectKind("ship", "ships", (10, 28), (0.3, 0.42), ("white", "red", "black", "orange"), "ship", True, "moored"),
        ObjectKind("vehicle", "vehicles", (6, 10), (0.45, 0.6), ("white", "red", "blue", "black", "yellow"), "rect",
                   True, "parked"),
        ObjectKind("storage tank", "storage tanks", (6, 16), (1.0, 1.0), ("white", "grey", "orange"), "disc", False,
                   "standing"),
        ObjectKind("building", "buildings", (8, 20), (0.6, 0.9), ("red", "blue", "white", "grey"), "rect", True,
                   "located"),
    )
}


@dataclass(frozen=True)
class SceneClass:
    """One scene class: names, rural/urban label, object counts and where each object kind may stand."""

    name: str  # answer text, lower case: "dense residential"
    class_id: str  # benchmark question_id prefix, no spaces: "DenseResidential"
    area: str  # "rural" or "urban"
    place_phrase: str  # "in a dense residential area", used in captions and descriptions
    object_counts: dict[str, tuple[int, int]]  # kind -> inclusive (min, max) number to try to place
    regions: dict[str, str] = field(default_factory=dict)  # kind -> name of the texture mask its centre must be in


SCENE_CLASSES: tuple[SceneClass, ...] = (
    SceneClass("forest", "Forest", "rural", "in a forest", {"vehicle": (0, 1), "building": (0, 1)}),
    SceneClass("meadow", "Meadow", "rural", "in a meadow", {"vehicle": (0, 2), "building": (0, 1)}),
    SceneClass("farmland", "Farmland", "rural", "on farmland",
               {"vehicle": (0, 3), "storage tank": (0, 2), "building": (0, 2)}),
    SceneClass("desert", "Desert", "rural", "in a desert", {"vehicle": (0, 3), "storage tank": (0, 3)}),
    SceneClass("lake", "Lake", "rural", "on a lake", {"ship": (0, 3)}, {"ship": "water"}),
    SceneClass("harbour", "Harbour", "urban", "in a harbour",
               {"ship": (1, 6), "storage tank": (0, 3), "vehicle": (0, 2)},
               {"ship": "water", "storage tank": "land", "vehicle": "land"}),
    SceneClass("dense residential", "DenseResidential", "urban", "in a dense residential area",
               {"vehicle": (1, 6), "building": (0, 3)}, {"vehicle": "road"}),
    SceneClass("sparse residential", "SparseResidential", "urban", "in a sparse residential area",
               {"vehicle": (0, 3), "building": (1, 4)}, {"vehicle": "road"}),
    SceneClass("industrial area", "IndustrialArea", "urban", "in an industrial area",
               {"storage tank": (1, 6), "building": (0, 3), "vehicle": (0, 4)}),
    SceneClass("airport", "Airport", "urban", "at an airport",
               {"plane": (1, 6), "vehicle": (0, 3), "storage tank": (0, 2)}, {"plane": "paved", "vehicle": "paved"}),
)


@dataclass(frozen=True)
class SceneObject:
    """One placed object: its kind, colour name and rotated box on the 0-100 grid."""

    kind: str
    colour: str
    x1: int
    y1: int
    x2: int
    y2: int
    angle: int  # degrees in [-90, 90], positive = clockwise on screen (see module docstring)

    @property
    def centre(self) -> tuple[float, float]:
        return (self.x1 + self.x2) / 2, (self.y1 + self.y2) / 2

    @property
    def area(self) -> int:
        return (self.x2 - self.x1) * (self.y2 - self.y1)

    @property
    def size_group(self) -> str:
        return size_group_of_area(self.area)

    @property
    def box_text(self) -> str:
        return f"{{<{self.x1}><{self.y1}><{self.x2}><{self.y2}>|<{self.angle}>}}"

    @property
    def position(self) -> str:
        """Coarse position on a 3x3 layout: "top left", "top", ..., "center", ..., "bottom right"."""
        centre_x, centre_y = self.centre
        row = "top" if centre_y < GRID / 3 else "bottom" if centre_y > 2 * GRID / 3 else ""
        column = "left" if centre_x < GRID / 3 else "right" if centre_x > 2 * GRID / 3 else ""
        return " ".join(part for part in (row, column) if part) or "center"


@dataclass
class Scene:
    """A rendered scene: its class, its objects (in placement order; obj_ids index this list) and the image.

    ``scene_class`` shaped the scene (texture, objects) and is the correct answer. ``label_class`` is what an
    annotator wrote: the same class, except for ambiguous scenes (``data_prep.synth_balanced``) whose label is drawn
    from a posterior; ``posterior`` is then P(label = scene_class | image), else 1.
    """

    scene_class: SceneClass
    objects: list[SceneObject]
    image: Image.Image
    label_class: SceneClass | None = None
    posterior: float = 1.0

    @property
    def label(self) -> SceneClass:
        return self.label_class or self.scene_class


def size_group_of_area(area: float) -> str:
    if area < SIZE_GROUP_LIMITS["small"]:
        return "small"
    return "medium" if area < SIZE_GROUP_LIMITS["medium"] else "large"


def rotate_offsets(offsets: np.ndarray, angle_degrees: float) -> np.ndarray:
    """Rotate (N, 2) (dx, dy) offsets in image coordinates (y down) by angle, positive = clockwise on screen."""
    theta = math.radians(angle_degrees)
    cos_t, sin_t = math.cos(theta), math.sin(theta)
    rotated_x = offsets[:, 0] * cos_t - offsets[:, 1] * sin_t  # (N,)
    rotated_y = offsets[:, 0] * sin_t + offsets[:, 1] * cos_t  # (N,)
    return np.stack([rotated_x, rotated_y], axis=1)  # (N, 2)


def box_corners(x1: float, y1: float, x2: float, y2: float, angle: float) -> np.ndarray:
    """Corners (4, 2) of the rotated box, in the coordinates of the box (grid units), in drawing order."""
    half_length, half_width = (x2 - x1) / 2, (y2 - y1) / 2
    offsets = np.array([[-half_length, -half_width], [half_length, -half_width],
                        [half_length, half_width], [-half_length, half_width]])  # (4, 2)
    return rotate_offsets(offsets, angle) + np.array([(x1 + x2) / 2, (y1 + y2) / 2])  # (4, 2)


def _shape_outline(shape: str, half_length: float, half_width: float) -> np.ndarray:
    """Outline (P, 2) of a shape in its own frame (length along +x, nose/bow at +x), centred on (0, 0)."""
    a, b = half_length, half_width
    if shape == "ship":
        return np.array([[-a, -b], [0.55 * a, -b], [a, 0.0], [0.55 * a, b], [-a, b]])
    if shape == "plane":
        # Fuselage, swept wings with a wide root (so the centre region is solid), tail plane.
        fuselage = 0.16 * b
        return np.array([
            [a, 0.0], [0.75 * a, -fuselage], [0.35 * a, -fuselage], [-0.1 * a, -b], [-0.35 * a, -b],
            [-0.35 * a, -fuselage], [-0.75 * a, -fuselage], [-a, -0.4 * b], [-a, 0.4 * b], [-0.75 * a, fuselage],
            [-0.35 * a, fuselage], [-0.35 * a, b], [-0.1 * a, b], [0.35 * a, fuselage], [0.75 * a, fuselage],
        ])
    return np.array([[-a, -b], [a, -b], [a, b], [-a, b]])


def draw_objects(background: np.ndarray, objects: list[SceneObject]) -> Image.Image:
    """Draw the objects onto a (S, S, 3) uint8 background; returns the S x S RGB image."""
    image_size = background.shape[0]
    canvas = Image.fromarray(background, "RGB").resize((image_size * SUPERSAMPLE,) * 2, Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    grid_to_canvas = image_size * SUPERSAMPLE / GRID
    for scene_object in objects:
        kind = OBJECT_KINDS[scene_object.kind]
        fill = COLOURS[scene_object.colour]
        centre = np.array(scene_object.centre)
        half_length = (scene_object.x2 - scene_object.x1) / 2
        half_width = (scene_object.y2 - scene_object.y1) / 2
        if kind.shape == "disc":
            left, top = (centre - [half_length, half_width]) * grid_to_canvas
            right, bottom = (centre + [half_length, half_width]) * grid_to_canvas
            draw.ellipse([left, top, right, bottom], fill=fill)
            continue
        outline = _shape_outline(kind.shape, half_length, half_width)  # (P, 2)
        points = (rotate_offsets(outline, scene_object.angle) + centre) * grid_to_canvas  # (P, 2)
        draw.polygon([tuple(point) for point in points.tolist()], fill=fill)
    return canvas.reduce(SUPERSAMPLE)


# ---- object placement ----

def _sample_object(rng: np.random.Generator, kind: ObjectKind, aligned: bool) -> SceneObject | None:
    """One object of ``kind`` with random size, colour, angle and position, or None if it fell off the image."""
    length = int(rng.integers(kind.length[0], kind.length[1] + 1))
    width = max(2, int(round(length * rng.uniform(*kind.width_ratio))))
    if not kind.rotates:
        angle = 0
    elif aligned:  # vehicles on a road grid and buildings follow the grid, with a little slack
        angle = int(rng.choice([0, 90, -90])) + int(rng.integers(-5, 6)) if kind.name == "vehicle" \
            else int(rng.integers(-12, 13))
        angle = max(-90, min(90, angle))
    else:
        angle = int(rng.integers(-90, 91))
    x1 = int(rng.integers(0, GRID - length + 1))
    y1 = int(rng.integers(0, GRID - width + 1))
    scene_object = SceneObject(kind.name, str(rng.choice(kind.colours)), x1, y1, x1 + length, y1 + width, angle)
    corners = box_corners(scene_object.x1, scene_object.y1, scene_object.x2, scene_object.y2, angle)
    if corners.min() < 1 or corners.max() > GRID - 1:
        return None
    return scene_object


def place_objects(rng: np.random.Generator, scene_class: SceneClass, masks: dict[str, np.ndarray] | None,
                  attempts_per_object: int = 40, counts: dict[str, int] | None = None) -> list[SceneObject]:
    """Objects for one scene: per kind a target count from the class's range, placed without overlap.

    ``masks`` maps region names to (S, S) bool masks; an object whose kind has a region must have its centre pixel
    in it. None means anywhere (text-only scenes). ``counts`` fixes the target count of some kinds (also kinds the
    class does not list; they come after the class's own kinds, in OBJECT_KINDS order). An object that finds no
    free spot is dropped, so the returned list (never the target) is the truth for counts.
    """
    objects: list[SceneObject] = []
    radii: list[float] = []
    aligned = scene_class.name in ("dense residential", "sparse residential", "industrial area")
    counts = counts or {}
    kinds = list(scene_class.object_counts) + [name for name in OBJECT_KINDS
                                               if name in counts and name not in scene_class.object_counts]
    for kind_name in kinds:
        kind = OBJECT_KINDS[kind_name]
        region = None if masks is None else masks.get(scene_class.regions.get(kind_name, ""))
        if kind_name in counts:
            target = counts[kind_name]
        else:
            low, high = scene_class.object_counts[kind_name]
            target = int(rng.integers(low, high + 1))
        for _ in range(target):
            for _ in range(attempts_per_object):
                candidate = _sample_object(rng, kind, aligned)
                if candidate is None:
                    continue
                centre_x, centre_y = candidate.centre
                if region is not None:
                    scale = region.shape[0] / GRID
                    if not region[min(int(centre_y * scale), region.shape[0] - 1),
                                  min(int(centre_x * scale), region.shape[1] - 1)]:
                        continue
                radius = math.hypot(candidate.x2 - candidate.x1, candidate.y2 - candidate.y1) / 2
                if all(math.hypot(centre_x - other.centre[0], centre_y - other.centre[1]) > radius + other_radius + 1
                       for other, other_radius in zip(objects, radii)):
                    objects.append(candidate)
                    radii.append(radius)
                    break
    return objects


def render_scene(rng: np.random.Generator, scene_class: SceneClass, image_size: int,
                 counts: dict[str, int] | None = None) -> Scene:
    """Texture, imaging conditions, object placement and drawing for one scene of ``scene_class``
    (``counts``: see ``place_objects``)."""
    background, masks = TEXTURES[scene_class.name](rng, image_size)
    background = imaging_conditions(rng, background)
    objects = place_objects(rng, scene_class, masks, counts=counts)
    return Scene(scene_class, objects, draw_objects(background, objects))


def world_parameters() -> dict:
    """The world's fixed parameters, for world.json."""
    return {
        "classes": [{"name": scene_class.name, "class_id": scene_class.class_id, "area": scene_class.area,
                     "object_counts": {kind: list(bounds) for kind, bounds in scene_class.object_counts.items()},
                     "regions": dict(scene_class.regions)} for scene_class in SCENE_CLASSES],
        "object_kinds": [{"name": kind.name, "plural": kind.plural, "length": list(kind.length),
                          "width_ratio": list(kind.width_ratio), "colours": list(kind.colours), "shape": kind.shape,
                          "rotates": kind.rotates} for kind in OBJECT_KINDS.values()],
        "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
        "size_groups": {"small": f"box area < {SIZE_GROUP_LIMITS['small']}",
                        "medium": f"{SIZE_GROUP_LIMITS['small']} <= box area < {SIZE_GROUP_LIMITS['medium']}",
                        "large": f"box area >= {SIZE_GROUP_LIMITS['medium']}",
                        "unit": "grid units squared (0-100 grid), before rotation"},
        "box_format": "{<x1><y1><x2><y2>|<theta>}: integers on the 0-100 grid of the image width/height",
        "rotation_convention": "theta (integer degrees in [-90, 90]) rotates the box about its centre; positive = "
                               "clockwise as seen on the image (y axis down on screen); x1..x2 is the "
                               "object's length axis",
    }
