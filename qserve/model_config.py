"""The architecture of a Llama-family model, read from an HF config.json, and its rope frequencies.

`ModelArgs.from_config` accepts config.json as transformers 4.x or 5.x writes it and refuses, with one
line naming the file and field, what `qserve.model` cannot run. `rope_inv_freq` computes the
inverse frequencies as transformers' ROPE_INIT_FUNCTIONS do (default, linear, llama3, yarn).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from qformats.dtypes import known_dtype
from qformats.errors import QError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int | None = None  # llama3, yarn
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn


@dataclass
class ModelArgs:
    """The architecture, read from config.json as transformers 4.x or 5.x writes it."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before rope
    rope: RopeConfig = field(default_factory=RopeConfig)
    sliding_window: list[int | None] = field(default_factory=list)  # per layer, None = full attention
    dtype: torch.dtype | None = None  # the checkpoint's dtype, if config.json says

    @classmethod
    def from_config(cls, cfg: dict, name: str = "config.json") -> ModelArgs:
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise QError(f"{name}: model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3, SmolLM2)")  # fmt: skip
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise QError(f"{name}: hidden_act {act!r} is not supported, only silu")
        try:
            hidden, n_heads, n_layers = int(cfg["hidden_size"]), int(cfg["num_attention_heads"]), int(cfg["num_hidden_layers"])
            args = cls(
                model_type=model_type,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=n_layers,
                num_attention_heads=n_heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or n_heads),
                head_dim=int(cfg.get("head_dim") or hidden // n_heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            )
        except KeyError as e:
            raise QError(f"{name}: missing field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise QError(f"{name}: unreadable field ({e})") from None
        if model_type == "llama":
            args.qkv_bias = args.o_bias = bool(cfg.get("attention_bias", False))
            args.mlp_bias = bool(cfg.get("mlp_bias", False))
        elif model_type == "qwen2":
            args.qkv_bias = True  # Qwen2 always has q/k/v biases and none on o_proj
        elif model_type == "qwen3":
            args.qkv_bias = args.o_bias = bool(cfg.get("attention_bias", False))
            args.qk_norm = True
        if args.num_attention_heads % args.num_key_value_heads:
            raise QError(f"{name}: num_attention_heads {n_heads} is not a multiple of "
                         f"num_key_value_heads {args.num_key_value_heads}")  # fmt: skip
        args.rope = _read_rope(cfg, args.max_position_embeddings, name)
        args.sliding_window = _read_sliding_window(cfg, model_type, n_layers)
        args.dtype = known_dtype(cfg.get("dtype") or cfg.get("torch_dtype"))
        return args


def _read_rope(cfg: dict, max_pos: int, name: str) -> RopeConfig:
    # transformers 5.x: rope_parameters = {"rope_type", "rope_theta", ...}; 4.x: rope_theta + rope_scaling.
    params = dict(cfg.get("rope_scaling") or {})
    params.update(cfg.get("rope_parameters") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise QError(f"{name}: rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope = RopeConfig(theta=float(theta), type=rope_type)
    if rope_type != "default":
        rope.factor = float(params.get("factor", 1.0) or 1.0)
    if rope_type in ("llama3", "yarn"):
        rope.original_max_position_embeddings = int(
            cfg.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") or max_pos
        )
    if rope_type == "llama3":
        rope.low_freq_factor = float(params["low_freq_factor"])
        rope.high_freq_factor = float(params["high_freq_factor"])
    if rope_type == "yarn":
        rope.beta_fast = float(params.get("beta_fast") or 32)
        rope.beta_slow = float(params.get("beta_slow") or 1)
        rope.attention_factor = params.get("attention_factor")
        rope.mscale, rope.mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        rope.truncate = bool(params.get("truncate", True))
        if params.get("factor") is None:
            rope.factor = max_pos / rope.original_max_position_embeddings
    return rope


def _read_sliding_window(cfg: dict, model_type: str, n_layers: int) -> list[int | None]:
    window = cfg.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
        window = None
    if window is None:
        return [None] * n_layers
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        if model_type == "mistral":
            layer_types = ["sliding_attention"] * n_layers
        else:
            first = int(cfg.get("max_window_layers", 28))
            layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    return [int(window) if t == "sliding_attention" else None for t in layer_types]


def rope_inv_freq(args: ModelArgs, device: torch.device | str | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] and the cos/sin scale, as transformers' ROPE_INIT_FUNCTIONS compute them."""
    r, dim = args.rope, args.head_dim
    inv_freq = 1.0 / (r.theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    scale = 1.0
    if r.type == "linear":
        inv_freq = inv_freq / r.factor
    elif r.type == "llama3":
        old_len = r.original_max_position_embeddings
        low_wavelen, high_wavelen = old_len / r.low_freq_factor, old_len / r.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / r.factor, inv_freq)
        smooth = (old_len / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
        smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif r.type == "yarn":
        inv_freq, scale = _yarn(r, dim, device)
    return inv_freq, scale


def _yarn(r: RopeConfig, dim: int, device) -> tuple[torch.Tensor, float]:
    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    scale = r.attention_factor
    if scale is None:
        if r.mscale and r.mscale_all_dim:
            scale = get_mscale(r.factor, r.mscale) / get_mscale(r.factor, r.mscale_all_dim)
        else:
            scale = get_mscale(r.factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(r.original_max_position_embeddings / (rotations * 2 * math.pi))) / (2 * math.log(r.theta))

    low, high = correction_dim(r.beta_fast), correction_dim(r.beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = r.theta ** (torch.arange(0, dim, 2, device=device).float() / dim)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (r.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(scale)
