"""Imports every built-in transform module so each registers itself by name."""

from . import cleanup_noop_ops  # noqa: F401
from . import gather_logits  # noqa: F401
from . import insert_cached_attention  # noqa: F401
from . import load_weights  # noqa: F401
from . import match_attention  # noqa: F401
from . import match_rope  # noqa: F401
from . import match_rmsnorm  # noqa: F401
from . import match_glu  # noqa: F401
from . import match_moe  # noqa: F401
from . import match_custom_patterns  # noqa: F401
from . import quantize_fp8_linear  # noqa: F401
from . import quantize_int8_linear  # noqa: F401
from . import quantize_int4_linear  # noqa: F401
from . import fuse_parallel_linears  # noqa: F401
from . import fuse_quant_linears  # noqa: F401
from . import fuse_glu  # noqa: F401
from . import fuse_add_rmsnorm  # noqa: F401
from . import fuse_rope  # noqa: F401
from . import fuse_moe  # noqa: F401
from . import fuse_moe_router  # noqa: F401
from . import gemv_linears  # noqa: F401
from . import detect_sharding  # noqa: F401
from . import shard_attention  # noqa: F401
from . import shard_mlp  # noqa: F401
from . import shard_moe  # noqa: F401
from . import shard_vocab  # noqa: F401
