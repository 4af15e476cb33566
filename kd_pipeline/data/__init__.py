"""Training data: webdataset shards (the data_prep contract) -> padded batches, with exact mid-epoch resume.

Modules, in pipeline order: ``manifest`` (which shards), ``pipeline`` (the per-epoch webdataset stages and the
equal-steps arithmetic), ``samples`` (raw sample -> tokens + image; bad samples), ``images`` (decode and CLIP
preprocessing), ``collate`` (padding), ``state`` (the resume state and its rules), ``loaders`` (what recipes call).

Typical use in a recipe::

    state = load_loader_state(checkpoint_dir, "train")          # None on a fresh start
    loader = build_train_loader(cfg.data, tokenizer=tok, image_size=504, num_image_tokens=1296,
                                micro_batch_size=cfg.train.micro_batch_size, rank=rank, world_size=world,
                                seed=cfg.run.seed, state=state)
    for batch in loader: ...
    save_loader_state(checkpoint_dir, "train", rank, loader.state_dict())   # every rank, at every checkpoint
"""

from kd_pipeline.data.loaders import (EvalLoader, TrainLoader, build_eval_loader, build_eval_prompt_loader,
                                      build_prompt_loader, build_pt_loader, build_train_loader)
from kd_pipeline.data.state import LoaderState, LoaderStateError, load_loader_state, save_loader_state

__all__ = [
    "EvalLoader",
    "LoaderState",
    "LoaderStateError",
    "TrainLoader",
    "build_eval_loader",
    "build_eval_prompt_loader",
    "build_prompt_loader",
    "build_pt_loader",
    "build_train_loader",
    "load_loader_state",
    "save_loader_state",
]
