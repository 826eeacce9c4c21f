"""Typed errors a user can act on.

Every error says what failed, where (model, transform, node) and what to try. Nothing in autodeploy raises a
bare ``AssertionError`` or ``RuntimeError`` for a condition the user can cause.
"""

from __future__ import annotations


class AutoDeployError(Exception):
    """Base class of every error autodeploy raises on purpose."""

    def __init__(self, what: str, *, where: str | None = None, hint: str | None = None):
        self.what = what
        self.where = where
        self.hint = hint
        parts = [what]
        if where:
            parts.append(f"(at {where})")
        msg = " ".join(parts)
        if hint:
            msg += f"\n  What to try: {hint}"
        super().__init__(msg)


class ConfigError(AutoDeployError, ValueError):
    """An invalid configuration value or an unknown transform name."""


class UnsupportedArchitectureError(AutoDeployError):
    """The model has a part autodeploy cannot run (e.g. a recurrent/state-space layer)."""


class NotDecoderOnlyTextError(UnsupportedArchitectureError):
    """The model is not a decoder-only text model (encoder-decoder, encoder-only or multimodal)."""


class ModelLoadError(AutoDeployError):
    """The model source (folder, config, GGUF file) could not be read."""


class ExportError(AutoDeployError):
    """``torch.export`` of the model failed."""


class TransformError(AutoDeployError):
    """A graph transform failed or left the graph in an invalid state."""


class VerificationError(AutoDeployError):
    """A transform changed the model's outputs beyond tolerance (``inspect --verify``)."""


class RequestError(AutoDeployError, ValueError):
    """An invalid request: bad sampling values, an empty prompt, a prompt longer than the context."""


class PromptTooLongError(RequestError):
    """The prompt (plus at least one generated token) does not fit in the model's context."""


class KVCacheExhaustedError(AutoDeployError):
    """A single request needs more KV-cache blocks than the whole pool holds."""


class RequestAbortedError(AutoDeployError):
    """The request was aborted (client disconnect or explicit cancel)."""


class DistributedError(AutoDeployError):
    """Tensor-parallel ranks could not start, lost each other, or could not agree."""


class WorkerError(DistributedError):
    """A tensor-parallel rank other than 0 failed; ``rank``, ``error_type`` and ``remote_traceback`` say how."""

    def __init__(
        self,
        what: str,
        *,
        rank: int,
        error_type: str,
        remote_traceback: str = "",
        where: str | None = None,
        hint: str | None = None,
    ):
        self.rank = rank
        self.error_type = error_type
        self.remote_traceback = remote_traceback
        super().__init__(what, where=where, hint=hint)
