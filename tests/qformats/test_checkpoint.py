"""Checkpoint reading (validated headers, shard by shard) and the atomic sharded writer."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from qformats.checkpoint import iter_checkpoint_tensors, load_config, open_checkpoint
from qformats.errors import QError
from qformats.manifest import sha256_file
from qformats.safetensors_file import read_safetensors_header
from qformats.sharded_writer import ShardedWriter, parse_size


def make_folder(path, tensors, config=None):
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config or {"architectures": ["LlamaForCausalLM"]}))
    return path


def random_tensors():
    torch.manual_seed(0)
    return {
        "w16": torch.randn(7, 5, dtype=torch.float16),
        "wbf": torch.randn(3, 64, dtype=torch.bfloat16),
        "i64": torch.arange(11),
        "flag": torch.tensor(True),
        "empty": torch.empty(0, 4),
        "u8": torch.randint(0, 255, (9,), dtype=torch.uint8),
    }


def test_reads_single_file_exactly_and_hashes_it(tmp_path):
    tensors = random_tensors()
    folder = make_folder(tmp_path / "m", tensors)
    hashers = {}
    got = dict(iter_checkpoint_tensors(folder, hashers))
    assert got.keys() == tensors.keys()
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    assert hashers[folder / "model.safetensors"].hexdigest() == sha256_file(folder / "model.safetensors")
    assert load_config(folder)["architectures"] == ["LlamaForCausalLM"]


def test_reads_transformers_sharded_checkpoint(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=101)  # fmt: skip
    model = LlamaForCausalLM(cfg).to(torch.float16)
    model.save_pretrained(tmp_path / "m", max_shard_size="40KB")
    ckpt = open_checkpoint(tmp_path / "m")
    assert len(ckpt.shards) > 2 and ckpt.index_file is not None
    got = dict(iter_checkpoint_tensors(ckpt))
    expected = model.state_dict()
    for name, t in got.items():
        assert torch.equal(t, expected[name]), name
    assert set(got) == {k for k in expected if k != "lm_head.weight" or not cfg.tie_word_embeddings}


def corrupt(folder, edit):
    """Rewrite model.safetensors after `edit(header_dict, data_bytes) -> (header_dict, data_bytes)`."""
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = edit(json.loads(raw[8 : 8 + n]), raw[8 + n :])
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda h, d: (h, d[:-10]), "truncated"),
        (lambda h, d: ({**h, "w16": {**h["w16"], "shape": [7, 6]}}, d), "'w16' header says 70 bytes"),
        (lambda h, d: ({**h, "u8": {**h["u8"], "dtype": "Q4"}}, d), "'u8' has dtype 'Q4'"),
        (lambda h, d: (h, d + b"xx"), "header describes"),
        (lambda h, d: ({**h, "w16": {**h["w16"], "data_offsets": [0, 70]}}, d), "overlaps"),
        (lambda h, d: ({**h, "i64": {"dtype": "I64"}}, d), "'i64' has a malformed header"),
    ],
)
def test_bad_headers_name_the_file_and_tensor(tmp_path, edit, message):
    folder = make_folder(tmp_path / "m", random_tensors())
    path = corrupt(folder, edit)
    with pytest.raises(QError, match=message) as e:
        open_checkpoint(folder)
    assert str(path) in str(e.value)


def test_header_length_beyond_file_and_garbage(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(QError, match="header length 1000 exceeds"):
        read_safetensors_header(path)
    path.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(QError, match="corrupt safetensors header"):
        read_safetensors_header(path)
    path.write_bytes(b"abc")
    with pytest.raises(QError, match="truncated safetensors file"):
        read_safetensors_header(path)


def test_folder_problems(tmp_path):
    with pytest.raises(QError, match="no such folder"):
        open_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(QError, match="folder is empty"):
        open_checkpoint(tmp_path / "empty")
    folder = make_folder(tmp_path / "m", random_tensors())
    (folder / "config.json").unlink()
    with pytest.raises(QError, match="no config.json"):
        open_checkpoint(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(QError, match="config.json: not valid JSON"):
        open_checkpoint(folder)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(QError, match="pickle"):
        open_checkpoint(folder)


def test_index_must_agree_with_shards(tmp_path):
    folder = make_folder(tmp_path / "m", random_tensors())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w16": "model.safetensors", "ghost": "model.safetensors"}}))
    with pytest.raises(QError, match="'ghost'"):
        open_checkpoint(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w16": "other.safetensors"}}))
    with pytest.raises(QError, match="other.safetensors, which is missing"):
        open_checkpoint(folder)


def test_writer_shards_groups_and_index(tmp_path):
    tensors = random_tensors()
    out = tmp_path / "out"
    with ShardedWriter(out, shard_size=90) as w:
        w.add({"a": tensors["w16"], "b": tensors["wbf"]})  # 70 + 384 bytes: one group stays together
        w.add({"c": tensors["i64"]})
        w.add({"d": tensors["flag"], "e": tensors["empty"], "f": tensors["u8"]})
        names = w.finish_shards()
        w.commit()
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"a": names[0], "b": names[0], "c": names[1], "d": names[2], "e": names[2],
                                   "f": names[2]}  # fmt: skip
    assert index["metadata"]["total_size"] == 70 + 384 + 88 + 1 + 0 + 9
    back = {}
    for n in names:
        back.update(load_file(out / n))
    for new, old in zip("abcdef", ["w16", "wbf", "i64", "flag", "empty", "u8"]):
        assert torch.equal(back[new], tensors[old])
    assert w.file_hashes[names[1]] == sha256_file(out / names[1])
    assert not list(tmp_path.glob("out.tmp-*"))


def test_writer_single_shard_is_model_safetensors(tmp_path):
    with ShardedWriter(tmp_path / "out") as w:
        w.add({"x": torch.ones(3)})
        assert w.finish_shards() == ["model.safetensors"]
        w.commit()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors"]
    assert read_safetensors_header(tmp_path / "out" / "model.safetensors").metadata == {"format": "pt"}


def test_writer_error_leaves_out_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(QError, match="not empty"):
        ShardedWriter(out).__enter__()
    with pytest.raises(RuntimeError), ShardedWriter(out, force=True) as w:
        w.add({"x": torch.ones(3)})
        raise RuntimeError("boom")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with ShardedWriter(out, force=True) as w:
        w.add({"x": torch.ones(3)})
        w.finish_shards()
        w.commit()
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 1024**3
    assert parse_size("500mb") == 500 * 10**6
    assert parse_size("1e9") == 10**9
    assert parse_size(123) == 123
    with pytest.raises(QError, match="cannot read size"):
        parse_size("lots")
