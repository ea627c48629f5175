"""The memory planner: predicted peak memory per device of a QLoRA run, from config.json alone.

`plan(config, settings)` returns a `Plan`: one `Breakdown` per kind of device (the accelerator, or
the CPU process, and the host side of a GPU run), each a list of named terms in bytes whose sum is
the predicted peak, and a fit verdict; `cheapest_fit` searches the settings a user can change for
the first that fits. Everything is arithmetic on the model's shapes: no weights, no torch tensors.
The terms follow what `qconvert finetune` allocates (docs/memory-plan.md explains each and how the
constants were calibrated against measured peaks, and checks three published peaks):

- the 4-bit base as stored (packed codes, 8-bit scales, nested scales, maps) and the float
  embeddings / output layer, sharded over the ranks under FSDP, on the host with FSDP offload;
- under FSDP, the all-gather buffers: the layer being computed and the one prefetched, and one
  float table (the embeddings or the output layer, each gathered only around its use; a tied table,
  with the root, for the whole step) as gathered and as copied out;
- LoRA weights, gradients and PagedAdamW state (32-bit: two fp32 moments; 8-bit: two codes and
  one fp32 absmax per 256), sharded under FSDP, on the host with offload; DDP's flat gradient
  all-reduce buffers;
- activations: per layer what autograd keeps (with checkpointing only each layer's input and the
  `[tokens, r]` LoRA bottlenecks), plus one layer's forward live during its recompute, and the
  backward's gradient buffers and the dequantized weight of the largest linear;
- the loss: our fused, chunked output layer keeps one chunk of logits and the hidden-state
  gradient; a trainer that materialises the logits keeps them in full (`Trainer.chunked_loss`);
- allocator slack, the CUDA context, and on CPU the process's runtime (Python, torch, tokenizer).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from qformats.errors import QError

GiB = 1 << 30
MiB = 1 << 20
# qserve.lora.ALL_LINEAR, spelled again because this module stays torch-free for `qconvert plan --help`
# (tests/qconvert/test_memory_plan.py holds the two equal)
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Calibration constants (docs/memory-plan.md, "Calibration"): measured on this project's CPU runs.
CPU_RUNTIME_BYTES = 560 * MiB  # Python, torch and its libraries, tokenizer, dataset: resident besides the tensors
CUDA_CONTEXT_BYTES = 600 * MiB  # CUDA context and kernels: reserved outside torch's allocator
CPU_ALLOCATOR_KEEP = 1 * GiB  # qkernels/cpu_caching_allocator.cpp keeps at most this much free
SAVED_FRACTION = 0.8  # of the tensors autograd could keep per layer, the share resident at the peak (measured)
ALLOCATOR_SLACK = 0.10  # caching allocators: free blocks held between the peaks of a step, per byte of activations
LOSS_CHUNK_BYTES = 64 << 20  # qserve/lm_loss.py CHUNK_BYTES: fp32 logits of one chunk
FSDP_RUNTIME_BYTES = 100 * MiB  # FSDP2's first use: DTensor and its dispatch tables, whatever the model (measured)


@dataclass(frozen=True)
class Shape:
    """The few config.json fields memory depends on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, config: dict, name: str = "config.json") -> Shape:
        from qserve.model_config import ModelArgs  # the one reader of config.json: unsupported model_type -> QError

        a = ModelArgs.from_config(config, name)
        return cls(a.hidden_size, a.intermediate_size, a.num_hidden_layers, a.num_attention_heads,
                   a.num_key_value_heads, a.head_dim, a.vocab_size, a.tie_word_embeddings)  # fmt: skip

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each decoder linear of one layer."""
        q, kv, h, f = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}  # fmt: skip


@dataclass(frozen=True)
class Trainer:
    """How a training framework spends memory where frameworks differ; the defaults are ours."""

    lora_bytes: int = 4  # LoRA weights and gradients (ours: fp32; the QLoRA paper's code: bf16)
    chunked_loss: bool = True  # ours: lm_loss.LinearCrossEntropy; False: full [tokens, vocab] logits
    residual_bytes: int | None = None  # activations kept per layer; None: the compute dtype (autocast: 4)


@dataclass(frozen=True)
class Settings:
    seq_len: int = 1024
    batch_size: int = 4  # examples per micro-batch per process
    rank: int = 64
    target_modules: tuple[str, ...] = ALL_LINEAR
    gpus: int = 1  # processes (GPUs, or CPU processes under torchrun)
    fsdp: bool = False
    fsdp_offload: bool = False
    optimizer_bits: int = 32
    gradient_checkpointing: bool = True
    device: str = "cuda"
    dtype: str | None = None  # compute dtype; None: bfloat16 on cuda, float32 on cpu
    gpu_memory: int | None = None  # bytes per device, for the verdict
    trainer: Trainer = field(default_factory=Trainer)

    def compute_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype or ("bfloat16" if self.device == "cuda" else "float32")]


def check_settings(s: Settings) -> None:
    """Bad sizes and impossible combinations: QError naming the option."""
    for name in ("seq_len", "batch_size", "rank", "gpus"):
        if getattr(s, name) < 1:
            raise QError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(s, name)}")
    if s.optimizer_bits not in (8, 32):
        raise QError(f"--optimizer-bits must be 32 or 8, got {s.optimizer_bits}")
    if s.device not in ("cpu", "cuda"):
        raise QError(f"--device must be cpu or cuda, got {s.device!r}")
    if s.dtype is not None and s.dtype not in DTYPE_BYTES:
        raise QError(f"--dtype must be one of {', '.join(DTYPE_BYTES)}, got {s.dtype!r}")
    if s.fsdp_offload and not s.fsdp:
        raise QError("--fsdp-offload needs --fsdp")
    unknown = sorted(set(s.target_modules) - set(ALL_LINEAR))
    if unknown or not s.target_modules:
        raise QError(f"--target-modules: unknown module {', '.join(unknown) or '(none given)'}; "
                     f"choose from {', '.join(ALL_LINEAR)} or all-linear")  # fmt: skip


def nf4_bytes(n_in: int, n_out: int) -> int:
    """One NF4 + double-quant weight as stored: codes, 8-bit absmax, fp32 nested absmax, the two maps."""
    n = n_in * n_out
    blocks = math.ceil(n / 64)
    return n // 2 + blocks + 4 * math.ceil(blocks / 256) + 4 * (16 + 256)


def lora_params(shape: Shape, s: Settings) -> int:
    """LoRA parameters of the whole model: r * (in + out) per targeted linear per layer."""
    return shape.layers * sum(s.rank * (i + o) for name, (i, o) in shape.linears().items() if name in s.target_modules)


def optimizer_bytes(n_params: int, bits: int) -> int:
    """PagedAdamW state: two fp32 moments, or two 8-bit codes plus an fp32 absmax per 256 (each moment)."""
    return 8 * n_params if bits == 32 else 2 * n_params + 2 * 4 * math.ceil(n_params / 256)


def layer_activation_bytes(shape: Shape, s: Settings, tokens: int) -> int:
    """What autograd keeps for one decoder layer's backward (our LoRALinear keeps no dropout mask
    and no base weight): the norms' inputs and outputs, q, k and v as attention reads them, its
    output and o_proj's input, the four [tokens, intermediate] MLP tensors, the LoRA bottlenecks;
    scaled by the share of them found resident at the measured peaks."""
    a = s.trainer.residual_bytes or s.compute_bytes()
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    per_token = 4 * shape.hidden + 3 * q + 2 * kv + 4 * shape.intermediate
    return int(SAVED_FRACTION * tokens * (per_token * a + len(s.target_modules) * s.rank * s.trainer.lora_bytes))


def activation_bytes(shape: Shape, s: Settings, tokens: int) -> int:
    """Every layer's saved tensors; with checkpointing, each layer's input and its stashed LoRA
    bottlenecks (qserve/recompute_stash.py), plus one layer's saved tensors during its recompute."""
    kept = layer_activation_bytes(shape, s, tokens)
    if not s.gradient_checkpointing:
        return shape.layers * kept
    stash = tokens * len(s.target_modules) * s.rank * s.trainer.lora_bytes
    return shape.layers * (tokens * shape.hidden * (s.trainer.residual_bytes or s.compute_bytes()) + stash) + kept


def _loss_bytes(shape: Shape, s: Settings, tokens: int) -> int:
    a, h = s.compute_bytes(), shape.hidden
    if s.trainer.chunked_loss:  # one chunk of fp32 logits, its softmax in place, and the [N, hidden] grad and input
        rows = min(tokens, max(16, LOSS_CHUNK_BYTES // (4 * shape.vocab)))
        return rows * shape.vocab * 4 + 2 * tokens * h * a
    return tokens * shape.vocab * (a + 4 + 4)  # logits, their fp32 upcast and the fp32 softmax gradient


@dataclass
class Breakdown:
    device: str
    terms: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    @property
    def allocated(self) -> int:
        """The tensors alone: what torch.cuda.max_memory_allocated reports (no slack, no context, no runtime)."""
        return sum(v for k, v in self.terms.items() if k not in _OUTSIDE_TENSORS)


_OUTSIDE_TENSORS = ("allocator slack", "CUDA context", "runtime (Python, torch, tokenizer)", "FSDP2 runtime")


@dataclass
class Plan:
    settings: Settings
    params: int  # parameters of the base
    lora_params: int
    devices: list[Breakdown]
    fits: bool | None  # None: no --gpu-memory given (and not checked)

    def to_json(self) -> dict:
        s = asdict(self.settings)
        return {"settings": s, "params": self.params, "lora_params": self.lora_params, "fits": self.fits,
                "devices": [{"device": b.device, "total_bytes": b.total, "terms": b.terms} for b in self.devices]}  # fmt: skip


def plan(config: dict, settings: Settings, name: str = "config.json") -> Plan:
    """The predicted peak per device of `qconvert finetune` (one rank's view; all ranks are alike)."""
    check_settings(settings)
    shape = Shape.from_config(config, name)
    s, n = settings, settings.gpus
    a = s.compute_bytes()
    cuda = s.device == "cuda"
    shard = n if s.fsdp else 1
    layer_4bit = sum(nf4_bytes(i, o) for i, o in shape.linears().values()) + 2 * shape.hidden * a
    base_4bit = shape.layers * layer_4bit
    floats = shape.vocab * shape.hidden * a * (1 if shape.tied else 2) + shape.hidden * a
    p_lora = lora_params(shape, s)
    lora_w, lora_g = p_lora * s.trainer.lora_bytes, p_lora * s.trainer.lora_bytes
    opt = optimizer_bytes(p_lora, s.optimizer_bits)
    tokens = s.batch_size * s.seq_len

    dev: dict[str, int] = {}
    host: dict[str, int] = {}
    sharded = {"4-bit base": base_4bit, "embeddings and output layer": floats, "LoRA weights": lora_w,
               "LoRA gradients": lora_g, "optimizer state": opt}  # fmt: skip
    for key, value in sharded.items():
        where = host if s.fsdp_offload else dev
        where[key + (f" (1/{n} shard)" if s.fsdp else "")] = math.ceil(value / shard)
    if s.fsdp:  # one layer computing and the next prefetched, in full; one float table twice: FSDP2
        # gathers into a flat buffer and copies the whole tensor out of it (the CPU block cache keeps both)
        layer_lora = p_lora // shape.layers * s.trainer.lora_bytes
        dev["all-gather buffers"] = 2 * (layer_4bit + layer_lora) + 2 * shape.vocab * shape.hidden * a
    elif n > 1:  # DDP: the flat gradient and its all-reduced copy
        dev["DDP all-reduce buffers"] = 2 * lora_g

    dev["activations"] = act = activation_bytes(shape, s, tokens)
    largest = max(i * o for i, o in shape.linears().values())
    dev["backward buffers"] = 3 * tokens * max(shape.hidden, shape.intermediate) * a + largest * a
    dev["logits/loss chunk"] = _loss_bytes(shape, s, tokens)
    transient = act + dev["backward buffers"] + dev["logits/loss chunk"]
    if cuda:
        dev["allocator slack"] = int(ALLOCATOR_SLACK * transient)
        dev["CUDA context"] = CUDA_CONTEXT_BYTES
        if not s.fsdp_offload:  # PagedAdamW's pages have their home in (pinned) host memory
            host["optimizer state (paged home)"] = math.ceil(opt / shard)
        host["runtime (Python, torch, tokenizer)"] = CPU_RUNTIME_BYTES
        if s.fsdp:
            host["FSDP2 runtime"] = FSDP_RUNTIME_BYTES
        devices = [Breakdown("cuda", dev), Breakdown("cpu (host, per process)", host)]
    else:  # one process is the device: host and device terms are the same memory
        dev.update(host)
        dev["allocator slack"] = min(CPU_ALLOCATOR_KEEP, int(ALLOCATOR_SLACK * transient))
        dev["runtime (Python, torch, tokenizer)"] = CPU_RUNTIME_BYTES
        if s.fsdp:
            dev["FSDP2 runtime"] = FSDP_RUNTIME_BYTES
        devices = [Breakdown("cpu (per process)", dev)]
    fits = None if s.gpu_memory is None else devices[0].total <= s.gpu_memory
    params = shape.layers * sum(i * o for i, o in shape.linears().values()) + shape.vocab * shape.hidden * (1 if shape.tied else 2)
    return Plan(s, params, p_lora, devices, fits)


def needs_checkpointing(config: dict, settings: Settings, available: int) -> bool:
    """`--gradient-checkpointing auto`: on only when the run without it is predicted not to fit in `available`
    bytes per device (checkpointing trades compute for memory: a step recomputes every layer's forward)."""
    return plan(config, replace(settings, gradient_checkpointing=False)).devices[0].total > available


def _flags(old: Settings, new: Settings) -> str:
    """The command-line options that turn `old` into `new`."""
    out = [flag for changed, flag in ((new.gradient_checkpointing != old.gradient_checkpointing, "--gradient-checkpointing on"),
                                      (new.optimizer_bits != old.optimizer_bits, "--optimizer-bits 8"),
                                      (new.gpus != old.gpus, f"--gpus {new.gpus}"), (new.fsdp != old.fsdp, "--fsdp"),
                                      (new.fsdp_offload != old.fsdp_offload, "--fsdp-offload")) if changed]  # fmt: skip
    if new.batch_size != old.batch_size:
        out.append(f"--batch-size {new.batch_size} --grad-accum {old.batch_size // new.batch_size} (the same step)")
    return " ".join(out)


def _candidates(s: Settings) -> list[Settings]:
    """Changes that lower the peak, cumulative, cheapest first: recompute, then 8-bit state, then sharding
    over the devices there are, then offload, then smaller micro-batches, then more devices."""
    out = [replace(s, gradient_checkpointing=True)]
    out.append(replace(out[-1], optimizer_bits=8))
    if s.device == "cuda" and s.gpus > 1:
        out.append(replace(out[-1], fsdp=True))
        out.append(replace(out[-1], fsdp_offload=True))
    b = s.batch_size
    while b > 1:
        b //= 2
        out.append(replace(out[-1], batch_size=b))
    if s.device == "cuda":
        for gpus in (2, 4, 8, 16):
            if gpus > s.gpus:
                out.append(replace(out[-1], gpus=gpus, fsdp=True, fsdp_offload=False))
                out.append(replace(out[-1], fsdp_offload=True))
    return out


def cheapest_fit(config: dict, settings: Settings) -> tuple[str, Plan] | None:
    """The first change (in `_candidates`' order) whose plan fits `settings.gpu_memory`; None when none does."""
    for candidate in _candidates(settings):
        if not plan(config, candidate).fits:
            continue
        for name in ("batch_size", "optimizer_bits", "gradient_checkpointing"):  # undo what this fit does not need
            undone = replace(candidate, **{name: getattr(settings, name)})
            if plan(config, undone).fits:
                candidate = undone
        return _flags(settings, candidate), plan(config, candidate)
    return None


def format_bytes(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"
