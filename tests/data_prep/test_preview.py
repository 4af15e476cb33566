"""`data_prep preview`: what the model sees, from real shards, against the prompt module as reference."""

import json

from data_prep.__main__ import main
from kd_pipeline.prompts import IGNORE_INDEX, render
from kd_pipeline.tokenizer import image_token_id, load_tokenizer


def test_preview_json_matches_rendering_and_labels(synth_data, capsys):
    assert main(["preview", "--shards", str(synth_data["shards"]), "--tokenizer", str(synth_data["tokenizer"]),
                 "--n", "4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 4
    tokenizer = load_tokenizer(synth_data["tokenizer"])
    image_id = image_token_id(tokenizer)
    for row in rows:
        assert set(row) == {"key", "prompt", "input_ids", "labels"}
        assert row["prompt"].count("<image>") == 1 and row["prompt"].startswith("A chat between a curious user")
        assert row["input_ids"].count(image_id) == 1 and len(row["labels"]) == len(row["input_ids"])
        supervised = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
        assert supervised and supervised[-1] == tokenizer.eos_token_id
        # every supervised stretch is an answer of the rendered conversation
        answer_text = tokenizer.decode(supervised).replace("</s>", "\n")
        for line in filter(None, (part.strip() for part in answer_text.split("\n"))):
            assert line.replace(" ", "") in row["prompt"].replace(" ", "")


def test_preview_text_marks_supervised_spans(synth_data, capsys):
    assert main(["preview", "--shards", str(synth_data["shards"]), "--tokenizer", str(synth_data["tokenizer"]),
                 "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("===") == 2 and "[[" in out and "</s>]]" in out and "ASSISTANT:" in out


def test_preview_bad_folder_is_one_clear_line(tmp_path, capsys, synth_data):
    assert main(["preview", "--shards", str(tmp_path), "--tokenizer", str(synth_data["tokenizer"])]) == 2
    assert "no manifest.json" in capsys.readouterr().err
