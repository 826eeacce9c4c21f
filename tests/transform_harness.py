"""One harness for every transform (STYLE.md #6).

``check_transforms(model, ["cleanup_noop_ops", "match_rope"], present={op: count}, absent=[op, ...])``:

1. export the model (optionally with some export patches disabled, so hand-written forms stay in the graph);
2. eager == exported on fresh random inputs of a shape other than the export example;
3. run the named transforms with their default config (from ``configs/default.yaml``);
4. eager == transformed (atol/rtol), on two more input shapes;
5. every op in ``present`` appears exactly that many times, every op in ``absent`` is gone;
6. the transformed graph still re-exports with dynamic batch and sequence.

Returns the transformed ``GraphModule`` and the ``TransformInfo`` of each transform for further checks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch.export import Dim
from torch.fx import GraphModule

from autodeploy.config import ExportConfig, build_config
from autodeploy.export import export_causal_lm
from autodeploy.transforms import SharedContext, TransformInfo, TransformRegistry, get_history, run_transforms
from autodeploy.transforms.graph import find_nodes

SHAPES = [(2, 7), (1, 13), (3, 5)]


def random_inputs(batch: int, seq: int, vocab: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (batch, seq))
    pos = torch.arange(start, start + seq).expand(batch, seq).contiguous()
    return ids, pos


def eager_logits(model: torch.nn.Module, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, position_ids=pos, use_cache=False).logits


def make_transforms(names: Sequence[str], overrides: Mapping[str, dict] | None = None):
    from autodeploy.transforms import library  # noqa: F401

    defaults = build_config().transforms
    transforms = []
    for name in names:
        raw = dict(defaults.get(name, {"stage": "pattern_matcher"}))
        raw.update((overrides or {}).get(name, {}))
        transforms.append(TransformRegistry.get(name)(raw))
    return transforms


def count_op(gm: GraphModule, op) -> int:
    return len(find_nodes(gm, op))


def check_transforms(
    model: torch.nn.Module,
    transforms: Sequence[str],
    present: Mapping[object, int] | None = None,
    absent: Iterable[object] = (),
    *,
    disabled_patches: Sequence[str] = (),
    overrides: Mapping[str, dict] | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    reexport: bool = True,
    max_seq_len: int = 1 << 20,
) -> tuple[GraphModule, dict[str, TransformInfo]]:
    vocab = model.config.vocab_size
    gm = export_causal_lm(model, ExportConfig(disabled_patches=list(disabled_patches)), max_seq_len=max_seq_len)
    ids, pos = random_inputs(*SHAPES[0], vocab)
    torch.testing.assert_close(gm(ids, pos), eager_logits(model, ids, pos), atol=atol, rtol=rtol)

    gm = run_transforms(gm, make_transforms(transforms, overrides), SharedContext())
    for batch, seq in SHAPES[1:]:
        ids, pos = random_inputs(batch, seq, vocab)
        torch.testing.assert_close(gm(ids, pos), eager_logits(model, ids, pos), atol=atol, rtol=rtol)

    for op, expected in (present or {}).items():
        assert count_op(gm, op) == expected, f"{op}: {count_op(gm, op)} nodes, expected {expected}\n{gm.graph}"
    for op in absent:
        assert count_op(gm, op) == 0, f"{op} still in the graph after {transforms}"

    if reexport:
        batch, seq = Dim("batch", min=1, max=64), Dim("seq", min=1, max=256)
        ids, pos = random_inputs(2, 8, vocab)
        torch.export.export(gm, (ids, pos), dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}), strict=False)
    return gm, get_history(gm)
