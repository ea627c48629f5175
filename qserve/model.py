"""One Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3, SmolLM2), configured from an HF config.json.

Module names are exactly those of transformers' `LlamaForCausalLM` (`model.embed_tokens`,
`model.layers.N.self_attn.q_proj`, `model.layers.N.mlp.gate_proj`, `model.norm`, `lm_head`), so
state-dict keys equal checkpoint keys and PEFT adapter keys map 1:1. Linear layers are plain
`nn.Linear`; the loader swaps in `NF4Linear` for quantized weights, so this file knows nothing of NF4.

The head is the model's: `hidden(...)` (decoder output after the final norm), `logits(hidden, rows)`
(fp32, the one place the output layer is applied) and `loss(tokens, labels, normalizer)` (the fused,
chunked cross-entropy of qserve/lm_loss.py); engine, generation, eval, training and export call these.
Two ways to run the decoder (`hidden`, or `forward` for logits of every position):

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
  `prefill(prompts, slots)` and `decode(tokens, positions, slots)` are the steps of the one decode loop
  (qserve/engine.py; qserve/generate.py runs the same steps); on CPU in fp32 `decode` runs the layers
  through the fused ops of qkernels/cpu_decode.cpp, or all of them in one C++ call where they are
  plain NF4 linears (qkernels/cpu_decode_stack.cpp; `Decoder.decode_fused`); `compile_decode()`
  compiles the decode step.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qformats.errors import QError
from qkernels import cpu
from qkernels.ops import add_rms_norm_, decode_attention, decode_ops_available
from qserve.lm_loss import IGNORE, linear_cross_entropy, shifted_targets
from qserve.model_config import ModelArgs, rope_inv_freq
from qserve.nf4_linear import LinearsOfOneInput
from qserve.recompute_stash import checkpoint_layer


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
        # entry [b, h, t]); on CPU advanced-index assignment is far slower and dominated the serving
        # engine's decode step (qserve/engine.py).
        heads = torch.arange(n_kv, device=k.device)
        flat = ((rows[:, None, None] * n_kv + heads[None, :, None]) * self.k.shape[2] + input_pos[:, None, :]).reshape(-1)
        self.k.view(-1, d).index_copy_(0, flat, k.reshape(-1, d))
        self.v.view(-1, d).index_copy_(0, flat, v.reshape(-1, d))
        keys, values = self.k, self.v
        if kv_len is not None:  # slice before gathering slots, so the copy is only as long as the sequences
            keys, values = keys[:, :, :kv_len], values[:, :, :kv_len]
        if slots is None:
            return keys[:b], values[:b]
        # index_select, not keys[slots]: on CPU advanced indexing of this strided view is far slower,
        # which dominated the serving engine's decode step (qserve/engine.py).
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
        # (much resident memory for nothing: the loader overwrites the weight); initialise real tensors only.
        weight = torch.empty(args.vocab_size, args.hidden_size)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size, _weight=weight)
        if not weight.is_meta:
            nn.init.normal_(weight)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.gradient_checkpointing = False
        # On the CPU even when built on the meta device: torch's meta arange imports sympy (much resident memory).
        inv_freq, self.rope_scale = rope_inv_freq(args, "cpu")
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.rope_table: torch.Tensor | None = None  # set by prepare_fused_decode
        self.row_ids: torch.Tensor | None = None
        self._fused: tuple[list[_FusedLayer], tuple, object | None] | None = None  # see _fused_layers

    def rope_cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos and sin [..., head_dim / 2] of positions [...] times each frequency, scaled: the same
        arithmetic as transformers."""
        freqs = positions[..., None].float() * self.inv_freq.float()
        return freqs.cos() * self.rope_scale, freqs.sin() * self.rope_scale

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
        cos, sin = (t.to(x.dtype) for t in self.rope_cos_sin(positions))
        rope = (torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1))
        for layer in self.layers:
            attn_mask = masks.for_window(layer.self_attn.sliding_window)
            if self.gradient_checkpointing and self.training and input_pos is None:
                x = checkpoint_layer(layer, x, rope, attn_mask)
            else:
                x = layer(x, rope, attn_mask, slots, input_pos, kv_len)
        return self.norm(x)

    def prepare_fused_decode(self, max_batch: int, max_seq: int) -> None:
        """Set up `decode_fused` for a cache of max_batch x max_seq (after the caches exist): on a CPU with the
        C++ kernels, fp32 compute and fp32 caches; otherwise `decode_fused` stays off (`self.rope_table` None)."""
        cache, dev = self.layers[0].self_attn.kv_cache.k, self.norm.weight.device
        self.rope_table = self.row_ids = None
        if cache.dtype == self.norm.weight.dtype == torch.float32 and decode_ops_available(dev):
            self.rope_table = torch.cat(self.rope_cos_sin(torch.arange(max_seq, device=dev)), dim=-1).contiguous()
            self.row_ids = torch.arange(max_batch, device=dev)

    def decode_fused(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor | None,
                     kv_len: int | None) -> torch.Tensor:  # fmt: skip
        """Hidden states [B, hidden] of one token per row (tokens, positions [B]) through the KV cache, with the
        fused CPU ops of qkernels/cpu_decode.cpp: per layer the seven linears, one attention call (rope, cache
        write, attention) and two residual-add-and-norm calls, instead of some sixty small ops. Where every
        layer is plain NF4 linears without q/k norms, and on an AVX-512 build, all layers in one call
        instead (`qkernels.cpu.decode_stack`: one parallel region a step, the same bits). The values of
        `forward` up to the order of fp32 sums (tests/qserve/test_model_decode.py, test_decode_stack.py)."""
        x = self.embed_tokens(tokens).to(self.norm.weight.dtype)  # a new tensor: the residual stream, updated in place
        rows = self.row_ids[: tokens.shape[0]] if slots is None else slots
        kv_len = kv_len or self.rope_table.shape[0]
        eps = self.args.rms_norm_eps
        layers = self._fused_layers()
        stack = None if torch.compiler.is_compiling() or self._fused is None else self._fused[2]  # never traced
        if stack is not None and tokens.shape[0] <= cpu.CPU_FUSED_MAX_M:
            return stack.run(x, rows, positions, kv_len)
        h = add_rms_norm_(x, None, layers[0].input_norm, eps)
        for layer in layers:
            q, k, v = layer.qkv.run(h)
            if layer.q_norm is not None:
                q = layer.q_norm(q.view(-1, layer.n_heads, layer.head_dim)).view(q.shape)
                k = layer.k_norm(k.view(-1, layer.n_kv_heads, layer.head_dim)).view(k.shape)
            cache = layer.kv_cache
            y = decode_attention(q, k, v, self.rope_table, cache.k, cache.v, rows, positions, kv_len, layer.window)
            (o,) = layer.o.run(y)
            h = add_rms_norm_(x, o, layer.post_norm, eps)
            gate, up = layer.gate_up.run(h)
            (down,) = layer.down.run(F.silu(gate, inplace=True).mul_(up))
            h = add_rms_norm_(x, down, layer.next_norm, eps)
        return h

    def _fused_layers(self) -> list[_FusedLayer]:
        """The layers as `decode_fused` runs them, prepared once and again whenever a module, weight or
        cache they hold has been replaced since (an adapter's wrapper, a reloaded weight): the
        nn.Module attribute lookups, checks and argument lists of some 120 kernel calls a step were
        a fifth of SmolLM2's step. Checking costs one dict lookup per prepared object (in C: map)."""
        layers = list(self.layers)
        if torch.compiler.is_compiling():  # traced once into a graph: nothing to keep between steps
            return [_FusedLayer(layer, following) for layer, following in zip(layers, self._following_norms(layers))]
        if self._fused is None or not all(map(operator.is_, map(dict.get, *self._fused[1][:2]), self._fused[1][2])):
            fused = [_FusedLayer(layer, following) for layer, following in zip(layers, self._following_norms(layers))]
            checks = [(self._modules, "layers", self.layers), (self._modules, "norm", self.norm),
                      *((self.layers._modules, str(i), layer) for i, layer in enumerate(layers)),
                      *(c for f in fused for c in f.checks)]  # fmt: skip
            stack = self._decode_stack(fused)
            if stack is not None:  # it holds the caches' tensors and the rope table: the same ones, or rebuild
                checks += [(self.__dict__, "rope_table", self.rope_table),
                           *((f.kv_cache._buffers, n, f.kv_cache._buffers[n]) for f in fused for n in ("k", "v"))]  # fmt: skip
            self._fused = (fused, tuple(zip(*checks, strict=True)), stack)  # (holders, keys, objects)
        return self._fused[0]

    def _decode_stack(self, fused: list[_FusedLayer]) -> object | None:
        """The whole step in one C++ call (qkernels.cpu.decode_stack) when every layer is plain NF4 linears
        the prepared kernel takes and no q/k norms; else None (the per-layer calls of `decode_fused`)."""
        if not fused or any(f.q_norm is not None or f.k_norm is not None
                            or any(g.args is None for g in (f.qkv, f.o, f.gate_up, f.down)) for f in fused):  # fmt: skip
            return None
        groups = [[*f.qkv.modules, *f.o.modules, *f.gate_up.modules, *f.down.modules] for f in fused]
        return cpu.decode_stack([[m.nf4_weight for m in g] for g in groups],
                                [[m._parameters.get("bias") for m in g] for g in groups],
                                [fused[0].input_norm, *(n for f in fused for n in (f.post_norm, f.next_norm))],
                                [f.kv_cache.k for f in fused], [f.kv_cache.v for f in fused],
                                [f.window for f in fused], self.rope_table, fused[0].n_heads,
                                self.args.rms_norm_eps)  # fmt: skip

    def _following_norms(self, layers: list[nn.Module]) -> list[RMSNorm]:
        """The norm after each layer: the next layer's input norm, the final norm after the last."""
        return [layer.input_layernorm for layer in layers[1:]] + [self.norm]


class _FusedLayer:
    """One decoder layer as `Decoder.decode_fused` calls it, its modules, weights and cache looked up once."""

    def __init__(self, layer: DecoderLayer, following_norm: RMSNorm):
        a, mlp = layer._modules["self_attn"], layer._modules["mlp"]
        self.qkv = LinearsOfOneInput(a, ["q_proj", "k_proj", "v_proj"])
        self.o = LinearsOfOneInput(a, ["o_proj"])
        self.gate_up = LinearsOfOneInput(mlp, ["gate_proj", "up_proj"])
        self.down = LinearsOfOneInput(mlp, ["down_proj"])
        self.q_norm, self.k_norm = a._modules.get("q_norm"), a._modules.get("k_norm")
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
        self.window = a.sliding_window or 0
        self.kv_cache = a.kv_cache
        norms = [layer._modules["input_layernorm"], layer._modules["post_attention_layernorm"], following_norm]
        self.input_norm, self.post_norm, self.next_norm = (n._parameters["weight"] for n in norms)
        self.checks = [*self.qkv.checks, *self.o.checks, *self.gate_up.checks, *self.down.checks,
                       (layer._modules, "self_attn", a), (layer._modules, "mlp", mlp),
                       (a._modules, "q_norm", self.q_norm), (a._modules, "k_norm", self.k_norm),
                       (a._modules, "kv_cache", self.kv_cache), (a.__dict__, "sliding_window", a.sliding_window),
                       (layer._modules, "input_layernorm", norms[0]),
                       (layer._modules, "post_attention_layernorm", norms[1]),
                       *((n._parameters, "weight", n._parameters["weight"]) for n in norms)]  # fmt: skip


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
        self._compiled_decode = None

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
        self.model.prepare_fused_decode(max_batch, max_seq)

    def clear_cache(self, slot: int, end: int | None = None) -> None:
        """Zero cache positions [0, end) of `slot` (all of it by default) before a new sequence uses it, so
        nothing the previous one left there (NaN from a broken adapter included) can reach the new one."""
        for layer in self.model.layers:
            layer.self_attn.kv_cache.clear(slot, self.max_seq if end is None else end)

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def hidden(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
               slots: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
               kv_len: int | None = None) -> torch.Tensor:  # fmt: skip
        """Hidden states [B, T, hidden] after the final norm, in the compute dtype.

        tokens: int64 [B, T].
        input_pos: None for a plain causal forward without cache (training, scoring); else int64
            [B, T] absolute positions per row, which reads and writes the KV cache.
        slots: int64 [B], the cache slot of each row (default: row b uses slot b).
        attention_mask: [B, T], 1 for real tokens, 0 for padding; only without a cache (left padding).
        kv_len: attend to the first kv_len cache positions only, an upper bound on max(input_pos)+1.
            A speed hint for eager decoding; leave None under torch.compile (static shapes).
        """
        if input_pos is not None and self.model.layers[0].self_attn.kv_cache is None:
            raise RuntimeError("call setup_cache() before a forward with input_pos")
        return self.model(tokens, input_pos, slots, attention_mask, kv_len)

    def logits(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits [..., vocab] of hidden states [..., hidden]; with `rows` (int64 [B]) only those of
        position rows[b] of each row b of hidden [B, T, hidden], [B, vocab] (a prompt's last token)."""
        if rows is not None:
            hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), rows]
        head = self.lm_head  # nn.Linear, a LoRA layer, or the 16-bit CPU layer of qserve/embeddings16.py
        # Several rows on CPU as W @ h^T: MKL runs that tall-skinny product faster than h @ W^T, and the
        # output layer is the largest matmul of a decode step. Same values up to fp32 rounding.
        if hidden.dim() == 2 and hidden.shape[0] >= 4 and hidden.device.type == "cpu" and type(head) is nn.Linear \
                and head.bias is None:  # fmt: skip
            return torch.mm(head.weight, hidden.T).T.float()
        return head(hidden).float()

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor, normalizer: float,
             chunk: int | None = None) -> torch.Tensor:  # fmt: skip
        """Sum of the token cross-entropies of `labels` [B, T] (IGNORE = no loss) divided by `normalizer`,
        with a plain causal forward. Position t predicts labels[t + 1].

        A frozen bias-free output layer is fused with the cross-entropy `chunk` rows at a time
        (qserve/lm_loss.py), so the [tokens, vocab] logits never exist at once. Dividing by the
        token count of a whole optimizer step (all micro-batches and ranks), not of this micro-batch,
        makes the gradient independent of how the step is split.
        """
        targets = shifted_targets(labels)
        keep = targets != IGNORE
        h, t = self.hidden(tokens)[:, :-1][keep], targets[keep]
        head = self.lm_head
        if isinstance(head, nn.Linear) and head.bias is None and not head.weight.requires_grad:
            # An FSDP2 unit of its own (qconvert/fsdp.py) gathers its weight around its `cross_entropy`.
            fused = getattr(head, "cross_entropy", None)
            if fused is not None:
                return fused(h, t, 1.0 / normalizer, chunk)
            return linear_cross_entropy(h, head.weight, t, 1.0 / normalizer, chunk)
        return F.cross_entropy(self.logits(h), t, reduction="sum") / normalizer

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
                slots: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                kv_len: int | None = None) -> torch.Tensor:  # fmt: skip
        """fp32 logits [B, T, vocab] of every position; the arguments are those of `hidden`."""
        return self.logits(self.hidden(tokens, input_pos, slots, attention_mask, kv_len))

    def prefill(self, prompts: Sequence[Sequence[int]], slots: Sequence[int]) -> torch.Tensor:
        """Run prompts of any lengths together into cache `slots` from position 0; hidden states [B, T, hidden].

        Right-padded with each row's own last token: the padding lands in cache positions the row
        overwrites before it ever attends there, and comes from that row's own input.
        """
        lens = [len(p) for p in prompts]
        t, dev = max(lens), self.device
        tokens = torch.tensor([[*p, *p[-1:] * (t - n)] for p, n in zip(prompts, lens)], device=dev)
        positions = torch.arange(t, device=dev).expand(len(prompts), t)
        return self.hidden(tokens, positions, torch.tensor(list(slots), device=dev), kv_len=t)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor | None = None,
               kv_len: int | None = None) -> torch.Tensor:  # fmt: skip
        """One step for B sequences: `tokens[B]` at `positions[B]` in cache `slots[B]` (default 0..B-1);
        fp32 logits [B, vocab]. On CPU with fp32 compute and cache, and nothing recording gradients, through
        `Decoder.decode_fused`. After `compile_decode()` it runs through torch.compile, with static
        shapes: attention spans the whole cache and `kv_len` is not used."""
        if self._compiled_decode is not None:
            return self._compiled_decode(tokens, positions, slots)
        if self.model.rope_table is not None and not torch.is_grad_enabled():
            return self.logits(self.model.decode_fused(tokens, positions, slots, kv_len))
        return self.logits(self.hidden(tokens[:, None], positions[:, None], slots, kv_len=kv_len)[:, 0])

    def compile_decode(self) -> None:
        """Run `decode` through torch.compile from now on (compiled at the first call of each batch shape)."""
        if self._compiled_decode is None:

            def step(tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor | None) -> torch.Tensor:
                if self.model.rope_table is not None:  # the fused ops, opaque to the compiler (their fakes)
                    return self.logits(self.model.decode_fused(tokens, positions, slots, None))
                return self.logits(self.hidden(tokens[:, None], positions[:, None], slots)[:, 0])

            self._compiled_decode = torch.compile(step, fullgraph=True, dynamic=False)
