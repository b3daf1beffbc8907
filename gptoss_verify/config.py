"""`ModelSpec`: every architectural number of a GPT-OSS model, its presets and its config loaders.

One frozen dataclass is the single source of the shapes that the model, the oracle, the weight
generator and the checkpoint layouts all read. Defaults are the published gpt-oss-20b values
(docs/layouts.md §1); validation names the bad field so that a wrong config fails before any tensor exists.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config that cannot describe a GPT-OSS model; the message names the field."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    num_layers: int = 24
    num_heads: int = 64
    num_kv_heads: int = 8
    head_dim: int = 64
    num_experts: int = 32
    experts_per_token: int = 4
    sliding_window: int = 128
    rope_theta: float = 150000.0
    rope_factor: float = 32.0
    rope_original_max_position: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_truncate: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    name: str = "custom"

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived numbers -------------------------------------------------------------------
    @property
    def q_per_kv(self) -> int:
        """GQA group size: query head h reads kv head h // q_per_kv."""
        return self.num_heads // self.num_kv_heads

    @property
    def concentration(self) -> float:
        """YaRN attention factor multiplied into cos and sin: 0.1·ln(factor) + 1 (1 without scaling)."""
        return 0.1 * math.log(self.rope_factor) + 1.0 if self.rope_factor > 1.0 else 1.0

    def is_sliding(self, layer: int) -> bool:
        """Even global layer indices use the sliding window, odd ones full causal attention."""
        return layer % 2 == 0

    def window_of(self, layer: int) -> int | None:
        return self.sliding_window if self.is_sliding(layer) else None

    @property
    def layer_types(self) -> list[str]:
        return ["sliding_attention" if self.is_sliding(i) else "full_attention" for i in range(self.num_layers)]

    def with_layers(self, n: int) -> "ModelSpec":
        """The same architecture at full width with only `n` layers (for checking big shapes on one GPU)."""
        return dataclasses.replace(self, num_layers=n)

    def replace(self, **changes: Any) -> "ModelSpec":
        return dataclasses.replace(self, **changes)

    # ---- validation ------------------------------------------------------------------------
    def validate(self) -> None:
        positive = ["vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "num_experts", "experts_per_token", "sliding_window",
                    "rope_original_max_position", "max_position_embeddings"]
        for field in positive:
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{field}: expected a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads: expected a multiple of num_kv_heads={self.num_kv_heads}, "
                              f"got {self.num_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim: expected an even number (RoPE rotates pairs), got {self.head_dim}")
        if self.experts_per_token > self.num_experts:
            raise ConfigError(f"experts_per_token: expected at most num_experts={self.num_experts}, "
                              f"got {self.experts_per_token}")
        for field in ["rope_theta", "rope_factor", "swiglu_alpha", "swiglu_limit", "rms_norm_eps"]:
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 \
                    or not math.isfinite(value):
                raise ConfigError(f"{field}: expected a positive finite number, got {value!r}")
        for field in ["rope_beta_fast", "rope_beta_slow"]:
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ConfigError(f"{field}: expected a finite number, got {value!r}")
        if not isinstance(self.rope_truncate, bool):
            raise ConfigError(f"rope_truncate: expected true or false, got {self.rope_truncate!r}")
        if not isinstance(self.name, str):
            raise ConfigError(f"name: expected a string, got {self.name!r}")
        if self.rope_factor < 1.0:
            raise ConfigError(f"rope_factor: expected >= 1, got {self.rope_factor}")
        if self.rope_beta_fast <= self.rope_beta_slow:
            raise ConfigError(f"rope_beta_fast: expected > rope_beta_slow={self.rope_beta_slow}, "
                              f"got {self.rope_beta_fast}")

    # ---- HF config.json --------------------------------------------------------------------
    def to_hf_config(self, mxfp4: bool = False) -> dict[str, Any]:
        """The published `config.json` field set (docs/layouts.md §1), with `truncate` always written."""
        cfg: dict[str, Any] = {
            "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
            "experts_per_token": self.experts_per_token,
            "head_dim": self.head_dim, "hidden_act": "silu", "hidden_size": self.hidden_size,
            "initial_context_length": self.rope_original_max_position, "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size, "layer_types": self.layer_types,
            "max_position_embeddings": self.max_position_embeddings, "model_type": "gpt_oss",
            "num_attention_heads": self.num_heads, "num_experts_per_tok": self.experts_per_token,
            "num_hidden_layers": self.num_layers, "num_key_value_heads": self.num_kv_heads,
            "num_local_experts": self.num_experts, "output_router_logits": False,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": {"beta_fast": self.rope_beta_fast, "beta_slow": self.rope_beta_slow,
                             "factor": self.rope_factor,
                             "original_max_position_embeddings": self.rope_original_max_position,
                             "rope_type": "yarn", "truncate": self.rope_truncate},
            "rope_theta": self.rope_theta, "router_aux_loss_coef": 0.9,
            "sliding_window": self.sliding_window, "swiglu_limit": self.swiglu_limit,
            "tie_word_embeddings": False, "use_cache": True, "vocab_size": self.vocab_size,
        }
        if self.vocab_size > 200002:  # the published tokenizer's ids; a toy vocabulary has none
            cfg.update(eos_token_id=200002, pad_token_id=199999)
        if self.swiglu_alpha != 1.702:
            cfg["swiglu_alpha"] = self.swiglu_alpha
        if mxfp4:
            cfg["quantization_config"] = {
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"],
                "quant_method": "mxfp4"}
        return cfg

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any] | str | Path, name: str = "hf-config") -> "ModelSpec":
        """Read a transformers `config.json`. A missing `truncate` is read as transformers reads it
        (True), because that is what the checkpoint's users get; a warning-worthy trap (docs/numerics.md §4)."""
        cfg = _load_json(cfg)
        _require(cfg, ["hidden_size", "num_hidden_layers", "num_attention_heads"], "HF config.json")
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"rope_scaling: expected an object, got {rope!r}")
        layer_types = cfg.get("layer_types")
        spec = cls(
            vocab_size=cfg.get("vocab_size", 201088), hidden_size=cfg["hidden_size"],
            intermediate_size=cfg.get("intermediate_size", 2880), num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"], num_kv_heads=cfg.get("num_key_value_heads", 8),
            head_dim=cfg.get("head_dim", 64),
            num_experts=cfg.get("num_local_experts", cfg.get("num_experts", 128)),
            experts_per_token=cfg.get("num_experts_per_tok", cfg.get("experts_per_token", 4)),
            sliding_window=cfg.get("sliding_window", 128),
            rope_theta=_number(cfg.get("rope_theta", rope.get("rope_theta", 150000.0)), "rope_theta"),
            rope_factor=_number(rope.get("factor", 1.0), "factor") if rope.get("rope_type", "yarn") == "yarn" else 1.0,
            rope_original_max_position=_integer(rope.get("original_max_position_embeddings",
                                                         cfg.get("initial_context_length", 4096)),
                                                "original_max_position_embeddings"),
            rope_beta_fast=_number(rope.get("beta_fast", 32.0), "beta_fast"),
            rope_beta_slow=_number(rope.get("beta_slow", 1.0), "beta_slow"),
            rope_truncate=_flag(rope.get("truncate", True), "truncate"),
            swiglu_alpha=_number(cfg.get("swiglu_alpha", 1.702), "swiglu_alpha"),
            swiglu_limit=_number(cfg.get("swiglu_limit", 7.0), "swiglu_limit"),
            rms_norm_eps=_number(cfg.get("rms_norm_eps", 1e-5), "rms_norm_eps"),
            max_position_embeddings=cfg.get("max_position_embeddings", 131072), name=name)
        if isinstance(layer_types, list) and len(layer_types) != spec.num_layers:
            raise ConfigError(f"layer_types: expected one entry per layer ({spec.num_layers}, num_hidden_layers), "
                              f"got {len(layer_types)}")
        if layer_types is not None and (not isinstance(layer_types, list) or layer_types != spec.layer_types):
            shown = layer_types[:4] if isinstance(layer_types, list) else layer_types
            raise ConfigError("layer_types: expected even layers sliding and odd layers full "
                              f"({spec.layer_types[:2]}...), got {shown!r}...")
        return spec

    # ---- OpenAI original config.json -------------------------------------------------------
    def to_openai_config(self) -> dict[str, Any]:
        return {"num_hidden_layers": self.num_layers, "num_experts": self.num_experts,
                "experts_per_token": self.experts_per_token, "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                "swiglu_limit": self.swiglu_limit, "head_dim": self.head_dim,
                "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
                "sliding_window": self.sliding_window,
                "initial_context_length": self.rope_original_max_position,
                "rope_theta": self.rope_theta, "rope_scaling_factor": self.rope_factor,
                "rope_ntk_alpha": self.rope_beta_slow, "rope_ntk_beta": self.rope_beta_fast}

    @classmethod
    def from_openai_config(cls, cfg: dict[str, Any] | str | Path, name: str = "openai-config") -> "ModelSpec":
        """Read OpenAI's original `config.json` (docs/layouts.md §1 mapping; the original never truncates)."""
        cfg = _load_json(cfg)
        keys = ["num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size",
                "intermediate_size", "head_dim", "num_attention_heads", "num_key_value_heads",
                "sliding_window"]
        _require(cfg, keys, "OpenAI config.json")
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"], num_kv_heads=cfg["num_key_value_heads"],
            head_dim=cfg["head_dim"], num_experts=cfg["num_experts"],
            experts_per_token=cfg["experts_per_token"], sliding_window=cfg["sliding_window"],
            rope_theta=_number(cfg.get("rope_theta", 150000.0), "rope_theta"),
            rope_factor=_number(cfg.get("rope_scaling_factor", 32.0), "rope_scaling_factor"),
            rope_original_max_position=_integer(cfg.get("initial_context_length", 4096), "initial_context_length"),
            rope_beta_fast=_number(cfg.get("rope_ntk_beta", 32.0), "rope_ntk_beta"),
            rope_beta_slow=_number(cfg.get("rope_ntk_alpha", 1.0), "rope_ntk_alpha"), rope_truncate=False,
            swiglu_limit=_number(cfg.get("swiglu_limit", 7.0), "swiglu_limit"), name=name)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelSpec":
        if not isinstance(data, dict):
            raise ConfigError(f"spec: expected an object, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(f"{unknown[0]!r}: unknown ModelSpec field")
        return cls(**data)


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`object_pairs_hook` of the JSON we read: a key given twice is refused (Python keeps the last
    value, other readers the first, so the file means two things)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"field {key!r} appears twice")
        out[key] = value
    return out


def _load_json(cfg: dict[str, Any] | str | Path) -> dict[str, Any]:
    if isinstance(cfg, dict):
        return cfg
    path = Path(cfg)
    try:
        cfg = json.loads(path.read_text(), object_pairs_hook=unique_keys)
    except FileNotFoundError:
        raise ConfigError("config file not found") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, a key given twice
        raise ConfigError(f"not valid JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _number(value: Any, key: str) -> float:
    """A config field that must be a number (the range is ModelSpec's to check)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    return float(value)


def _integer(value: Any, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    return value


def _flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _require(cfg: dict[str, Any], keys: list[str], what: str) -> None:
    for key in keys:
        if key not in cfg:
            raise ConfigError(f"{key}: missing from {what}")


PRESETS: dict[str, ModelSpec] = {
    # Small but with every feature that matters: GQA 4:1, top-4 of 8 experts, H != I (a missing
    # transpose fails), a window of 16 shorter than the default sequence, head_dim 16, widths that
    # are multiples of 32 (MXFP4 blocks), and the real YaRN numbers (original context 4096).
    "tiny": ModelSpec(vocab_size=384, hidden_size=64, intermediate_size=96, num_layers=4, num_heads=8,
                      num_kv_heads=2, head_dim=16, num_experts=8, experts_per_token=4,
                      sliding_window=16, name="tiny"),
    "gpt-oss-20b": ModelSpec(name="gpt-oss-20b"),
    "gpt-oss-120b": ModelSpec(num_layers=36, num_experts=128, name="gpt-oss-120b"),
}


# Small shapes other than `tiny` that tests and goldens share: square H = I as in the real models
# with GQA 8:1, top-2 of 16 experts and head_dim 32; and no GQA, 3 layers, top-3 of 5, window 5.
TINY_VARIANTS: dict[str, ModelSpec] = {
    "tiny": PRESETS["tiny"],
    "square": PRESETS["tiny"].replace(hidden_size=96, intermediate_size=96, num_heads=8, num_kv_heads=1,
                                      head_dim=32, num_experts=16, experts_per_token=2, sliding_window=8,
                                      name="square"),
    "mha": PRESETS["tiny"].replace(num_layers=3, num_heads=4, num_kv_heads=4, num_experts=5, experts_per_token=3,
                                   sliding_window=5, name="mha"),
}


def preset(name: str) -> ModelSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}") from None
