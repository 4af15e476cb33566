"""Scene classification and VQA scorers on hand-computed cases."""

import pytest

from kd_pipeline.eval.records import canonical_record, join_questions, normalize_label
from kd_pipeline.eval.scene import UNPARSABLE_LABEL, score_scene
from kd_pipeline.eval.vqa import score_vqa


def scene_record(class_name: str, index: int, answer):
    return {"question_id": f"{class_name}/{class_name.lower()}_{index}.jpg", "answer": answer}


def test_normalisation_is_geochats_rule():
    assert normalize_label("Dense Residential.") == "denseresidential"
    assert normalize_label(" Bare\tLand.\n") == "bareland"


def test_oa_and_aa_differ_on_an_unbalanced_set():
    # Forest: 8 questions, 6 right. Airport: 2 questions, 0 right. OA = 6/10; AA = (6/8 + 0/2) / 2 = 0.375.
    records = [scene_record("Forest", index, "forest") for index in range(6)]
    records += [scene_record("Forest", index, "Airport.") for index in range(6, 8)]
    records += [scene_record("Airport", 0, "forest"), scene_record("Airport", 1, "a picture of a runway")]
    metrics = score_scene(records)
    assert metrics["n"] == 10
    assert metrics["oa"] == pytest.approx(0.6)
    assert metrics["aa"] == pytest.approx(0.375)
    assert metrics["per_class"] == {"airport": 0.0, "forest": 0.75}
    assert metrics["unparsable"] == 1


def test_confusion_matrix_rows_are_true_classes_and_garbage_goes_to_the_last_column():
    records = [
        scene_record("Forest", 0, "forest"),
        scene_record("Forest", 1, "Bare Land"),
        scene_record("BareLand", 0, "bare land."),
        scene_record("BareLand", 1, ""),
        scene_record("BareLand", 2, None),
        scene_record("BareLand", 3, "x" * 10_000),
    ]
    confusion = score_scene(records)["confusion"]
    assert confusion["true_labels"] == ["bareland", "forest"]
    assert confusion["predicted_labels"] == ["bareland", "forest", UNPARSABLE_LABEL]
    assert confusion["matrix"] == [[1, 0, 3], [1, 1, 0]]


def test_scene_falls_back_to_ground_truth_and_rejects_records_without_a_class():
    metrics = score_scene([{"question_id": 7, "ground_truth": "Farmland", "answer": "farmland"},
                           {"question_id": 8, "answer": "farmland"}])
    assert (metrics["n"], metrics["oa"], metrics["skipped_no_ground_truth"]) == (1, 1.0, 1)
    with pytest.raises(ValueError, match="--questions"):
        score_scene([{"question_id": 8, "answer": "farmland"}])


def test_vqa_accuracy_per_type_moa_and_oa():
    records = [
        {"question_id": 1, "answer": "Yes", "gt": "yes", "category": "presence"},
        {"question_id": 2, "answer": "no", "gt": "yes", "category": "presence"},
        {"question_id": 3, "answer": "no.", "gt": "no", "category": "presence"},
        {"question_id": 4, "answer": "yes", "gt": "yes", "category": "comp"},
        {"question_id": 5, "answer": "Rural", "gt": "rural", "category": "rural_urban"},
        {"question_id": 6, "answer": "urban", "gt": "rural", "category": "rural_urban"},
    ]
    metrics = score_vqa(records)
    assert metrics["accuracy_by_type"] == pytest.approx({"comparison": 1.0, "presence": 2 / 3, "rural_urban": 0.5})
    assert metrics["moa"] == pytest.approx((1.0 + 2 / 3 + 0.5) / 3)
    assert metrics["oa"] == pytest.approx(4 / 6)
    assert metrics["n_by_type"] == {"comparison": 1, "presence": 3, "rural_urban": 2}
    assert metrics["unparsable"] == 0


def test_vqa_counts_answers_outside_the_answer_vocabulary_as_unparsable():
    records = [
        {"question_id": 1, "answer": "I cannot tell", "ground_truth": "yes", "type": "presence"},
        {"question_id": 2, "answer": "", "ground_truth": "no", "type": "presence"},
        {"question_id": 3, "answer": "4", "ground_truth": "3", "type": "count"},
        {"question_id": 4, "answer": ["yes"], "ground_truth": "yes", "type": "presence"},
    ]
    metrics = score_vqa(records)
    assert metrics["unparsable"] == 3  # the numeric count answer is parsable, just wrong
    assert metrics["oa"] == 0.0


def test_join_fills_missing_fields_from_questions_without_taking_their_text_as_answer():
    answers = [{"question_id": 1, "image_id": "a.png", "answer": "yes"}, {"question_id": "2", "image_id": "b.png"}]
    questions = [
        {"question_id": "1", "text": "Is there a road?", "ground_truth": "no", "type": "presence"},
        {"question_id": 2, "text": "Is it rural?", "ground_truth": "rural", "type": "rural_urban"},
    ]
    joined = join_questions(answers, questions)
    assert joined[0]["ground_truth"] == "no" and joined[0]["type"] == "presence" and joined[0]["answer"] == "yes"
    assert "answer" not in joined[1]  # the question's "text" is the question, never an answer
    metrics = score_vqa(joined)
    assert metrics["oa"] == 0.0 and metrics["unparsable"] == 1


def test_canonical_record_reads_llava_style_answer_and_image_size():
    record = canonical_record({"question_id": 3, "text": "yes", "image_size": [640, 480]})
    assert (record["answer"], record["width"], record["height"]) == ("yes", 640, 480)
    assert canonical_record(record) == record


@pytest.mark.parametrize("scorer", [score_scene, score_vqa])
def test_no_records_is_a_clear_error(scorer):
    with pytest.raises(ValueError, match="no"):
        scorer([])
