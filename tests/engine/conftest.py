"""A stage-1 run shared by the engine tests (stage 1 checks, and the init_from of stage 2)."""

import pytest

from tests.engine.launch import train

STAGE1_STEPS = ["train.max_steps=4", "train.eval_every=2", "checkpoint.every_steps=2", "train.lr=3e-3"]


@pytest.fixture(scope="session")
def stage1_run(synth_data, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("stage1_full")
    train(synth_data, output_dir, STAGE1_STEPS)
    return output_dir
