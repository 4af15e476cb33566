"""Box parsing, rotated-box geometry, IoU matching and the referring scorer; fuzzed answers never crash."""

import math
import random

import pytest
from shapely.geometry import Point, Polygon

from kd_pipeline.eval.boxes import (
    GridBox,
    box_polygon,
    ground_truth_polygons,
    matched_iou,
    parse_boxes,
    polygon_iou,
)
from kd_pipeline.eval.captioning import score_region_captioning
from kd_pipeline.eval.referring import score_referring
from kd_pipeline.eval.scene import score_scene
from kd_pipeline.eval.vqa import score_vqa


def test_parse_boxes_with_and_without_angle_several_boxes_and_noise():
    text = "The planes are at {<10><20><30><40>|<45>} and{ < 50 ><60><70.5><80> }, also {<1><2><3>} {<5><6><7><8>|-30}."
    assert parse_boxes(text) == [
        GridBox(10, 20, 30, 40, 45),
        GridBox(50, 60, 70.5, 80, 0),
        GridBox(5, 6, 7, 8, -30),
    ]
    assert parse_boxes("no box here") == [] and parse_boxes(None) == [] and parse_boxes(42) == []


def test_unrotated_box_is_scaled_to_the_image_size():
    polygon = box_polygon(GridBox(10, 20, 30, 60), width=200, height=50)
    assert polygon.bounds == pytest.approx((20, 10, 60, 30))
    assert polygon.area == pytest.approx(40 * 20)
    assert box_polygon(GridBox(30, 60, 10, 20)).bounds == pytest.approx((10, 20, 30, 60))  # corners in any order


def test_ninety_degree_rotation_of_a_non_square_box():
    # 20 x 10 box centred at (50, 50); rotated 90 degrees it is 10 x 20: overlap 10 x 10 = 100, union 300.
    flat = box_polygon(GridBox(40, 45, 60, 55))
    upright = box_polygon(GridBox(40, 45, 60, 55, 90))
    assert upright.bounds == pytest.approx((45, 40, 55, 60))
    assert polygon_iou(flat, upright) == pytest.approx(1 / 3)
    assert polygon_iou(upright, box_polygon(GridBox(45, 40, 55, 60))) == pytest.approx(1.0)


def test_positive_angle_turns_clockwise_on_screen():
    # A thin horizontal bar rotated by +45 degrees in image coordinates (y down) must run from top-left to
    # bottom-right on screen, i.e. through (cx + d, cy + d) and not through (cx + d, cy - d).
    bar = box_polygon(GridBox(20, 49, 80, 51, 45))
    assert bar.contains(Point(50 + 20, 50 + 20))
    assert not bar.contains(Point(50 + 20, 50 - 20))
    # The documented corner map: top-right offset (+w/2, -h/2) goes to (dx cos - dy sin, dx sin + dy cos).
    theta = math.radians(30)
    rotated = box_polygon(GridBox(40, 45, 60, 55, 30))
    expected = (50 + 10 * math.cos(theta) + 5 * math.sin(theta), 50 + 10 * math.sin(theta) - 5 * math.cos(theta))
    assert any(math.dist(corner, expected) < 1e-9 for corner in rotated.exterior.coords)


def test_rotation_happens_in_pixels_so_right_angles_survive_non_square_images():
    rotated = box_polygon(GridBox(40, 40, 60, 60, 30), width=400, height=100)
    assert rotated.area == pytest.approx(80 * 20)  # a rectangle keeps its area; a sheared shape would not
    assert polygon_iou(rotated, rotated.minimum_rotated_rectangle) == pytest.approx(1.0)


def test_disjoint_and_touching_boxes_have_zero_iou():
    assert polygon_iou(box_polygon(GridBox(0, 0, 10, 10)), box_polygon(GridBox(20, 20, 30, 30))) == 0.0
    assert polygon_iou(box_polygon(GridBox(0, 0, 10, 10)), box_polygon(GridBox(10, 0, 20, 10))) == 0.0


def test_ground_truth_in_all_accepted_shapes():
    square = [[10, 10], [30, 10], [30, 30], [10, 30]]
    assert ground_truth_polygons([square])[0].area == pytest.approx(400)
    assert ground_truth_polygons(square)[0].area == pytest.approx(400)
    assert ground_truth_polygons([10, 10, 30, 10, 30, 30, 10, 30])[0].area == pytest.approx(400)
    assert ground_truth_polygons("{<10><10><30><30>}", 200, 200)[0].area == pytest.approx(40 * 40)
    bow_tie = [[0, 0], [10, 10], [10, 0], [0, 10]]  # self-intersecting: repaired to two triangles
    assert ground_truth_polygons([bow_tie])[0].area == pytest.approx(50)
    for unusable in (None, "", "no box", [], [[1, 2]], {"x": 1}, [1, 2, 3]):
        assert ground_truth_polygons(unusable) is None


def test_matched_iou_is_one_to_one_and_penalises_missing_and_extra_boxes():
    first, second = box_polygon(GridBox(0, 0, 10, 10)), box_polygon(GridBox(50, 50, 60, 60))
    assert matched_iou([first, second], [second, first]) == pytest.approx(1.0)
    assert matched_iou([first], [first, second]) == pytest.approx(0.5)  # one object missed
    assert matched_iou([first, first, second], [first, second]) == pytest.approx(2 / 3)  # a duplicate box
    assert matched_iou([], [first]) == 0.0


def test_referring_scores_by_threshold_type_and_size_group():
    pixel_square = [[[40, 40], [60, 40], [60, 60], [40, 60]]]  # in a 200 x 200 image = grid (20, 20)-(30, 30)
    records = [
        {"question_id": 1, "answer": "{<20><20><30><30>|<0>}", "ground_truth": pixel_square,
         "type": "ref", "size_group": "small", "width": 200, "height": 200},  # IoU 1
        {"question_id": 2, "answer": "{<20><20><30><35>}", "ground_truth": pixel_square,
         "type": "ref", "size_group": "small", "width": 200, "height": 200},  # IoU 100/150
        {"question_id": 3, "answer": "{<40><45><60><55>|<90>}", "ground_truth": "{<40><45><60><55>}",
         "type": "grounding", "size_group": "large"},  # IoU 1/3 on the grid
        {"question_id": 4, "answer": "I do not know", "ground_truth": "{<0><0><10><10>}",
         "type": "grounding", "size_group": "large"},  # unparsable: IoU 0
    ]
    metrics = score_referring(records)
    assert (metrics["n"], metrics["unparsable"]) == (4, 1)
    assert metrics["acc@0.5"] == pytest.approx(2 / 4)
    assert metrics["acc@0.25"] == pytest.approx(3 / 4)
    assert metrics["mean_iou"] == pytest.approx((1 + 2 / 3 + 1 / 3 + 0) / 4)
    assert metrics["acc@0.5_se"] == pytest.approx((0.5 * 0.5 / 4) ** 0.5)
    # IoUs 1 and 2/3: sample standard deviation sqrt(2)/6, over sqrt(2)
    assert metrics["by_type"]["ref"] == pytest.approx({"n": 2, "acc@0.5": 1.0, "acc@0.5_se": 0.0, "acc@0.25": 1.0,
                                                       "acc@0.25_se": 0.0, "mean_iou": 5 / 6, "mean_iou_se": 1 / 6})
    assert metrics["by_size_group"]["large"]["acc@0.25"] == pytest.approx(0.5)


def test_pixel_polygons_without_an_image_size_stop_with_advice():
    record = {"question_id": "q", "answer": "{<1><1><2><2>}", "ground_truth": [[[500, 500], [600, 500], [600, 600]]]}
    with pytest.raises(ValueError, match="--image-dir"):
        score_referring([record])
    metrics = score_referring([record], image_size_of=lambda _: (1000.0, 1000.0))
    assert metrics["n"] == 1


def test_image_size_lookup_scales_predictions():
    record = {"question_id": "q", "image_id": "x", "answer": "{<50><50><60><60>}",
              "ground_truth": [[[500, 250], [600, 250], [600, 300], [500, 300]]]}
    assert score_referring([record], image_size_of=lambda _: (1000.0, 500.0))["acc@0.5"] == 1.0


def random_answer(rng: random.Random):
    alphabet = "{}<>|0123456789.-  abcXYZ\n\t,;ü中/\\"
    choice = rng.random()
    if choice < 0.05:
        return rng.choice([None, 12, 3.5, ["a"], {"b": 1}, True, ""])
    pieces = []
    for _ in range(rng.randint(0, 8)):
        if rng.random() < 0.4:
            odd_numbers = [rng.uniform(-1e6, 1e6), "9" * 400, "nan", ""]  # huge (overflows to inf), not numbers
            numbers = [str(rng.randint(-50, 150) if rng.random() < 0.85 else rng.choice(odd_numbers))
                       for _ in range(rng.randint(3, 5))]
            pieces.append("{" + "".join(f"<{number}>" for number in numbers[:4])
                          + (f"|<{numbers[4]}>" if len(numbers) > 4 else "") + "}")
        else:
            pieces.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))))
    text = "".join(pieces)
    return text * rng.choice([1, 1, 1, 500])  # sometimes over-long


def test_fuzzed_answers_never_crash_any_scorer():
    rng = random.Random(1234)
    answers = [random_answer(rng) for _ in range(300)]
    boxes_found = sum(bool(parse_boxes(answer)) for answer in answers)
    assert boxes_found > 50  # the fuzz does exercise the parser, not only garbage

    referring = score_referring([
        {"question_id": index, "answer": answer, "ground_truth": "{<10><10><50><50>|<30>}", "type": "ref"}
        for index, answer in enumerate(answers)])
    assert referring["n"] == 300 and 0 <= referring["acc@0.25"] <= 1
    assert referring["unparsable"] >= 300 - boxes_found
    scene = score_scene([{"question_id": f"Forest/{index}", "answer": answer} for index, answer in enumerate(answers)])
    assert scene["n"] == 300 and scene["oa"] == 0.0
    vqa = score_vqa([{"question_id": index, "answer": answer, "ground_truth": "yes"} for index, answer in enumerate(answers)])
    assert vqa["n"] == 300
    captions = score_region_captioning(
        [{"question_id": index, "answer": answer, "ground_truth": "a small plane"} for index, answer in enumerate(answers)],
        meteor="off")
    assert captions["n"] == 300 and 0 <= captions["rouge1"] <= 1


def test_shapely_polygon_inputs_are_not_required_to_be_closed():
    open_ring = ground_truth_polygons([[0, 0], [4, 0], [4, 4], [0, 4]])[0]
    assert open_ring.equals(Polygon([(0, 0), (4, 0), (4, 4), (0, 4), (0, 0)]))
