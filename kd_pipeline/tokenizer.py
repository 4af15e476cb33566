"""LLaMA SentencePiece tokenizers: loading a local one, and training a small real one for tests and the demo.

GeoChat trains with LLaMA's *slow* tokenizer in its legacy mode: every stretch of text between special tokens is
encoded with SentencePiece's dummy prefix, so ``"</s>USER"`` becomes ``["</s>", "▁USER"]``. transformers 5 converts
``tokenizer.model`` to a fast tokenizer; with ``legacy=True`` it reproduces that behaviour (checked in the tests
against ``sentencepiece`` itself), which the label bookkeeping of ``kd_pipeline.prompts`` relies on.

Ids follow LLaMA: unk 0 (also the pad id, as in GeoChat), bos 1, eos 2. ``<image>`` is an added special token after
the SentencePiece vocabulary (LLaVA-HF's convention), so text can never produce it by accident.
Nothing here touches the network: ``local_files_only`` everywhere.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

from kd_pipeline.errors import UserError

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

# What GeoChat's tokenizer_config.json says, plus legacy=True spelled out (transformers 5 defaults to False).
TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "legacy": True,
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<unk>",
    "padding_side": "right",
    "model_max_length": 2048,
    "clean_up_tokenization_spaces": False,
}


class TokenizerError(UserError, ValueError):
    """A tokenizer folder that cannot be used, worded with the path and the fix."""


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1000) -> Path:
    """Train a byte-fallback BPE SentencePiece model with LLaMA's special ids and write a loadable folder.

    Used by tests and the demo, which may not download LLaMA's tokenizer. Returns ``out_dir``.
    """
    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    if not lines:
        raise TokenizerError("train_tokenizer got no text to learn from")
    # 256 byte pieces + 3 specials must fit; the rest are merges.
    vocab_size = max(vocab_size, 300)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(out_dir / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1, byte_fallback=True,
        character_coverage=1.0, split_digits=True, add_dummy_prefix=True, normalization_rule_name="identity",
        hard_vocab_limit=False, minloglevel=2, num_threads=1)
    (out_dir / "tokenizer.vocab").unlink(missing_ok=True)
    write_tokenizer_config(out_dir)
    return out_dir


def write_tokenizer_config(out_dir: str | Path, chat_template: str | None = None) -> None:
    """Write GeoChat-style ``tokenizer_config.json`` and ``special_tokens_map.json`` beside a ``tokenizer.model``
    (with ``chat_template`` for transformers >= 4.34 when given; older versions ignore the key)."""
    out_dir = Path(out_dir)
    settings = {**TOKENIZER_CONFIG, **({"chat_template": chat_template} if chat_template else {})}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}, indent=2))


def tokenizer_folder(config) -> Path:
    """The tokenizer folder of a run ``Config``: ``data.tokenizer``, else ``student.path`` (a converted model folder
    keeps its tokenizer beside the weights)."""
    path = config.data.tokenizer or config.student.path
    if not path:
        raise TokenizerError("no tokenizer: set data.tokenizer (or student.path to a model folder that holds one)")
    return Path(path)


def load_tokenizer(path: str | Path):
    """Load a local tokenizer folder (``tokenizer.model`` and/or ``tokenizer.json``) with ``<image>`` present.

    The pad id is forced to unk (0) as GeoChat trains; ``<image>`` is added when missing (a raw GeoChat/Vicuna
    tokenizer does not have it): callers then need ``len(tokenizer)`` embedding rows.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise TokenizerError(f"tokenizer folder {path} does not exist (give data.tokenizer or student.path)")
    if not (path / "tokenizer.model").is_file() and not (path / "tokenizer.json").is_file():
        raise TokenizerError(f"{path} has neither tokenizer.model nor tokenizer.json: not a tokenizer folder")
    tokenizer = AutoTokenizer.from_pretrained(str(path), legacy=True, local_files_only=True)
    if tokenizer.bos_token_id != BOS_ID or tokenizer.eos_token_id != EOS_ID or tokenizer.unk_token_id != UNK_ID:
        raise TokenizerError(f"{path}: expected LLaMA special ids unk 0, bos 1, eos 2; got unk "
                             f"{tokenizer.unk_token_id}, bos {tokenizer.bos_token_id}, eos {tokenizer.eos_token_id}")
    tokenizer.pad_token = tokenizer.unk_token
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        log.info("added %s to the tokenizer from %s as id %d", IMAGE_TOKEN, path, image_token_id(tokenizer))
    return tokenizer


def image_token_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def save_tokenizer(tokenizer, out_dir: str | Path, source_dir: str | Path | None = None) -> None:
    """Save for ``from_pretrained`` (``complete_tokenizer_folder`` then keeps GeoChat's tokenization and files)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    complete_tokenizer_folder(out_dir, source_dir)


def complete_tokenizer_folder(out_dir: str | Path, source_dir: str | Path | None = None) -> None:
    """After a transformers ``save_pretrained`` into ``out_dir``: mark the tokenizer legacy and copy
    ``tokenizer.model`` from ``source_dir`` (GeoChat's own code needs the file).

    transformers 5 does not write ``legacy`` back, and a plain ``AutoTokenizer.from_pretrained`` (what
    ``AutoProcessor`` calls) then loads the non-legacy behaviour: ``"</s>USER"`` becomes ``["</s>", "USER"]`` instead
    of GeoChat's ``["</s>", "▁USER"]``, so prompts would tokenize differently from training.
    """
    out_dir = Path(out_dir)
    config_file = out_dir / "tokenizer_config.json"
    settings = json.loads(config_file.read_text())
    settings["legacy"] = True
    config_file.write_text(json.dumps(settings, indent=2, ensure_ascii=False))
    if source_dir is not None and (Path(source_dir) / "tokenizer.model").is_file():
        shutil.copyfile(Path(source_dir) / "tokenizer.model", out_dir / "tokenizer.model")
