"""One Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3, SmolLM2), configured from an HF config.json.

Module names are exactly those of transformers' `LlamaForCausalLM` (`model.embed_tokens`,
`model.layers.N.self_attn.q_proj`, `model.layers.N.mlp.gate_proj`, `model.norm`, `lm_head`), so
state-dict keys equal checkpoint keys and PEFT adapter keys map 1:1. Linear layers are plain
`nn.Linear`; the loader swaps in `NF4Linear` for quantized weights, so this file knows nothing of NF4.

Two ways to call `CausalLM.forward`:

- Training / scoring (`input_pos=None`): a plain causal forward over `tokens[B, T]`, no cache,
  autograd everywhere except through frozen weights. An optional `attention_mask[B, T]` (1 = real
  token) allows left padding. Set `model.gradient_checkpointing = True` to recompute each layer of
  `model.model.layers` (an `nn.ModuleList`) in the backward pass.
- With the static KV cache (`setup_cache(max_batch, max_seq)` first): `input_pos[B, T]` holds the
  absolute position of every token, per row, so rows of one batch can be at different lengths.
  Row b reads and writes cache slot `slots[b]` (default: slot b). A query at position p attends to
  cache positions 0..p of its slot. Entries beyond p are masked, but an additive mask does not
  protect against what they hold (0 x NaN = NaN, NaN + finfo.min = NaN): whoever reuses a slot for
  a new sequence clears what the last one wrote there first (`clear_cache`), then prefills from 0.
  `prefill(tokens, slot)` and `decode(tokens, slots, positions)` are the serving-engine shorthands.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from qformats.dtypes import known_dtype
from qformats.errors import QError
from qserve.recompute_stash import checkpoint_layer

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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In fp32, then back to the input dtype before the weight, as transformers does (one fused op in fp32).
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/signed_sin [B, T, D]. The rotate-half layout of HF checkpoints:
    `x * cos + cat(-x2, x1) * sin`, written as `cat(x2, x1) * cat(-sin1, sin2)` (the same values, one op less)."""
    half = x.shape[-1] // 2
    return x * cos.unsqueeze(1) + torch.cat((x[..., half:], x[..., :half]), dim=-1) * signed_sin.unsqueeze(1)


class KVCache(nn.Module):
    """Static per-layer cache: [max_batch, n_kv_heads, max_seq, head_dim] for keys and values; a row is a slot."""

    def __init__(self, max_batch: int, n_kv_heads: int, max_seq: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (max_batch, n_kv_heads, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: torch.Tensor | None, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_len: int | None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Write k/v [B, n_kv, T, D] at (slot, input_pos) and return the slots' caches [B, n_kv, kv_len, D]."""
        b, n_kv, _, d = k.shape
        rows = slots if slots is not None else torch.arange(b, device=k.device)
        # One index_copy_ into the flattened [slot * n_kv * max_seq, D] cache (row (slot, head, pos) of
        # entry [b, h, t]); on CPU it is ~100x faster than advanced-index assignment, which took ms per
        # layer in the serving engine's decode step (qserve/engine.py).
        heads = torch.arange(n_kv, device=k.device)
        flat = ((rows[:, None, None] * n_kv + heads[None, :, None]) * self.k.shape[2] + input_pos[:, None, :]).reshape(-1)
        self.k.view(-1, d).index_copy_(0, flat, k.reshape(-1, d))
        self.v.view(-1, d).index_copy_(0, flat, v.reshape(-1, d))
        keys, values = self.k, self.v
        if kv_len is not None:  # slice before gathering slots, so the copy is only as long as the sequences
            keys, values = keys[:, :, :kv_len], values[:, :, :kv_len]
        if slots is None:
            return keys[:b], values[:b]
        # index_select, not keys[slots]: on CPU advanced indexing of this strided view is ~100x slower
        # (ms per layer), which dominated the serving engine's decode step (qserve/engine.py).
        return keys.index_select(0, slots), values.index_select(0, slots)

    def clear(self, slot: int, end: int) -> None:
        """Zero positions [0, end) of one slot: masked-out zeros contribute exactly nothing to attention."""
        self.k[slot, :, :end].zero_()
        self.v[slot, :, :end].zero_()


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.sliding_window = args.sliding_window[layer_idx] if args.sliding_window else None
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(args.hidden_size, q_out, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.hidden_size, kv_out, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.hidden_size, kv_out, bias=args.qkv_bias)
        self.o_proj = nn.Linear(q_out, args.hidden_size, bias=args.o_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attn_mask: torch.Tensor | None,
                slots: torch.Tensor | None = None, input_pos: torch.Tensor | None = None,
                kv_len: int | None = None) -> torch.Tensor:  # fmt: skip
        """attn_mask: additive [B, 1, T, S], or None for plain causal attention (no cache)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if input_pos is not None:
            k, v = self.kv_cache.update(slots, input_pos, k, v, kv_len)
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(args, layer_idx)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, rope, attn_mask, slots=None, input_pos=None, kv_len=None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), rope, attn_mask, slots, input_pos, kv_len)
        return h + self.mlp(self.post_attention_layernorm(h))


class _Masks:
    """Additive attention masks [B, 1, T, S] built once per forward and shared by all layers.

    `key_pos <= query_pos` (and `query_pos - key_pos < window` for sliding layers) and, without a
    cache, key is a real token. None means "plain causal", which SDPA does without a mask tensor.
    """

    def __init__(self, query_pos: torch.Tensor | None, key_pos: torch.Tensor | None,
                 key_valid: torch.Tensor | None, dtype: torch.dtype):  # fmt: skip
        self.query_pos, self.key_pos, self.key_valid, self.dtype = query_pos, key_pos, key_valid, dtype
        self._cache: dict[int | None, torch.Tensor | None] = {}

    def for_window(self, window: int | None) -> torch.Tensor | None:
        if window not in self._cache:
            self._cache[window] = self._build(window)
        return self._cache[window]

    def _build(self, window: int | None) -> torch.Tensor | None:
        if self.query_pos is None and self.key_valid is None and window is None:
            return None
        qp, kp = self.query_pos[:, None, :, None], self.key_pos[:, None, None, :]
        allowed = kp <= qp
        if window is not None:
            allowed = allowed & (qp - kp < window)
        if self.key_valid is not None:
            allowed = allowed & self.key_valid[:, None, None, :].bool()
            # A left-padding query sees no key at all; let it see itself so softmax stays finite.
            allowed = allowed | torch.eye(allowed.shape[-1], dtype=torch.bool, device=allowed.device)
        zero = torch.zeros((), dtype=self.dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(self.dtype).min)


class Decoder(nn.Module):
    """transformers' `LlamaModel`: embeddings, the layers, the final norm."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # nn.Embedding's own init (normal_) on the meta device imports torch's Python decompositions
        # (~140 MB of resident memory for nothing: the loader overwrites the weight); initialise real tensors only.
        weight = torch.empty(args.vocab_size, args.hidden_size)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size, _weight=weight)
        if not weight.is_meta:
            nn.init.normal_(weight)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.gradient_checkpointing = False
        # On the CPU even when built on the meta device: torch's meta arange imports sympy (~140 MB resident).
        inv_freq, self.rope_scale = rope_inv_freq(args, "cpu")
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_rope(self, device: torch.device | str) -> None:
        """Recompute the rope frequencies on `device` (after building on the meta device)."""
        inv_freq, self.rope_scale = rope_inv_freq(self.args, device)
        self.inv_freq = inv_freq

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
                slots: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                kv_len: int | None = None) -> torch.Tensor:  # fmt: skip
        """Hidden states [B, T, hidden] after the final norm; see `CausalLM.forward` for the arguments."""
        b, t = tokens.shape
        x = self.embed_tokens(tokens).to(self.norm.weight.dtype)  # a no-op unless the table is 16-bit (embeddings16.py)
        if input_pos is not None:
            positions = input_pos
            s = kv_len or self.layers[0].self_attn.kv_cache.k.shape[2]
            masks = _Masks(input_pos, torch.arange(s, device=tokens.device).expand(b, s), None, x.dtype)
        elif attention_mask is not None:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            idx = torch.arange(t, device=tokens.device).expand(b, t)
            masks = _Masks(idx, idx, attention_mask, x.dtype)
        else:
            positions = torch.arange(t, device=tokens.device).expand(b, t)
            masks = _Masks(None, None, None, x.dtype)
            if any(w is not None for w in self.args.sliding_window):
                masks.query_pos = masks.key_pos = positions
        # cos/sin in fp32 from positions * inv_freq, then cast: the same arithmetic as transformers.
        freqs = positions[..., None].float() * self.inv_freq.float()
        cos, sin = (freqs.cos() * self.rope_scale).to(x.dtype), (freqs.sin() * self.rope_scale).to(x.dtype)
        rope = (torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1))
        for layer in self.layers:
            attn_mask = masks.for_window(layer.self_attn.sliding_window)
            if self.gradient_checkpointing and self.training and input_pos is None:
                x = checkpoint_layer(layer, x, rope, attn_mask)
            else:
                x = layer(x, rope, attn_mask, slots, input_pos, kv_len)
        return self.norm(x)


class CausalLM(nn.Module):
    """transformers' `LlamaForCausalLM` equivalent for every supported model_type."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Decoder(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.max_batch = self.max_seq = 0

    @property
    def gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        self.model.gradient_checkpointing = on

    def setup_cache(self, max_batch: int, max_seq: int, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> None:  # fmt: skip
        """Allocate the static KV cache: `max_batch` slots of `max_seq` positions each (zeros)."""
        if max_seq > self.args.max_position_embeddings:
            raise QError(f"a cache of {max_seq} positions exceeds the model's context of "
                         f"{self.args.max_position_embeddings}")  # fmt: skip
        ref = self.model.norm.weight  # the compute dtype (the embedding table may be held in 16 bits)
        dtype, device = dtype or ref.dtype, device or ref.device
        for layer in self.model.layers:
            a = layer.self_attn
            a.kv_cache = KVCache(max_batch, a.n_kv_heads, max_seq, a.head_dim, dtype, device)
        self.max_batch, self.max_seq = max_batch, max_seq

    def clear_cache(self, slot: int, end: int | None = None) -> None:
        """Zero cache positions [0, end) of `slot` (all of it by default) before a new sequence uses it, so
        nothing the previous one left there (NaN from a broken adapter included) can reach the new one."""
        for layer in self.model.layers:
            layer.self_attn.kv_cache.clear(slot, self.max_seq if end is None else end)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
                slots: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                logits_at: torch.Tensor | None = None, kv_len: int | None = None) -> torch.Tensor:  # fmt: skip
        """Logits [B, T, vocab] in the compute dtype (or [B, 1, vocab] with `logits_at`).

        tokens: int64 [B, T].
        input_pos: None for a plain causal forward without cache (training, scoring); else int64
            [B, T] absolute positions per row, which reads and writes the KV cache.
        slots: int64 [B], the cache slot of each row (default: row b uses slot b).
        attention_mask: [B, T], 1 for real tokens, 0 for padding; only without a cache (left padding).
        logits_at: int64 [B], the one position per row whose logits to compute (saves the lm_head
            matmul over a whole prompt); None computes all.
        kv_len: attend to the first kv_len cache positions only, an upper bound on max(input_pos)+1.
            A speed hint for eager decoding; leave None under torch.compile (static shapes).
        """
        if input_pos is not None and self.model.layers[0].self_attn.kv_cache is None:
            raise RuntimeError("call setup_cache() before a forward with input_pos")
        h = self.model(tokens, input_pos, slots, attention_mask, kv_len)
        if logits_at is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logits_at].unsqueeze(1)
        return self.lm_head(h)

    def prefill(self, tokens: torch.Tensor, slot: int) -> torch.Tensor:
        """Run one prompt `tokens[T]` into cache slot `slot` from position 0; logits [vocab] of its last token."""
        t = tokens.shape[-1]
        pos = torch.arange(t, device=tokens.device)[None]
        slots = torch.tensor([slot], device=tokens.device)
        return self(tokens.view(1, t), pos, slots, logits_at=torch.tensor([t - 1], device=tokens.device),
                    kv_len=t)[0, 0]  # fmt: skip

    def decode(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
               kv_len: int | None = None) -> torch.Tensor:  # fmt: skip
        """One step for B sequences: `tokens[B]` at `positions[B]` in cache `slots[B]`; logits [B, vocab]."""
        return self(tokens[:, None], positions[:, None], slots, kv_len=kv_len)[:, 0]
