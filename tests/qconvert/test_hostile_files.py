"""Hostile files: every broken or lying input is one line `error: ...`, exit 1, and nothing at OUT.

Two parts. The defects of issue 13 that concern files and the CLI (each test failed before its fix):
an OUT holding its source, stale `OUT.tmp-<pid>` folders, GGUF and safetensors headers that crashed
or lied, Hub file names, deep JSON, checkpoint RNG files, model-card markdown. Then the fuzz suite:
a few hundred seeded mutations of a valid safetensors checkpoint and a valid GGUF file, each run
through the CLI in-process (click's runner, so hundreds of cases take seconds), and a handful of
real subprocesses that prove the exit status and the one-line stderr.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hub_server import Commit, _commit_oid
from safetensors.torch import save_file
from test_hub import hub  # noqa: F401 (the fake Hub fixture)
from tiny_models import save_tiny

from qconvert.cli import main as qconvert_main
from qconvert.sft_data import read_jsonl
from qconvert.train_checkpoint import load_rng
from qformats.checkpoint import open_checkpoint
from qformats.errors import QError
from qformats.gguf_file import GGUFFile
from qformats.hub_pull import pull
from qformats.model_card import read_artifact, render_card
from qformats.peft_adapter import AdapterConfig, PeftAdapter, write_adapter
from qformats.safetensors_file import read_safetensors_header
from qserve.cli import main as qserve_main

BIN = Path(sys.executable).parent


def run(*args, cli=qconvert_main):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_refused(result, out: Path, *fragments: str) -> str:
    """Exit 1, exactly one stderr line `error: ...` (with each fragment), nothing at OUT or next to it."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists() and not list(out.parent.glob(f"{out.name}.tmp-*")), "something left at OUT"
    return lines[0]


def assert_case_refused(label: str, args: list, out: Path) -> None:
    """`assert_refused` for one fuzz case, naming the case when it fails."""
    try:
        assert_refused(run(*args), out)
    except AssertionError as e:
        raise AssertionError(f"{label}: {e}") from None


# ---------------------------------------------------------------- a tiny GGUF, byte by byte

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_PACK = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q",
         I64: "<q", F64: "<d"}  # fmt: skip


def gguf_value(vtype: int, value) -> bytes:
    if vtype == STR:
        raw = value.encode() if isinstance(value, str) else value
        return struct.pack("<Q", len(raw)) + raw
    if vtype == ARR:
        item_type, items = value
        return struct.pack("<IQ", item_type, len(items)) + b"".join(gguf_value(item_type, v) for v in items)
    return struct.pack(_PACK[vtype], value)


HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 8, 2, 1, 16, 12
TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + list("abcdefghi")


def tiny_gguf_parts(seed: int = 0):
    """(metadata {key: (type, value)}, tensors {name: (torch-order shape, fp32 array)}) of a valid 1-layer Llama."""
    meta = {
        "general.architecture": (STR, "llama"), "llama.block_count": (U32, 1), "llama.context_length": (U32, 32),
        "llama.embedding_length": (U32, HIDDEN), "llama.feed_forward_length": (U32, FFN),
        "llama.attention.head_count": (U32, HEADS), "llama.attention.head_count_kv": (U32, KV_HEADS),
        "llama.rope.freq_base": (F32, 10000.0), "llama.attention.layer_norm_rms_epsilon": (F32, 1e-5),
        "tokenizer.ggml.model": (STR, "gpt2"), "tokenizer.ggml.pre": (STR, "gpt2"),
        "tokenizer.ggml.tokens": (ARR, (STR, TOKENS)), "tokenizer.ggml.token_type": (ARR, (I32, [3, 3, 3] + [1] * 9)),
        "tokenizer.ggml.merges": (ARR, (STR, [])), "tokenizer.ggml.bos_token_id": (U32, 1),
        "tokenizer.ggml.eos_token_id": (U32, 2), "tokenizer.chat_template": (STR, "{{ messages }}"),
    }  # fmt: skip
    head_dim = HIDDEN // HEADS
    shapes = {"token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,), "output.weight": (VOCAB, HIDDEN),
              "blk.0.attn_norm.weight": (HIDDEN,), "blk.0.ffn_norm.weight": (HIDDEN,),
              "blk.0.attn_q.weight": (HIDDEN, HIDDEN), "blk.0.attn_k.weight": (KV_HEADS * head_dim, HIDDEN),
              "blk.0.attn_v.weight": (KV_HEADS * head_dim, HIDDEN), "blk.0.attn_output.weight": (HIDDEN, HIDDEN),
              "blk.0.ffn_gate.weight": (FFN, HIDDEN), "blk.0.ffn_up.weight": (FFN, HIDDEN),
              "blk.0.ffn_down.weight": (HIDDEN, FFN)}  # fmt: skip
    rng = np.random.default_rng(seed)
    tensors = {n: (s, rng.standard_normal(s).astype(np.float32)) for n, s in shapes.items()}
    return meta, tensors


def gguf_kv(meta: dict) -> bytes:
    return b"".join(gguf_value(STR, k) + struct.pack("<I", t) + gguf_value(t, v) for k, (t, v) in meta.items())


def gguf_bytes(meta: dict, tensors: dict, alignment: int = 32, n_kv: int | None = None, n_tensors: int | None = None,
               raw_kv: bytes = b"", infos: list[tuple] | None = None, version: int = 3) -> bytes:  # fmt: skip
    """A GGUF v3 file. `raw_kv` is appended to the metadata as-is (counted in n_kv); `infos` overrides the
    tensor table as (name, dims fastest-first, ggml type, offset) rows."""
    kv = gguf_kv(meta)
    data, rows, offset = b"", [], 0
    for name, (shape, array) in tensors.items():
        rows.append((name, tuple(reversed(shape)), 0, offset))
        blob = array.tobytes()
        blob += b"\0" * (-len(blob) % alignment)
        data += blob
        offset += len(blob)
    table = b"".join(gguf_value(STR, name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
                     + struct.pack("<IQ", ggml_type, off) for name, dims, ggml_type, off in (infos or rows))  # fmt: skip
    n_kv = len(meta) + (1 if raw_kv else 0) if n_kv is None else n_kv
    head = b"GGUF" + struct.pack("<IQQ", version, len(infos or rows) if n_tensors is None else n_tensors, n_kv)
    head += kv + raw_kv + table
    return head + b"\0" * (-len(head) % alignment) + data


@pytest.fixture(scope="module")
def gguf_case_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf")


def test_tiny_gguf_imports(gguf_case_dir):
    """The fuzz base is valid: it imports with exit 0."""
    meta, tensors = tiny_gguf_parts()
    src = gguf_case_dir / "base.gguf"
    src.write_bytes(gguf_bytes(meta, tensors))
    result = run("import-gguf", src, gguf_case_dir / "base-out")
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------- defect 9: GGUF headers that crashed


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("general.alignment", (U32, 0), "general.alignment is 0"),
    ("general.alignment", (STR, "32"), "general.alignment is '32'"),
    ("llama.block_count", (STR, "1"), "llama.block_count is '1'"),
    ("llama.attention.head_count", (U32, 0), "llama.attention.head_count is 0"),
])  # fmt: skip
def test_gguf_bad_metadata_values_are_one_line(tmp_path, key, value, fragment):
    meta, tensors = tiny_gguf_parts()
    meta[key] = value
    (tmp_path / "m.gguf").write_bytes(gguf_bytes(meta, tensors))
    assert_refused(run("import-gguf", tmp_path / "m.gguf", tmp_path / "out"), tmp_path / "out", fragment)


def test_gguf_deeply_nested_arrays_are_one_line(tmp_path):
    meta, tensors = tiny_gguf_parts()
    depth = 20000
    nested = struct.pack("<IQ", ARR, 1) * (depth - 1) + struct.pack("<IQ", U8, 0)
    raw = gguf_value(STR, "general.nested") + struct.pack("<I", ARR) + nested
    (tmp_path / "m.gguf").write_bytes(gguf_bytes(meta, tensors, raw_kv=raw))
    assert_refused(run("import-gguf", tmp_path / "m.gguf", tmp_path / "out"), tmp_path / "out", "nested more than")


def test_gguf_huge_dimension_count_is_refused_within_the_file_size(tmp_path):
    """n_dims = 2^32-1 used to grow a list of dims until the file ran out: ~10x the file size in RAM."""
    meta, _ = tiny_gguf_parts()
    path = tmp_path / "m.gguf"
    table = gguf_value(STR, "token_embd.weight") + struct.pack("<I", 2**32 - 1)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, len(meta)) + gguf_kv(meta) + table + b"\x01" * 4_000_000)
    tracemalloc.start()
    with pytest.raises(QError, match="declares 4294967295 dimensions"):
        GGUFFile(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1_000_000, peak  # the file is 4 MB; the old reader held ~25 MB of dims before failing


# ---------------------------------------------------------------- defects 9 and 10: other files


def test_safetensors_float_shapes_are_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(2, 2)}, str(path))
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["w"]["shape"] = [2.0, 2]
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])
    with pytest.raises(QError, match=r"tensor 'w' has a malformed header entry \(shape \[2.0, 2\]"):
        read_safetensors_header(path)


def test_index_cannot_point_outside_the_folder(tmp_path):
    save_tiny("llama", tmp_path / "outside")
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(tmp_path / "outside" / "config.json", folder)
    names = read_safetensors_header(tmp_path / "outside" / "model.safetensors").tensors
    for shard in ("../outside/model.safetensors", str(tmp_path / "outside" / "model.safetensors")):
        index = {"metadata": {}, "weight_map": {name: shard for name in names}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(QError, match="is not a file inside"):
            open_checkpoint(folder)


def test_hub_file_named_dot_dot_is_one_line(hub):  # noqa: F811 (the fixture imported above)
    repo = hub.create_repo("owner/model")
    files = {"config.json": b"{}", "../x.json": b"{}"}
    commit = Commit(_commit_oid(None, files, "m"), files, "m", None)
    repo.commits[commit.oid] = commit
    repo.branches["main"] = commit.oid
    with pytest.raises(QError, match=r"owner/model: cannot download this repo \(Invalid filename '../x.json'"):
        pull("owner/model", allow_patterns=["*.json"], report=None)


def test_deep_json_line_in_finetune_data(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "ok"}\n' + "[" * 100000 + "]" * 100000 + "\n")
    with pytest.raises(QError, match=r"data.jsonl:2: JSON nested too deeply"):
        read_jsonl(path)


def test_rng_file_with_wrong_keys(tmp_path):
    save_file({"not_cpu": torch.zeros(3, dtype=torch.uint8)}, str(tmp_path / "rng-0.safetensors"))
    with pytest.raises(QError, match="rng-0.safetensors: not an RNG state written by qconvert finetune"):
        load_rng(tmp_path, 0)


def test_data_file_names_are_escaped_in_the_model_card(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                            "target_modules": ["q_proj"]}))  # fmt: skip
    hostile = "x](https://evil.example)<script>alert(1)</script>|`.jsonl"
    (folder / "qconvert.json").write_text(json.dumps({"format": 1, "training": {"data": hostile}}))
    card = render_card(read_artifact(folder), repo_id="me/a<b>")
    row = next(line for line in card.splitlines() if line.startswith("| data |"))
    assert row == r"| data | x\](https://evil.example)\<script\>alert(1)\</script\>\|\`.jsonl |"
    assert "\n# a\\<b\\>\n" in card and "<script>" not in card


# ---------------------------------------------------------------- defect 3: OUT holding its source


@pytest.fixture(scope="module")
def tiny_fp(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fp") / "fp"
    save_tiny("llama", d)
    return d


def test_quantize_force_never_deletes_a_source_inside_out(tmp_path, tiny_fp):
    parent = tmp_path / "p"
    shutil.copytree(tiny_fp, parent / "src")
    line = assert_refused_keep(run("quantize", parent / "src", parent, "--force", "--quiet"), parent / "src")
    assert "holds the source folder" in line
    # OUT inside SRC, and OUT reached through a symlink to the folder that holds SRC
    line = assert_refused_keep(run("quantize", parent / "src", parent / "src" / "out", "--quiet"), parent / "src")
    assert "lies inside the source folder" in line
    (tmp_path / "link").symlink_to(parent)
    assert_refused_keep(run("quantize", parent / "src", tmp_path / "link", "--force", "--quiet"), parent / "src")


def test_export_force_never_deletes_a_source_inside_out(tmp_path, tiny_fp):
    parent = tmp_path / "p"
    shutil.copytree(tiny_fp, parent / "model")
    result = run("export", "--model", parent / "model", "--out", parent, "--force", cli=qserve_main)
    assert "holds the source folder" in assert_refused_keep(result, parent / "model")


def test_import_gguf_out_inside_source_folder_link(tmp_path, gguf_case_dir):
    meta, tensors = tiny_gguf_parts()
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "m.gguf").write_bytes(gguf_bytes(meta, tensors))
    (tmp_path / "link").symlink_to(tmp_path / "p")
    result = run("import-gguf", tmp_path / "p" / "m.gguf", tmp_path / "link", "--force")
    assert "holds the source file" in assert_refused_keep(result, tmp_path / "p" / "m.gguf")


def assert_refused_keep(result, source: Path) -> str:
    """Refused in one line, and the source is still all there."""
    assert result.exit_code == 1, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert source.exists() and (source.is_file() or any(source.iterdir()))
    return lines[0]


# ---------------------------------------------------------------- defect 8: stale temp folders of killed runs


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_folders_of_dead_runs_are_removed(tmp_path, tiny_fp):
    out = tmp_path / "nf4"
    stale = [tmp_path / f"nf4.tmp-{dead_pid()}", tmp_path / f"nf4.tmp-{dead_pid()}"]
    live = tmp_path / f"nf4.tmp-{os.getppid()}"  # a process that runs: its folder is never touched
    unrelated = tmp_path / "nf4.tmp-notapid"
    for folder in [*stale, live, unrelated]:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 100)
    result = run("quantize", tiny_fp, out, "--quiet")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if "temp folder" in line]
    assert len(notes) == 1 and notes[0].startswith("note: removed 2 temp folders left next to"), result.stderr
    assert not any(p.exists() for p in stale) and live.is_dir() and unrelated.is_dir()


def test_adapter_writer_removes_stale_temp_folders_too(tmp_path):
    stale = tmp_path / f"adapter.tmp-{dead_pid()}"
    stale.mkdir()
    config = AdapterConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    weights = {"model.layers.0.self_attn.q_proj": (torch.zeros(2, 8), torch.zeros(8, 2))}
    write_adapter(tmp_path / "adapter", PeftAdapter(config=config, weights=weights))
    assert not stale.exists() and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------- fuzz: GGUF metadata and structure

WHOLE_FIELDS = ["llama.block_count", "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.attention.key_length",
                "llama.rope.dimension_count", "llama.vocab_size"]  # fmt: skip
POSITIVE_FIELDS = ["llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon"]
NOT_WHOLE = [(STR, "8"), (U32, 0), (I32, -1), (F32, 2.5), (F64, 8.0), (BOOL, True), (ARR, (U32, [8])), (ARR, (STR, []))]
NOT_POSITIVE = [(STR, "1e-5"), (F32, 0.0), (F32, -1.0), (F32, float("nan")), (F32, float("inf")), (BOOL, True),
                (ARR, (F32, [1.0]))]  # fmt: skip
BAD_TOKENIZER = [("tokenizer.ggml.tokens", (ARR, (U32, list(range(VOCAB))))), ("tokenizer.ggml.tokens", (STR, "abc")),
                 ("tokenizer.ggml.merges", (ARR, (U32, [1]))), ("tokenizer.ggml.merges", (ARR, (STR, ["a"]))),
                 ("tokenizer.ggml.merges", (ARR, (STR, ["x y"]))), ("tokenizer.ggml.token_type", (ARR, (STR, ["3"]))),
                 ("tokenizer.ggml.token_type", (ARR, (I32, [1, 1]))), ("tokenizer.ggml.bos_token_id", (STR, "1")),
                 ("tokenizer.ggml.bos_token_id", (U32, 999)), ("tokenizer.ggml.eos_token_id", (I32, -1)),
                 ("tokenizer.ggml.padding_token_id", (F32, 1.0)), ("tokenizer.ggml.pre", (U32, 1)),
                 ("tokenizer.ggml.pre", (STR, "unknown-pre")), ("tokenizer.ggml.model", (STR, "llama")),
                 ("tokenizer.chat_template", (U32, 5)), ("general.architecture", (STR, "gpt2")),
                 ("general.architecture", (U32, 1)), ("llama.expert_count", (U32, 8)),
                 ("general.alignment", (U32, 0)), ("general.alignment", (U32, 24)), ("general.alignment", (STR, "32")),
                 ("general.alignment", (F32, 32.0)), ("general.alignment", (BOOL, True)),
                 ("llama.rope.scaling.type", (STR, "linear"))]  # fmt: skip
REQUIRED = ["general.architecture", "llama.block_count", "llama.context_length", "llama.embedding_length",
            "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.layer_norm_rms_epsilon",
            "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.model"]  # fmt: skip


def gguf_mutations(rng: random.Random):
    """Yield (label, file bytes) of invalid GGUF files, each broken in one way."""
    meta, tensors = tiny_gguf_parts()
    valid = gguf_bytes(meta, tensors)
    for key in WHOLE_FIELDS:
        for value in NOT_WHOLE:
            yield f"{key}={value}", gguf_bytes({**meta, key: value}, tensors)
    for key in POSITIVE_FIELDS:
        for value in NOT_POSITIVE:
            yield f"{key}={value}", gguf_bytes({**meta, key: value}, tensors)
    for key, value in BAD_TOKENIZER:
        yield f"{key}={value}", gguf_bytes({**meta, key: value}, tensors)
    for key in REQUIRED:
        yield f"no {key}", gguf_bytes({k: v for k, v in meta.items() if k != key}, tensors)
    for depth in (5, 64, 3000, 20000):
        nested = struct.pack("<IQ", ARR, 1) * (depth - 1) + struct.pack("<IQ", U8, 0)
        yield (
            f"arrays {depth} deep",
            gguf_bytes(meta, tensors, raw_kv=gguf_value(STR, "x.deep") + struct.pack("<I", ARR) + nested),
        )
    huge = [2**31, 2**40, 2**62, 2**64 - 1]
    for n in huge:
        yield f"n_kv={n}", gguf_bytes(meta, tensors, n_kv=n)
        yield f"n_tensors={n}", gguf_bytes(meta, tensors, n_tensors=n)
        yield f"string length {n}", gguf_bytes(meta, tensors, raw_kv=struct.pack("<Q", n) + b"x.key")
        for item in (STR, ARR, U8, U64, F32):
            yield (
                f"array of {item} count {n}",
                gguf_bytes(meta, tensors, raw_kv=gguf_value(STR, "x.a") + struct.pack("<IIQ", ARR, item, n)),
            )
    for vtype in (13, 99, 2**32 - 1):
        yield f"value type {vtype}", gguf_bytes(meta, tensors, raw_kv=gguf_value(STR, "x.t") + struct.pack("<I", vtype))
    yield (
        "key not utf-8",
        gguf_bytes(meta, tensors, raw_kv=gguf_value(STR, b"\xff\xfe") + struct.pack("<I", U8) + b"\x01"),
    )
    yield "bad magic", b"GGUG" + valid[4:]
    yield "empty", b""
    for version in (1, 4, 2**32 - 1):
        yield f"version {version}", gguf_bytes(meta, tensors, version=version)
    names = list(tensors)
    rows = []
    offset = 0
    for name, (shape, array) in tensors.items():
        rows.append((name, tuple(reversed(shape)), 0, offset))
        offset += -(-array.nbytes // 32) * 32
    for _ in range(12):  # one row of the tensor table made to lie
        i = rng.randrange(len(rows))
        name, dims, ggml_type, off = rows[i]
        how = rng.choice(["type", "offset", "dims", "ndims", "q8", "name", "drop", "extra"])
        bad = list(rows)
        if how == "type":
            bad[i] = (name, dims, rng.choice([99, 2**31, 5]), off)  # 5: a type gguf does not define
        elif how == "offset":
            bad[i] = (name, dims, ggml_type, rng.choice([offset * 4, 2**63, 2**64 - 1]))
        elif how == "dims":
            bad[i] = (name, tuple(d + rng.randint(1, 3) for d in dims), ggml_type, off)
        elif how == "ndims":
            bad[i] = (name, dims + (1,) * rng.randint(4, 8), ggml_type, off)
        elif how == "q8":
            bad[i] = (name, dims, 8, off)  # Q8_0 needs rows of 32 values: these have 8 or 16
        elif how == "name":
            bad[i] = ("blk.9." + name, dims, ggml_type, off)
        elif how == "drop":
            del bad[i]
        else:
            bad.append(("extra.weight", (4,), 0, 0))
        yield f"tensor table {how} {name}", gguf_bytes(meta, tensors, infos=bad)
    nan = {n: (s, a.copy()) for n, (s, a) in tensors.items()}
    nan[names[rng.randrange(len(names))]][1].flat[0] = float("nan")
    yield "a NaN weight", gguf_bytes(meta, nan)
    for _ in range(20):  # cut short anywhere
        yield "truncated", valid[: rng.randrange(len(valid) - 1)]


def test_fuzzed_gguf_files_are_each_one_line(tmp_path):
    rng = random.Random(13)
    cases = list(gguf_mutations(rng))
    assert len(cases) > 150
    for i, (label, blob) in enumerate(cases):
        src, out = tmp_path / f"case{i}.gguf", tmp_path / f"out{i}"
        src.write_bytes(blob)
        assert_case_refused(f"case {i} ({label})", ["import-gguf", src, out], out)
        src.unlink()


# ---------------------------------------------------------------- fuzz: safetensors headers, index and config


def split_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join_safetensors(header: object, data: bytes, header_bytes: bytes | None = None) -> bytes:
    blob = json.dumps(header).encode() if header_bytes is None else header_bytes
    return struct.pack("<Q", len(blob)) + blob + data


BAD_SHAPES = [[2.0], [1.5, 4], "12", [True, 2], [-1, 4], [[4]], None, 7, [None], ["4"], {"a": 1}]
BAD_DTYPES = ["F99", "f32", 5, None, ["F32"], {"F32": 1}, ""]
BAD_OFFSETS = [[0.0, 4.0], [0], [0, 1, 2], [-4, 0], "0,4", None, [True, 4], [[0], [4]], 3]


def safetensors_mutations(rng: random.Random, header: dict, data: bytes):
    """Yield (label, file bytes) of invalid model.safetensors files, each broken in one way."""
    names = [n for n in header if n != "__metadata__"]
    for _ in range(90):
        h = json.loads(json.dumps(header))
        name = rng.choice(names)
        entry = h[name]
        how = rng.choice(["shape", "dtype", "offsets", "drop", "entry", "lie", "overlap", "gap"])
        if how == "shape":
            entry["shape"] = rng.choice(BAD_SHAPES)
        elif how == "dtype":
            entry["dtype"] = rng.choice(BAD_DTYPES)
        elif how == "offsets":
            entry["data_offsets"] = rng.choice(BAD_OFFSETS)
        elif how == "drop":
            del entry[rng.choice(["shape", "dtype", "data_offsets"])]
        elif how == "entry":
            h[name] = rng.choice([[1, 2], "tensor", 0, None, True])
        elif how == "lie":  # the shape no longer matches the bytes
            entry["shape"] = [*entry["shape"][:-1], entry["shape"][-1] + rng.randint(1, 5)] if entry["shape"] else [2]
        elif how == "overlap":
            other = h[rng.choice([n for n in names if n != name])]
            entry["data_offsets"] = list(other["data_offsets"])
        else:
            begin, end = entry["data_offsets"]
            entry["data_offsets"] = [begin + 2, end + 2]
        yield f"{how} {name}", join_safetensors(h, data)
    for meta in ([1, 2], {"a": 1}, {"a": None}, "x", {"a": ["b"]}):
        yield f"__metadata__ {meta!r}", join_safetensors({**header, "__metadata__": meta}, data)
    for depth in (1000, 100000):
        deep = "[" * depth + "]" * depth
        yield f"JSON {depth} deep", join_safetensors(None, data, f'{{"__metadata__": {deep}}}'.encode())
        yield f"JSON {depth} deep entry", join_safetensors(None, data, f'{{"w": {{"shape": {deep}}}}}'.encode())
    valid = join_safetensors(header, data)
    (n,) = struct.unpack("<Q", valid[:8])
    yield "not JSON", join_safetensors(None, data, b"{not json" + b" " * 40)
    yield "JSON list", join_safetensors(None, data, b"[1, 2, 3]")
    yield "header not UTF-8", join_safetensors(None, data, b'{"\xff": 1}')
    for length in (0, 2, n - 1, n + 1, len(valid), 2**63, 2**64 - 1):
        yield f"header length {length}", struct.pack("<Q", length) + valid[8:]
    yield "one byte more", valid + b"\0"
    for _ in range(15):
        yield "truncated", valid[: rng.randrange(len(valid) - 1)]


def test_fuzzed_safetensors_headers_are_each_one_line(tmp_path, tiny_fp):
    header, data = split_safetensors(tiny_fp / "model.safetensors")
    rng = random.Random(13)
    cases = list(safetensors_mutations(rng, header, data))
    assert len(cases) > 120
    src = tmp_path / "src"
    shutil.copytree(tiny_fp, src)
    for i, (label, blob) in enumerate(cases):
        (src / "model.safetensors").write_bytes(blob)
        out = tmp_path / f"out{i}"
        assert_case_refused(f"case {i} ({label})", ["quantize", src, out, "--quiet"], out)


def test_fuzzed_index_and_config_are_each_one_line(tmp_path, tiny_fp):
    names = list(read_safetensors_header(tiny_fp / "model.safetensors").tensors)
    src = tmp_path / "src"
    shutil.copytree(tiny_fp, src)
    (src / "model.safetensors").rename(src / "model-00001-of-00001.safetensors")
    good = {n: "model-00001-of-00001.safetensors" for n in names}
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(src / "model-00001-of-00001.safetensors", outside)
    indexes = [
        {"weight_map": {n: shard for n in names}}
        for shard in (
            "../elsewhere.safetensors",
            str(outside),
            "",
            ".",
            "sub/../../elsewhere.safetensors",
            "missing.safetensors",
        )
    ]
    indexes += [{"weight_map": {**good, names[0]: 5}}, {"weight_map": [1]}, {"weight_map": None}, {"no_map": {}},
                [1], {"weight_map": {**good, "extra.weight": "model-00001-of-00001.safetensors"}}]  # fmt: skip
    config = (src / "config.json").read_text()
    cases = [("index", json.dumps(i)) for i in indexes]
    cases += [("index", "{not json"), ("index", "[" * 100000 + "]" * 100000)]
    cases += [("config", text) for text in ("{not json", "[1]", "[" * 100000 + "]" * 100000, '"x"', "\udcff")]
    for i, (which, text) in enumerate(cases):
        (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": good}))
        (src / "config.json").write_text(config)
        target = src / ("model.safetensors.index.json" if which == "index" else "config.json")
        target.write_bytes(text.encode("utf-8", "surrogateescape"))
        out = tmp_path / f"out{i}"
        assert_case_refused(f"case {i} ({which} {text[:60]!r})", ["quantize", src, out, "--quiet"], out)


# ---------------------------------------------------------------- the exit status and stderr of real processes


def test_real_processes_exit_1_with_one_line(tmp_path, tiny_fp):
    meta, tensors = tiny_gguf_parts()
    (tmp_path / "a.gguf").write_bytes(gguf_bytes({**meta, "general.alignment": (U32, 0)}, tensors))
    header, data = split_safetensors(tiny_fp / "model.safetensors")
    first = next(n for n in header if n != "__metadata__")
    header[first]["shape"] = [float(s) for s in header[first]["shape"]]
    shutil.copytree(tiny_fp, tmp_path / "src")
    (tmp_path / "src" / "model.safetensors").write_bytes(join_safetensors(header, data))
    commands = [["import-gguf", tmp_path / "a.gguf", tmp_path / "out"],
                ["quantize", tmp_path / "src", tmp_path / "out", "--quiet"],
                ["quantize", tiny_fp, tiny_fp / "out", "--quiet"]]  # fmt: skip
    for args in commands:
        proc = subprocess.run([str(BIN / "qconvert"), *map(str, args)], capture_output=True, text=True, timeout=300,
                              check=False, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})  # fmt: skip
        assert proc.returncode == 1 and proc.stdout == "", (args, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert not (tmp_path / "out").exists() and not (tiny_fp / "out").exists()
