"""The real METEOR 1.5 jar (pycocoevalcap + java), when this machine has it: one JVM start, 15-40 s."""

import pytest

from kd_pipeline.eval import captioning


@pytest.mark.slow
@pytest.mark.skipif(captioning.meteor_backend()[0] != "meteor-1.5", reason="optional: needs java and pycocoevalcap")
def test_real_meteor_jar_through_the_scorer():
    records = [
        {"question_id": 1, "answer": "<p>a white airplane near the terminal</p>", "ground_truth": "A white airplane near the terminal."},
        {"question_id": 2, "answer": "line one\nwith ||| separators", "ground_truth": "zzz qqq"},
    ]
    metrics = captioning.score_region_captioning(records)
    assert metrics["meteor_backend"] == "meteor-1.5"
    # Corpus METEOR pools the statistics: all 6 words of segment 1 match (one chunk), none of segment 2, so
    # 0 < METEOR < 1; a value at all means the line protocol survived the newline and "|||" in answer 2.
    assert 0.3 < metrics["meteor"] < 1.0
