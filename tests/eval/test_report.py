"""report.md / results.json / PNG figures written from {model: {benchmark: metrics}}."""

import json

import numpy as np
from PIL import Image

from kd_pipeline.eval.report import write_report
from kd_pipeline.eval.scene import score_scene


def scene_metrics():
    records = [{"question_id": f"Forest/{index}", "answer": "forest"} for index in range(3)]
    records += [{"question_id": "Desert/0", "answer": "forest"}, {"question_id": "Desert/1", "answer": "???"}]
    return score_scene(records)


RESULTS = {
    "student": {
        "AID": scene_metrics(),
        "hrben": {"n": 10, "unparsable": 1, "oa": 0.7, "moa": 0.65,
                  "accuracy_by_type": {"presence": 0.5, "comparison": 0.8}},
        "referring": {"n": 4, "unparsable": 0, "acc@0.5": 0.25, "acc@0.25": 0.5,
                      "by_size_group": {"small": {"n": 4, "acc@0.5": 0.25, "acc@0.25": 0.5}}},
        "region_captioning": {"n": 2, "unparsable": 0, "rouge1": 0.8764, "rougeL": 0.87, "meteor": None,
                              "meteor_backend": None},
        "efficiency": {"params_paper": 6760723456, "params_total": 7063640064,
                       "flops_paper_convention": 6903086186496, "flops_forward_matmul": 19945622044672},
    },
    "teacher": {"UCmerced": {"n": 1, "unparsable": 0, "oa": 1.0, "aa": 1.0}},
}


def table_row(markdown: str, title_part: str, label: str) -> list[str]:
    section = markdown.split(title_part, 1)[1].split("\n## ", 1)[0]
    line = next(line for line in section.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def test_report_files_and_tables(tmp_path):
    written = write_report(RESULTS, tmp_path)
    assert set(written) == {"results.json", "report.md", "confusion_student_aid.png"}

    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["teacher"]) == {"ucmerced"}  # benchmark keys normalised
    assert saved["student"]["aid"]["oa"] == RESULTS["student"]["AID"]["oa"]

    markdown = (tmp_path / "report.md").read_text()
    # Columns: student, teacher, then the paper's three GeoChat columns.
    assert "| | student | teacher | GeoChat-7B (paper) | GeoChat-13B (paper) | Distilled 7B (paper) |" in markdown
    assert table_row(markdown, "Table 3", "AID") == ["60.00", "—", "67.20", "69.53", "67.30"]
    assert table_row(markdown, "Table 4", "UCMerced") == ["—", "100.00", "84.48", "90.43", "91.24"]
    assert table_row(markdown, "Table 5", "HRBEN presence")[:2] == ["50.00", "—"]
    assert table_row(markdown, "Table 5", "HRBEN mOA (mean of types)")[0] == "65.00"
    assert table_row(markdown, "Table 6", "acc@0.5 (small)")[0] == "25.00"
    assert table_row(markdown, "Table 7", "ROUGE-1")[0] == "87.64"
    assert table_row(markdown, "Table 7", "METEOR")[0] == "—"
    assert table_row(markdown, "Table 8", "Params (M), paper's count")[:3] == ["6760.72", "—", "6760.72"]
    assert table_row(markdown, "Table 8", "FLOPs (G), paper convention")[0] == "6903.09"
    assert table_row(markdown, "Coverage", "aid")[0] == "5 / 1"
    assert "![confusion_student_aid](confusion_student_aid.png)" in markdown


def test_report_without_paper_columns(tmp_path):
    write_report(RESULTS, tmp_path, include_paper=False)
    markdown = (tmp_path / "report.md").read_text()
    assert "(paper)" not in markdown.split("## Table 3", 1)[1]


def test_confusion_png_is_a_real_image(tmp_path):
    path = write_report(RESULTS, tmp_path)["confusion_student_aid.png"]
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 200 and image.height > 200


def coloured_pixels(pixels: np.ndarray, channel: int) -> int:
    others = [index for index in range(3) if index != channel]
    return int(((pixels[..., channel] > 200) & (pixels[..., others] < 90).all(axis=-1)).sum())


def test_grounding_examples_draw_green_truth_and_red_predictions(tmp_path):
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    Image.new("RGB", (300, 300), (128, 128, 128)).save(image_dir / "tile.png")
    truth = [[[30, 30], [150, 30], [150, 150], [30, 150]]]
    records = {
        "student": [{"question_id": "q1", "image_id": "tile", "answer": "{<50><50><90><90>|<20>}", "ground_truth": truth}],
        "teacher": [{"question_id": "q1", "image_id": "tile", "answer": "no box", "ground_truth": truth}],
    }
    written = write_report({"student": {}}, tmp_path / "out", grounding_records=records, image_dir=image_dir)
    with Image.open(written["grounding_examples.png"]) as image:
        pixels = np.asarray(image.convert("RGB")).astype(int)
    width = pixels.shape[1]
    student_panel, teacher_panel = pixels[:, width // 3 : 2 * width // 3], pixels[:, 2 * width // 3 :]
    assert coloured_pixels(student_panel, channel=1) > 50 and coloured_pixels(student_panel, channel=0) > 50
    assert coloured_pixels(teacher_panel, channel=1) > 50 and coloured_pixels(teacher_panel, channel=0) == 0


def test_a_missing_example_image_does_not_cost_the_tables(tmp_path):
    records = {"student": [{"question_id": "q1", "image_id": "absent", "answer": "{<1><1><5><5>}",
                            "ground_truth": "{<1><1><5><5>}"}]}
    written = write_report(RESULTS, tmp_path, grounding_records=records, image_dir=tmp_path / "no_images")
    assert "grounding_examples.png" not in written
    markdown = (tmp_path / "report.md").read_text()
    assert "Table 8" in markdown and "grounding examples not drawn" in markdown and "absent.png" in markdown
