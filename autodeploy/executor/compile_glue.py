"""``torch.compile`` of the cached graph's glue (the optional last step of the compile stage).

The ``autodeploy::`` ops stay opaque to Dynamo (their fake kernels give the shapes), so Inductor fuses only
what lies between them: embedding gathers, views, casts, adds and whatever no fusion transform claimed. The
token dimension is marked dynamic, so one compiled graph serves every step size; CUDA-graph capture then
records the compiled code like the eager graph. Off by default: compilation adds tens of seconds to
``optimize`` and the fusion transforms already cover the hot elementwise work.
"""

from __future__ import annotations

import logging

import torch
from torch.fx import GraphModule

from ..config import TorchCompileConfig

logger = logging.getLogger("autodeploy.executor")


def compile_glue(gm: GraphModule, config: TorchCompileConfig) -> torch.nn.Module:
    """``gm`` compiled with ``config.backend`` (``inductor``, or ``aot_eager`` where no compiler is present)."""
    logger.info("torch.compile of the graph glue (backend=%s, mode=%s)", config.backend, config.mode)
    kwargs = {"mode": config.mode} if config.backend == "inductor" and config.mode else {}
    return torch.compile(gm, backend=config.backend, dynamic=True, fullgraph=True, **kwargs)
