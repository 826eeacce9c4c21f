"""``torch.compile(..., backend="autodeploy", options={...})``: the options and the transforms they select.

``CompileOptions`` is validated like every config here (pydantic, ``extra="forbid"``: a typo fails loudly).
The transforms come from ``configs/default.yaml``: every transform of the stages that make sense on a graph
Dynamo captured from a model's own forward — ``post_export``, ``pattern_matcher``, ``quantization`` and
``fusion`` — and never one that needs the engine (``load_weights``, sharding, ``insert_cached_attention``,
``gather_logits``: the model keeps its own KV cache). ``options["transforms"]`` is merged over that section
(``{"match_rope": {"enabled": False}}``, ``{"fuse_rope": {"backend": "torch"}}``, or a user transform registered
with ``register_transform`` and given one of those stages).

With ``inductor=True`` every fusion transform with a ``backend`` field defaults to ``"torch"`` unless set: the
torch reference ops are then inlined into Inductor's graph, which generates its own fused kernels around them
(an opaque Triton op would stop that fusion). With ``inductor=False`` the transforms' own default applies
(``auto``: Triton on CUDA).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import build_config, load_default_dict
from ..errors import ConfigError
from ..transforms.base import Stage, Transform, TransformRegistry

#: stages the backend runs; the others need the engine (weights streamed in, paged KV cache, sharding)
COMPILE_STAGES = (Stage.POST_EXPORT, Stage.PATTERN_MATCHER, Stage.QUANTIZATION, Stage.FUSION)

Mode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


class CompileOptions(BaseModel):
    """What ``options={...}`` (and ``mode=``) of ``torch.compile`` may hold for this backend."""

    model_config = ConfigDict(extra="forbid")

    #: hand the transformed graph to Inductor (True) or run it as an FX graph (False)
    inductor: bool = True
    #: ``torch.compile``'s mode; ``reduce-overhead`` adds CUDA graphs (also with ``inductor=False``)
    mode: Mode | None = None
    #: quantize linears (``quantization`` stage transforms), as ``optimize(quantize=...)``
    quantize: Literal[None, "fp8", "int8_weight_only", "int4_weight_only"] = None
    #: merged over the ``transforms`` section of ``configs/default.yaml``
    transforms: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: extra Inductor config patches (``{"max_autotune": True}``), applied over ``mode``'s
    inductor_config: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def parse(cls, options: dict[str, Any] | CompileOptions | None, mode: str | None = None) -> CompileOptions:
        if isinstance(options, CompileOptions):
            parsed = options
        else:
            try:
                parsed = cls(**(options or {}))
            except ValidationError as e:
                fields = ", ".join(".".join(str(p) for p in err["loc"]) for err in e.errors())
                raise ConfigError(
                    f"invalid options for backend='autodeploy' ({fields}): {e}",
                    hint="known options: " + ", ".join(cls.model_fields),
                ) from e
        if mode is not None and mode != "default":
            parsed = parsed.model_copy(update={"mode": mode})
        return parsed

    @property
    def cuda_graphs(self) -> bool:
        return self.mode in ("reduce-overhead", "max-autotune")


def _default_transforms() -> dict[str, dict[str, Any]]:
    """The YAML's entries of the backend's stages, as written (``build_config`` fills in the flags later)."""
    stages = {s.value for s in COMPILE_STAGES}
    section = load_default_dict().get("transforms") or {}
    return {name: dict(raw or {}) for name, raw in section.items() if (raw or {}).get("stage") in stages}


def select_transforms(options: CompileOptions) -> list[Transform]:
    """The transforms the backend runs, in pipeline order, built from the defaults and ``options``."""
    from ..transforms import library  # noqa: F401  (registers the built-in transforms)

    section = _default_transforms()
    for name, raw in options.transforms.items():
        section[name] = {**section.get(name, {}), **raw}
    allowed = {s.value for s in COMPILE_STAGES}
    for name, raw in section.items():
        stage = raw.get("stage")
        if stage is None:
            raise ConfigError(f"transform {name!r} in options['transforms'] has no stage", hint="add 'stage': ...")
        if str(getattr(stage, "value", stage)) not in allowed:
            raise ConfigError(
                f"transform {name!r} (stage {stage}) cannot run in the torch.compile backend",
                hint=f"the backend runs the stages {sorted(allowed)}; the others need the autodeploy engine",
            )
    if options.inductor:
        for name, raw in section.items():
            if "backend" in TransformRegistry.get(name).config_class.model_fields:
                raw.setdefault("backend", "torch")
    config = build_config({"transforms": section, "quantize": options.quantize}, base={"transforms": {}})
    transforms = [TransformRegistry.get(name)(dict(raw)) for name, raw in config.transforms.items()]
    if options.quantize is not None and not any(
        t.config.stage == Stage.QUANTIZATION and t.config.enabled for t in transforms
    ):
        raise ConfigError(
            f"quantize={options.quantize!r} was asked but no quantization transform is enabled",
            hint="register one (stage: quantization) in configs/default.yaml or options['transforms']",
        )
    return sorted(transforms, key=lambda t: t.config.stage.order)
