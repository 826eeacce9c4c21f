"""``autodeploy::`` custom ops. Importing this package registers every op; see README.md for the table."""

from . import activation, attention, cached_attention, gated_mlp, moe, moe_router, quant_linear, rmsnorm, rope  # noqa: F401
