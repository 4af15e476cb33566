import dataclasses

import pytest
import yaml

from kd_pipeline.config import (Config, ConfigError, config_reference, config_to_dict, dump_config, field_docs,
                                help_text, load_config, parse_overrides)


def test_defaults_are_frozen_and_sections_separate():
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.lr = 1.0  # type: ignore[misc]
    assert config.student is not config.teacher
    assert config.teacher.hidden_size != config.student.hidden_size


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"train": {"lr": 1e-3, "max_steps": 7}, "student": {"lora": True}}))
    config = load_config(path, ["train.lr=5e-4", "teacher.num_layers=5", "train.adam_betas=[0.9, 0.95]"])
    assert config.train.lr == 5e-4 and config.train.max_steps == 7
    assert config.student.lora is True and config.teacher.lora is False
    assert config.teacher.num_layers == 5 and config.student.num_layers == 2
    assert config.train.adam_betas == (0.9, 0.95)


def test_unknown_key_names_key_and_close_match(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  max_stpes: 3\n")
    with pytest.raises(ConfigError, match=r"train\.max_stpes.*max_steps"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"unknown section 'trian'.*'train'"):
        load_config(None, ["trian.lr=1"])


@pytest.mark.parametrize("override, message", [
    ("train.max_steps=abc", "train.max_steps expects an integer"),
    ("student.lora=3", "student.lora expects true or false"),
    ("train.lr=fast", "train.lr expects a float"),
    ("run.stage=rlhf", "run.stage='rlhf' is not one of"),
    ("train.micro_batch_size=0", "train.micro_batch_size must be >= 1"),
    ("student.image_size=50", "student.image_size=50 is not a multiple of student.patch_size=14"),
    ("trainlr=1", "must look like section.key=value"),
])
def test_wrong_values_rejected_with_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(None, [override])


def test_int_accepted_for_float_and_missing_file(tmp_path):
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_dump_roundtrip(tmp_path):
    config = load_config(None, ["run.seed=3", "kd.temperature=2.0"])
    dump_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    assert config_to_dict(config)["kd"]["temperature"] == 2.0


def test_every_field_documented_in_help():
    text = help_text()
    for section in dataclasses.fields(Config):
        cls = type(getattr(Config(), section.name))
        docs = field_docs(cls)
        for item in dataclasses.fields(cls):
            assert docs.get(item.name), f"{section.name}.{item.name} has no docstring"
            assert f"{section.name}.{item.name} =" in text
    assert "| `kd.alpha_kd` | float | `0.5` |" in config_reference()


def test_parse_overrides_types():
    assert parse_overrides(["a.b=1", "a.c=x", "d.e=true"]) == {"a": {"b": 1, "c": "x"}, "d": {"e": True}}
