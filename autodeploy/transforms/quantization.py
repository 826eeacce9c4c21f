"""What the ``quantize_*`` transforms share: the base class, which linears to quantize, and swapping them in.

A ``QuantizeLinear`` subclass names its format (``fmt``) and the top-level flag value that asks for it
(``flag``), and implements ``_quantize_site``. The base class decides whether to act:

- the checkpoint's own ``quantization_config`` (``models/quant_formats.py``) in this format: every linear the
  checkpoint stores quantized (its quantized tensor names exist; for random weights, the config's ignore
  list decides) becomes the quantized op, and its parameters are filled from the stored tensors, repacked;
- else ``quantize`` (the top-level flag, mapped into each transform's config by ``config.py``) equal to
  ``flag``: every linear except the LM head (``quantize_lm_head``), MoE routers (``quantize_router``: the
  linears behind a ``torch_moe``'s routing, kept as vLLM and llm-compressor keep them) and ``exclude`` patterns
  is quantized from its full-precision weight.

Weights already in memory are quantized on the spot. Weights still on the meta device (a checkpoint folder)
get meta parameters of the final shape and a load hook per checkpoint tensor (``models/weights.py``), so
each tensor is quantized or repacked as it streams in.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch.fx import GraphModule, Node

from ..custom_ops.kernel_backends import kernel_op
from ..errors import ConfigError
from ..models.quant_formats import CheckpointQuantization, checkpoint_quantization
from ..models.weights import WEIGHT_HOOKS_ATTR, checkpoint_tensor_names
from .base import KernelBackendConfig, SharedContext, Transform, TransformConfig, TransformInfo
from .graph import drop_unused_attributes, find_nodes, get_attr_value

aten = torch.ops.aten

QuantizeFlag = Literal[None, "fp8", "int8_weight_only", "int4_weight_only"]
WeightHook = Callable[[torch.Tensor], dict[str, torch.Tensor]]


class QuantizeLinearConfig(KernelBackendConfig):
    quantize: QuantizeFlag = None  # the top-level ``quantize`` flag (set by config.py)
    quantize_lm_head: bool = False
    quantize_router: bool = False  # MoE routers (the linears behind a torch_moe's routing) stay in full precision
    exclude: list[str] = []  # fnmatch patterns of module names left in full precision


@dataclass
class LinearSite:
    """One ``aten.linear`` with a parameter weight ``[N, K]`` owned by module ``module``."""

    node: Node
    module: str
    weight_key: str
    weight: torch.Tensor
    is_lm_head: bool
    is_router: bool = False

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def is_meta(self) -> bool:
        return self.weight.is_meta

    def key(self, attr: str) -> str:
        return f"{self.module}.{attr}" if self.module else attr


def _linears_behind(gm: GraphModule, starts: list[Node]) -> set[Node]:
    """Linears that feed ``starts`` without another linear in between."""
    found: set[Node] = set()
    seen: set[Node] = set()
    stack = list(starts)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_function" and node.target is aten.linear.default:
            found.add(node)
            continue
        stack.extend(node.all_input_nodes)
    return found


def _output_linears(gm: GraphModule) -> set[Node]:
    """The LM head: linears that produce the graph output without another linear in between."""
    return _linears_behind(gm, [n for n in gm.graph.nodes if n.op == "output"])


def _router_linears(gm: GraphModule) -> set[Node]:
    """MoE routers: linears that feed a ``torch_moe``'s expert ids or weights without another linear in between."""
    moes = find_nodes(gm, torch.ops.autodeploy.torch_moe)
    return _linears_behind(gm, [a for moe in moes for a in moe.args[1:3] if isinstance(a, Node)])


def linear_sites(gm: GraphModule) -> list[LinearSite]:
    """Linears whose weight is a 2-D parameter read by nothing else (tied embeddings stay unquantized)."""
    heads, routers = _output_linears(gm), _router_linears(gm)
    readers: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            readers[node.target] = readers.get(node.target, 0) + len(node.users)
    sites = []
    for node in find_nodes(gm, aten.linear.default):
        weight = node.args[1]
        if not isinstance(weight, Node) or weight.op != "get_attr" or readers.get(weight.target) != 1:
            continue
        tensor = get_attr_value(gm, weight)
        if tensor.dim() != 2:
            continue
        module, _, _ = weight.target.rpartition(".")
        sites.append(LinearSite(node, module, weight.target, tensor, node in heads, node in routers))
    return sites


def _bias(node: Node) -> Node | None:
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")


def swap_linear(
    gm: GraphModule,
    site: LinearSite,
    op: Any,
    params: dict[str, torch.Tensor],
    make_args: Callable[[Node, dict[str, Node], Node | None], tuple],
) -> Node:
    """Register ``params`` on the linear's module and replace the linear with ``op(*make_args(x, attrs, bias))``."""
    owner = gm.get_submodule(site.module) if site.module else gm
    for attr, tensor in params.items():
        if hasattr(owner, attr) and attr not in owner._parameters and attr not in owner._buffers:
            raise ConfigError(f"cannot add parameter {site.key(attr)!r}: the module already has that attribute")
        owner.register_parameter(attr, torch.nn.Parameter(tensor, requires_grad=False))
    graph = gm.graph
    node = site.node
    with graph.inserting_before(node):
        attrs = {attr: graph.get_attr(site.key(attr)) for attr in params}
        new = graph.call_function(op, make_args(node.args[0], attrs, _bias(node)))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def add_weight_hook(gm: GraphModule, key: str, hook: WeightHook) -> None:
    hooks = gm.__dict__.setdefault(WEIGHT_HOOKS_ATTR, {})
    if key in hooks:
        raise ConfigError(f"two weight-load hooks claim checkpoint tensor {key!r}")
    hooks[key] = hook


def meta(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def checkpoint_of(ctx: SharedContext) -> CheckpointQuantization | None:
    """The quantization the model's checkpoint (or config) declares, if any."""
    factory = ctx.factory
    if factory is None or factory.source.kind not in ("checkpoint", "config"):
        return None
    return checkpoint_quantization(factory.config)


class QuantizeLinear(Transform):
    """Base of ``quantize_fp8_linear``, ``quantize_int8_linear``, ``quantize_int4_linear``."""

    config_class: ClassVar[type[TransformConfig]] = QuantizeLinearConfig
    fmt: ClassVar[str] = ""
    flag: ClassVar[str] = ""
    reference_op: ClassVar[str] = ""

    def _stored_keys(self, ctx: SharedContext) -> set[str] | None:
        """Tensor names of the checkpoint folder (None when the weights are random)."""
        factory = ctx.factory
        if factory.source.kind != "checkpoint" or factory.random_weights:
            return None
        return checkpoint_tensor_names(factory.source.path)

    def _apply(self, gm: GraphModule, ctx: SharedContext) -> TransformInfo:
        ckpt = checkpoint_of(ctx)
        if ckpt is not None and ckpt.fmt != self.fmt:
            if self.config.quantize == self.flag:
                raise ConfigError(
                    f"quantize={self.flag!r} asked for a checkpoint already quantized as {ckpt.fmt} ({ckpt.method})",
                    hint="drop the quantize option: the checkpoint's own quantization is used",
                )
            return TransformInfo(skipped=True)
        if ckpt is None and self.config.quantize != self.flag:
            return TransformInfo(skipped=True)
        if ckpt is not None:
            stored = self._stored_keys(ctx)
            chosen = [s for s in linear_sites(gm) if self._in_checkpoint(s, ckpt, stored)]
        else:
            chosen = [s for s in linear_sites(gm) if self._wanted(s)]
        op = kernel_op(self.reference_op, self.config.backend, ctx.device)
        for site in chosen:
            self._quantize_site(gm, site, op, ctx, ckpt)
        if chosen:
            gm.graph.eliminate_dead_code()  # the replaced weights' get_attr nodes, so their parameters can go
            drop_unused_attributes(gm)
        details = {"source": ckpt.method if ckpt else "flag", "op": str(op), "modules": [s.module for s in chosen[:3]]}
        return TransformInfo(num_matches=len(chosen), details=details)

    def _wanted(self, site: LinearSite) -> bool:
        if site.is_lm_head and not self.config.quantize_lm_head:
            return False
        if site.is_router and not self.config.quantize_router:
            return False
        return not any(fnmatch.fnmatch(site.module, p) for p in self.config.exclude)

    def _in_checkpoint(self, site: LinearSite, ckpt: CheckpointQuantization, stored: set[str] | None) -> bool:
        if stored is not None:
            return site.key(self._stored_marker(ckpt)) in stored
        return not site.is_lm_head and not ckpt.ignores(site.module)

    def _stored_marker(self, ckpt: CheckpointQuantization) -> str:
        """The tensor whose presence in the checkpoint marks a linear as stored quantized."""
        raise NotImplementedError

    def _quantize_site(
        self, gm: GraphModule, site: LinearSite, op: Any, ctx: SharedContext, ckpt: CheckpointQuantization | None
    ) -> None:
        raise NotImplementedError
