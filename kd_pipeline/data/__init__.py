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

import importlib

# Re-exports, imported on first use (PEP 562): a light submodule such as ``kd_pipeline.data.images`` (imported by
# data_prep's shard workers) must not pull in torch through ``loaders``.
_EXPORTS = {
    "EvalLoader": "loaders",
    "TrainLoader": "loaders",
    "build_eval_loader": "loaders",
    "build_eval_prompt_loader": "loaders",
    "build_prompt_loader": "loaders",
    "build_pt_loader": "loaders",
    "build_train_loader": "loaders",
    "LoaderState": "state",
    "LoaderStateError": "state",
    "load_loader_state": "state",
    "save_loader_state": "state",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value
