"""``torch.export`` of a Hugging Face causal LM into the graph the transforms work on.

The result is a plain ``fx.GraphModule`` with the contract

    forward(input_ids [B, S] int64, position_ids [B, S] int64) -> logits [B, S, V]

with ``B`` and ``S`` dynamic, parameters and buffers as ``get_attr`` nodes under the model's own names (so
checkpoint keys address them directly) and ``meta["val"]`` fake tensors on every node. Export runs under the
patches of ``patches.py`` (attention and MoE experts routed to canonical ops) and with ``use_cache=False``.
"""

from __future__ import annotations

import inspect
import logging
import re
import time
import traceback

import torch
from torch.export import Dim
from torch.fx import GraphModule
from torch.fx.graph import CodeGen

from ..config import ExportConfig
from ..errors import AutoDeployError, ExportError
from .patches import apply_export_patches

logger = logging.getLogger("autodeploy.export")

EXPORT_META = "autodeploy_export"
_WRAPPED = "wrapped"


class _LogitsOnly(torch.nn.Module):
    """Calls the model with ``use_cache=False`` and returns only the logits tensor."""

    def __init__(self, model: torch.nn.Module, pass_position_ids: bool):
        super().__init__()
        setattr(self, _WRAPPED, model)
        self.pass_position_ids = pass_position_ids

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        kwargs = {"position_ids": position_ids} if self.pass_position_ids else {}
        out = getattr(self, _WRAPPED)(input_ids=input_ids, use_cache=False, **kwargs)
        return out.logits if hasattr(out, "logits") else out[0]


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _accepts_position_ids(model: torch.nn.Module) -> bool:
    return "position_ids" in inspect.signature(model.forward).parameters


def _user_frame(exc: BaseException) -> str | None:
    """The innermost frame of the failing trace that lies in model code (transformers or user code)."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if "/torch/" not in frame.filename and "/autodeploy/" not in frame.filename:
            return f"{frame.filename}:{frame.lineno} ({frame.name}): {frame.line}"
    text = str(exc)
    match = re.search(r'File "([^"]+)", line (\d+)', text)
    return f"{match.group(1)}:{match.group(2)}" if match else None


def _strip_wrapper(gm: GraphModule) -> GraphModule:
    """A plain GraphModule rooted at the HF model: get_attr targets lose the wrapper prefix, no pytree codegen."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module":  # export's `_guards_fn` input checks; shapes are guarded by our inputs
            graph.erase_node(node)
        elif node.op == "get_attr":
            node.target = node.target.removeprefix(f"{_WRAPPED}.")
    graph.set_codegen(CodeGen())
    (output,) = [n for n in graph.nodes if n.op == "output"]
    (result,) = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    output.args = (result,)
    new_gm = GraphModule(getattr(gm, _WRAPPED), graph)
    new_gm.meta.update(gm.meta)
    return new_gm


def _export(wrapper: torch.nn.Module, input_ids, position_ids, max_batch: int, max_seq: int):
    batch_dim = Dim("batch", min=1, max=max_batch)
    seq_dim = Dim("seq", min=1, max=max_seq)
    dynamic_shapes = ({0: batch_dim, 1: seq_dim}, {0: batch_dim, 1: seq_dim})
    return torch.export.export(wrapper, (input_ids, position_ids), dynamic_shapes=dynamic_shapes, strict=False)


def _excludes_only_upper_bound(exc: BaseException, max_seq: int) -> bool:
    """Export refused ``seq``'s range only because the model branches at ``seq == max_seq``.

    A model whose position table holds exactly ``max_seq`` rows (MPT's ALiBi bias, sliced from the end) guards
    ``seq != max_seq``. Exporting ``seq <= max_seq - 1`` then traces the same graph: the stripped graph keeps no
    guards, and the branch only chooses where a slice of that table starts, which pattern matching removes.
    """
    text = str(exc)
    if "Constraints violated (seq)" not in text:
        return False
    violations = [line for line in text.splitlines() if line.strip().startswith("- ")]
    return bool(violations) and all(f"!= {max_seq}" in line for line in violations)


def export_causal_lm(
    model: torch.nn.Module, config: ExportConfig | None = None, max_batch: int = 4096, max_seq_len: int = 1 << 20
) -> GraphModule:
    """Export ``model`` (a causal LM, real or on the meta device) to the graph contract above."""
    config = config or ExportConfig()
    model.eval()
    device = _model_device(model)
    b, s = config.example_batch, config.example_seq
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 2
    input_ids = torch.randint(0, vocab, (b, s), device=device)
    position_ids = torch.arange(s, device=device).expand(b, s).contiguous()
    wrapper = _LogitsOnly(model, _accepts_position_ids(model))
    name = type(model).__name__
    start = time.perf_counter()
    try:
        with torch.no_grad(), apply_export_patches(model, frozenset(config.disabled_patches)) as applied:
            max_seq = max(max_seq_len, s)
            try:
                program = _export(wrapper, input_ids, position_ids, max(max_batch, b), max_seq)
            except Exception as e:
                if not _excludes_only_upper_bound(e, max_seq) or max_seq - 1 < s:
                    raise
                logger.info("%s: seq == %d takes another branch; exporting seq < %d", name, max_seq, max_seq)
                program = _export(wrapper, input_ids, position_ids, max(max_batch, b), max_seq - 1)
    except AutoDeployError:
        raise
    except Exception as e:
        where = _user_frame(e)
        lines = str(e).strip().splitlines() or [type(e).__name__]
        first_line = lines[0]
        violations = [line.strip() for line in lines if line.strip().startswith("- ")]
        if "Constraints violated" in first_line and violations:  # say which constraint, not only that one was
            first_line = f"{first_line.split('!')[0]}: {violations[0].removeprefix('- ')}"
        raise ExportError(
            f"torch.export of {name} failed: {type(e).__name__}: {first_line}",
            where=where or name,
            hint="if the failing line branches on a tensor value or a shape, register an export patch for it "
            "(autodeploy.export.patches.register_export_patch); run with a different export.example_seq if the "
            "error names a specialised dimension",
        ) from e
    gm = _strip_wrapper(program.module())
    gm.meta[EXPORT_META] = {"model": name, "patches": applied, "time_s": time.perf_counter() - start}
    logger.info("exported %s in %.2fs (patches: %s)", name, gm.meta[EXPORT_META]["time_s"], ", ".join(applied))
    return gm
