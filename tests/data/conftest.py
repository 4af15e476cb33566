"""Fixtures of the loader tests; the shard-writing helpers live in ``shard_fixtures``."""

from pathlib import Path

import pytest

from shard_fixtures import even_train_shards, write_shard_folder


@pytest.fixture(scope="module")
def even_shards(tmp_path_factory) -> Path:
    """8 train shards x 6 samples (48) and 2 val shards x 5 samples."""
    return write_shard_folder(tmp_path_factory.mktemp("even"), {
        "train": even_train_shards(8, 6),
        "val": even_train_shards(2, 5, first_index=1000),
    })
