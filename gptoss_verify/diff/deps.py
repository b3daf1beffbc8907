"""Everything this package takes from the rest of gptoss_verify, imported here and nowhere else.

The diff reads checkpoints through the layouts' public API (detection, config readers, name
tables, the safetensors reader, the MXFP4 codec) and runs the consequence through our model's
decoder layer and trace. One place for those imports keeps the package's seams visible: when a
module moves, this file is the only one to re-point.
"""
from __future__ import annotations

from ..config import ConfigError, ModelSpec  # noqa: F401
from ..formats import layout as layouts  # noqa: F401
from ..formats import openai as openai_layout  # noqa: F401
from ..formats.canonical import canonical_table  # noqa: F401
from ..formats.errors import CheckpointError  # noqa: F401
from ..formats.megatron import mapping as megatron_mapping  # noqa: F401
from ..formats.mxfp4 import SCALE_BIAS, from_hf_dense, to_hf_dense  # noqa: F401
from ..formats.safetensors_io import SafetensorsDir, dtype_code  # noqa: F401
from ..formats.validate import table_violations  # noqa: F401
from ..backends import block_functions  # noqa: F401
from ..model.model import DecoderLayer  # noqa: F401
from ..model.norm import rms_norm  # noqa: F401
from ..model.rope import cos_sin  # noqa: F401
from ..schema import LAYER_TENSORS, is_expert_weight  # noqa: F401
from ..trace import LAYER_POINTS, Trace, layer_name  # noqa: F401
from ..report import environment, table  # noqa: F401
