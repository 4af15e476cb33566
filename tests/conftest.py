"""Shared fixtures: offline mode, a small real SentencePiece tokenizer trained once per session, and the GPU tier.

The GPU tier: tests marked ``gpu`` (``pytest -m gpu``; ``make gpu-check`` runs them) need CUDA and are skipped,
with the reason, where torch sees none. Where CUDA is present nothing here forces the CPU: DeepSpeed picks the GPU
(tests that are about the CPU path, such as the 2-rank gloo runs, ask for it themselves).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

CUDA_AVAILABLE = torch.cuda.is_available()
if not CUDA_AVAILABLE:
    # DeepSpeed would fall back to the CPU by itself, with a warning at every import; say it once here.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
NO_CUDA_REASON = "needs a CUDA GPU (torch.cuda.is_available() is False here); run `pytest -m gpu` on a GPU machine"


def pytest_collection_modifyitems(config, items):
    if CUDA_AVAILABLE:
        return
    skip = pytest.mark.skip(reason=NO_CUDA_REASON)
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)

TOKENIZER_TEXTS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions.",
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions.",
    "USER: What is in the picture? ASSISTANT: A red ship near the harbour.",
    "[refer] Give me the location of <p> the plane </p> {<10><20><30><40>|<45>}",
    "[identify] What is the object present at {<8><26><22><37>} a small white vehicle",
    "Classify the image. Answer the question using a single word or phrase. forest lake desert farmland airport",
    "Is there a ship in the image? yes no How many planes are there? 0 1 2 3 4 5 6 7 8 9",
]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from kd_pipeline.tokenizer import train_tokenizer

    return train_tokenizer(TOKENIZER_TEXTS * 20, tmp_path_factory.mktemp("tokenizer"), vocab_size=400)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from kd_pipeline.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """A small synthetic world, sharded (train/val) and with a tokenizer trained on it: the inputs of every
    end-to-end test. Returns a dict of paths: root, shards, pt_shards, tokenizer, bench."""
    from data_prep.__main__ import main as data_prep

    root = tmp_path_factory.mktemp("synth_data")
    assert data_prep(["synth", "--out", str(root / "synth"), "--num", "320", "--seed", "0", "--bench-num", "24"]) == 0
    assert data_prep(["shard", "--instruct", str(root / "synth" / "instruct.json"), "--images",
                      str(root / "synth" / "images"), "--out", str(root / "shards"), "--val-fraction", "0.1",
                      "--max-shard-samples", "40", "--workers", "1", "--seed", "0"]) == 0
    assert data_prep(["pt", "--text", str(root / "synth" / "pt_corpus.txt"), "--out", str(root / "pt_shards"),
                      "--max-shard-samples", "50"]) == 0
    assert data_prep(["tokenizer", "--instruct", str(root / "synth" / "instruct.json"), "--text",
                      str(root / "synth" / "pt_corpus.txt"), "--out", str(root / "tokenizer"),
                      "--vocab-size", "600"]) == 0
    return {"root": root, "shards": root / "shards", "pt_shards": root / "pt_shards",
            "tokenizer": root / "tokenizer", "synth": root / "synth"}
