"""Region captioning: ROUGE wiring against rouge-score, tag stripping, METEOR backend choice and the real jar."""

import pytest
from rouge_score import rouge_scorer

from kd_pipeline.eval import captioning
from kd_pipeline.eval.captioning import meteor_backend, score_region_captioning, strip_tags

PAIRS = [
    ("<p>a small white airplane parked near the terminal</p>", "a white airplane parked at the terminal"),
    ("two large storage tanks", "a group of two storage tanks"),
    ("Tanks, storage: two!", "two storage tanks"),  # same words, reversed: ROUGE-1 = 1, ROUGE-L = 1/3
]


def caption_records(pairs):
    return [{"question_id": index, "answer": answer, "ground_truth": truth} for index, (answer, truth) in enumerate(pairs)]


def test_tags_are_stripped_and_whitespace_collapsed():
    assert strip_tags("<p> a  plane </p>\n<unk>near</s>") == "a plane near"
    assert strip_tags("{<8><26><22><37>} box text stays") == "{<8><26><22><37>} box text stays"


@pytest.mark.parametrize("use_stemmer", [True, False])
def test_rouge_equals_rouge_score_means(use_stemmer):
    reference_scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=use_stemmer)
    expected = [reference_scorer.score(truth, answer.replace("<p>", "").replace("</p>", "")) for answer, truth in PAIRS]
    metrics = score_region_captioning(caption_records(PAIRS), use_stemmer=use_stemmer, meteor="off")
    assert metrics["rouge1"] == pytest.approx(sum(score["rouge1"].fmeasure for score in expected) / 3)
    assert metrics["rougeL"] == pytest.approx(sum(score["rougeL"].fmeasure for score in expected) / 3)
    assert 0 < metrics["rougeL"] < metrics["rouge1"] <= 1


def test_rouge_on_a_hand_computed_pair():
    # "two large storage tanks" vs "a group of two storage tanks": 3 shared words, in order:
    # P = 3/4, R = 3/6, F = 0.6 for both ROUGE-1 and ROUGE-L. Reversed words: ROUGE-1 = 1, ROUGE-L = 1/3.
    metrics = score_region_captioning(caption_records(PAIRS[1:]), meteor="off")
    assert metrics["rouge1"] == pytest.approx((0.6 + 1.0) / 2)
    assert metrics["rougeL"] == pytest.approx((0.6 + 1 / 3) / 2)
    assert metrics["meteor"] is None and metrics["meteor_note"] == "METEOR switched off"


def test_several_references_take_the_best_and_unparsable_answers_score_zero():
    records = [
        {"question_id": 1, "answer": "a red roof", "ground_truth": ["a blue car", "a red roof"]},
        {"question_id": 2, "answer": "<p></p>", "ground_truth": "a plane"},
        {"question_id": 3, "answer": None, "ground_truth": "a plane"},
    ]
    metrics = score_region_captioning(records, meteor="off")
    assert metrics["rouge1"] == pytest.approx(1 / 3)
    assert (metrics["n"], metrics["unparsable"]) == (3, 2)


def test_meteor_prefers_the_jar_then_nltk_then_reports_why_not(monkeypatch):
    monkeypatch.setattr(captioning, "java_path", lambda: "/usr/bin/java")
    monkeypatch.setattr(captioning, "meteor_jar_path", lambda: "/x/meteor-1.5.jar")
    monkeypatch.setattr(captioning, "wordnet_available", lambda: True)
    assert meteor_backend()[0] == "meteor-1.5"

    monkeypatch.setattr(captioning, "java_path", lambda: None)
    backend, note = meteor_backend()
    assert backend == "nltk" and "java" in note

    monkeypatch.setattr(captioning, "wordnet_available", lambda: False)
    monkeypatch.setattr(captioning, "meteor_jar_path", lambda: None)
    backend, note = meteor_backend()
    assert backend is None
    assert "java" in note and "pycocoevalcap" in note and "WordNet" in note


def test_unavailable_meteor_is_null_with_the_reason(monkeypatch):
    monkeypatch.setattr(captioning, "java_path", lambda: None)
    monkeypatch.setattr(captioning, "wordnet_available", lambda: False)
    metrics = score_region_captioning(caption_records(PAIRS))
    assert metrics["meteor"] is None and metrics["meteor_backend"] is None
    assert "WordNet" in metrics["meteor_note"]


def test_nltk_backend_is_wired_to_nltk_meteor_score(monkeypatch):
    calls = []

    def fake_meteor_score(references, hypothesis):
        calls.append((references, hypothesis))
        return 0.5

    import nltk.translate.meteor_score as nltk_meteor

    monkeypatch.setattr(captioning, "java_path", lambda: None)
    monkeypatch.setattr(captioning, "wordnet_available", lambda: True)
    monkeypatch.setattr(nltk_meteor, "meteor_score", fake_meteor_score)
    records = caption_records(PAIRS) + [{"question_id": 9, "answer": "", "ground_truth": "a plane"}]
    metrics = score_region_captioning(records)
    assert metrics["meteor_backend"] == "nltk"
    assert metrics["meteor"] == pytest.approx((0.5 * 3 + 0.0) / 4)  # the empty answer scores 0 without a call
    assert calls[1] == ([["a", "group", "of", "two", "storage", "tanks"]], ["two", "large", "storage", "tanks"])
    assert calls[2] == ([["two", "storage", "tanks"]], ["tanks", ",", "storage", ":", "two", "!"])


def test_jar_failure_falls_back_and_is_recorded(monkeypatch):
    def broken_jar(hypotheses, references):
        raise BrokenPipeError("jvm died")

    monkeypatch.setattr(captioning, "java_path", lambda: "/usr/bin/java")
    monkeypatch.setattr(captioning, "meteor_jar_path", lambda: "/x/meteor-1.5.jar")
    monkeypatch.setattr(captioning, "wordnet_available", lambda: False)
    monkeypatch.setattr(captioning, "meteor_jar_score", broken_jar)
    metrics = score_region_captioning(caption_records(PAIRS))
    assert metrics["meteor"] is None and "jvm died" in metrics["meteor_note"]
