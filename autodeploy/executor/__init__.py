"""The executor: runs a compiled model on many requests at once.

Torch-free half (importable and testable without torch): ``sampling_params``, ``request``, ``block_manager``,
``scheduler``. Device half: ``kv_cache``, ``model_runner``, ``cuda_graphs``, the sampler and the engine.

This file imports nothing, so importing a torch-free submodule never pulls torch in.
"""
