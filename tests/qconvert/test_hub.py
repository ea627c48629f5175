"""Hub push and pull, end to end through the real huggingface_hub client against a fake Hub on 127.0.0.1.

tests/hub_server.py implements the endpoints huggingface_hub 2.4 calls; HF_ENDPOINT points the
client at it and HF_HOME at a temporary cache. Artifacts are tiny and built here with
transformers / peft (the peers whose files we publish).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner
from hub_server import FakeHub, git_blob_oid
from huggingface_hub import ModelCard

from qconvert.cli import main as qconvert_main
from qconvert.cli_push import push as push_command
from qformats.errors import QError
from qformats.hub_pull import pull, resolve_source
from qformats.hub_push import push_after, push_folder
from qformats.model_card import CARD_MARKER

ORIGINAL = "HuggingFaceTB/SmolLM2-135M-Instruct"
GOOD, BAD = "hf_good", "hf_bad"


# ---------------------------------------------------------------- fixtures and tiny artifacts


@pytest.fixture
def hub(tmp_path, monkeypatch):
    server = FakeHub(tokens={GOOD: "tester", "hf_other": "other"})
    server.start()
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    for var in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    yield server
    server.stop()


@pytest.fixture
def no_backoff(monkeypatch):
    """huggingface_hub retries a dropped commit 5 times with 1-8 s waits; the test skips the waiting only."""
    import huggingface_hub.utils._http as hf_http

    class _Time:
        def __getattr__(self, name):
            import time

            return getattr(time, name)

        @staticmethod
        def sleep(_seconds):
            pass

    monkeypatch.setattr(hf_http, "time", _Time())


def _tiny_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "model_max_length": 64}))  # fmt: skip


def _tiny_llama(folder: Path, seed: int = 0, dtype=torch.float16) -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                      eos_token_id=256, bos_token_id=256, pad_token_id=256)  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder)
    _tiny_tokenizer(folder)
    return model


@pytest.fixture
def original(tmp_path) -> Path:
    """A model as it sits in the Hub cache after a download of ORIGINAL: only its path names the repo."""
    folder = tmp_path / "hub_cache" / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / ("ab" * 20)
    folder.mkdir(parents=True)
    _tiny_llama(folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: HuggingFaceTB/SmolLM2-135M\n---\n# SmolLM2\n")
    return folder


@pytest.fixture
def merged(tmp_path, original) -> Path:
    """A merged fp16 model whose config points at the local copy of ORIGINAL (as an export would)."""
    folder = tmp_path / "merged"
    _tiny_llama(folder, seed=1)
    config = json.loads((folder / "config.json").read_text())
    config["_name_or_path"] = str(original)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture
def adapter(tmp_path, original) -> Path:
    """A real PEFT LoRA adapter over the local copy of ORIGINAL."""
    from peft import LoraConfig, get_peft_model

    base = transformers.AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32)
    torch.manual_seed(2)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM", init_lora_weights=False))  # fmt: skip
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    return folder


def _invoke(args: list[str]):
    result = CliRunner().invoke(qconvert_main, args)
    return result.exit_code, result.stdout, result.stderr


def _local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _card_from_hub(repo_id: str, revision: str | None = None) -> ModelCard:
    """Pull the repo back (our pull helper, through the fake Hub) and parse README.md with huggingface_hub."""
    folder = resolve_source(repo_id, revision=revision, token=GOOD, report=None)
    return ModelCard.load(folder / "README.md")


# ---------------------------------------------------------------- push: success paths


def test_push_merged_creates_repo_uploads_every_file_and_card(hub, merged, original):
    code, out, err = _invoke(["push", str(merged), "tester/tiny-merged", "--token", GOOD])
    assert code == 0, err
    assert out.strip().startswith(f"{hub.endpoint}/tester/tiny-merged/commit/")

    # The repo exists, public, and holds exactly the local folder (card written into it) plus the Hub's .gitattributes.
    repo = hub.repos["tester/tiny-merged"]
    assert not repo.private
    remote = hub.files("tester/tiny-merged")
    local = _local_files(merged)
    assert set(local) == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                          "tokenizer_config.json", "README.md"}  # fmt: skip
    assert set(remote) == set(local) | {".gitattributes"}
    for name, data in local.items():
        if name != "config.json":
            assert remote[name] == data, name
    # config.json names its source by a local (Hub-cache) path: what is pushed names it by repo id instead.
    assert json.loads(remote["config.json"]) == json.loads(local["config.json"]) | {"_name_or_path": ORIGINAL}
    assert CARD_MARKER in local["README.md"].decode()
    assert ("GET", "/api/whoami-v2", f"Bearer {GOOD}") in hub.requests

    card = _card_from_hub("tester/tiny-merged")
    assert card.data.base_model == ORIGINAL  # from the Hub-cache path of the local source folder
    assert card.data.base_model_relation == "merge"
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.license == "apache-2.0"  # carried from the source folder's card
    assert card.data.tags == ["qlora", "merge"]
    assert "AutoModelForCausalLM.from_pretrained(\"tester/tiny-merged\"" in card.text
    assert 'LLM(model="tester/tiny-merged")' in card.text
    assert "qserve generate --model tester/tiny-merged" in card.text


def test_push_adapter_to_new_branch_private(hub, adapter):
    result = push_folder(adapter, "tester/tiny-lora", private=True, revision="exp-1", token=GOOD,
                         commit_message="first adapter", report=None)  # fmt: skip
    repo = hub.repos["tester/tiny-lora"]
    assert repo.private
    assert set(repo.branches) == {"main", "exp-1"}
    assert set(hub.files("tester/tiny-lora", "main")) == {".gitattributes"}  # main untouched
    on_branch = hub.files("tester/tiny-lora", "exp-1")
    assert set(on_branch) == {".gitattributes", "adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert on_branch["adapter_model.safetensors"] == (adapter / "adapter_model.safetensors").read_bytes()
    assert repo.commits[repo.branches["exp-1"]].message == "first adapter"
    assert result.commit == repo.branches["exp-1"] and result.url.endswith(result.commit)

    card = _card_from_hub("tester/tiny-lora", revision="exp-1")
    assert card.data.base_model == ORIGINAL  # adapter_config names a local folder; followed to its repo id
    assert card.data.base_model_relation == "adapter"
    assert card.data.library_name == "peft"
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.license == "apache-2.0"
    assert card.data.tags == ["qlora", "nf4", "4-bit", "bitsandbytes", "lora", "peft"]
    assert "| rank r | 4 |" in card.text and "| alpha | 8 |" in card.text and "| scaling | 2 |" in card.text
    assert 'PeftModel.from_pretrained(base, "tester/tiny-lora")' in card.text
    assert "enable_lora=True, max_lora_rank=8" in card.text
    assert f"qserve --model {ORIGINAL} --adapter tiny-lora=tester/tiny-lora" in card.text


def test_push_again_updates_card_and_name_without_owner_goes_to_user(hub, merged):
    push_folder(merged, "tiny", token=GOOD, report=None)  # no owner: the token's user
    first = hub.repos["tester/tiny"].branches["main"]
    (merged / "generation_config.json").write_text(json.dumps({"max_new_tokens": 7}))
    push_folder(merged, "tester/tiny", token=GOOD, report=None)  # repo exists: reused, one new commit
    repo = hub.repos["tester/tiny"]
    assert repo.commits[repo.branches["main"]].parent == first
    assert json.loads(hub.files("tester/tiny")["generation_config.json"]) == {"max_new_tokens": 7}


def test_hand_written_card_keeps_its_text_and_gains_metadata(hub, merged):
    (merged / "README.md").write_text("# My merge\n\nWritten by hand.\n")
    push_folder(merged, "tester/handmade", token=GOOD, report=None)
    card = ModelCard(hub.files("tester/handmade")["README.md"].decode())
    assert "# My merge\n\nWritten by hand." in card.text and CARD_MARKER not in card.text
    assert card.data.base_model == ORIGINAL and card.data.base_model_relation == "merge"


def test_dry_run_lists_files_sizes_and_card_without_network(hub, merged, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    code, out, err = _invoke(["push", str(merged), "tester/dry", "--dry-run"])
    assert code == 0, err
    assert hub.requests == [] and not (merged / "README.md").exists()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
        size = (merged / name).stat().st_size if name != "README.md" else None
        line = next(line for line in out.splitlines() if line.strip().startswith(name + " "))
        if size is not None and size < 1000:
            assert line.strip().endswith(f"{size} B"), line
    card_text = out.split("----- README.md -----\n", 1)[1]
    card = ModelCard(card_text)
    assert card.data.base_model == ORIGINAL and card.data.library_name == "transformers"


@pytest.mark.parametrize("kind", ["merged", "nf4"])
def test_card_snippets_are_valid_python_and_the_transformers_one_runs(hub, kind, request, tmp_path):
    push_folder(request.getfixturevalue(kind), "tester/runnable", token=GOOD, report=None)
    text = hub.files("tester/runnable")["README.md"].decode()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    assert len(blocks) == 2
    for block in blocks:
        ast.parse(block)
    # Run the transformers snippet as a user would, in a fresh process, against the fake Hub
    # (for NF4: transformers + bitsandbytes read the quantization_config from config.json).
    env = {**os.environ, "HF_HOME": str(tmp_path / "user_cache"), "HF_TOKEN": GOOD}
    run = subprocess.run([sys.executable, "-c", blocks[0]], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("The capital of France is")


# ---------------------------------------------------------------- push: refusals and failures


def _corrupt_copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_unverifiable_folders_are_refused_before_any_network(hub, merged, adapter, tmp_path):
    truncated = _corrupt_copy(merged, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) - 100])
    code, out, err = _invoke(["push", str(truncated), "tester/x", "--token", GOOD])
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and "model.safetensors" in err and "truncated" in err

    wrong_rank = _corrupt_copy(adapter, tmp_path / "wrong_rank")
    config = json.loads((wrong_rank / "adapter_config.json").read_text())
    config["r"] = 8
    (wrong_rank / "adapter_config.json").write_text(json.dumps(config))
    code, _, err = _invoke(["push", str(wrong_rank), "tester/x", "--token", GOOD])
    assert code == 1 and err.count("\n") == 1 and "do not match rank 8" in err

    pickled = _corrupt_copy(merged, tmp_path / "pickled")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    code, _, err = _invoke(["push", str(pickled), "tester/x", "--token", GOOD])
    assert code == 1 and "pickle" in err

    code, _, err = _invoke(["push", str(tmp_path), "tester/x", "--token", GOOD])
    assert code == 1 and "neither config.json" in err
    assert hub.requests == [] and hub.repos == {}


def test_bad_token_is_one_clear_line(hub, merged):
    (merged / "config.json").write_text(json.dumps({**json.loads((merged / "config.json").read_text()),
                                                    "_name_or_path": ""}))  # no base: no note either  # fmt: skip
    code, out, err = _invoke(["push", str(merged), "tester/x", "--token", BAD])
    assert code == 1 and out == ""
    assert err == ("error: push to tester/x did not complete: the Hub rejected the token (401 Unauthorized at "
                   f"{hub.endpoint}): check --token or HF_TOKEN, or run `hf auth login`\n")  # fmt: skip
    assert hub.repos == {}


def test_no_write_access_to_the_namespace(hub, merged):
    code, _, err = _invoke(["push", str(merged), "other/x", "--token", GOOD])
    assert code == 1 and err.count("\n") == 1 and "403" in err and hub.repos == {}


def test_network_drop_mid_upload_claims_nothing(hub, merged, no_backoff):
    hub.drop = {"commit"}  # the server reads half the commit body, then hangs up
    code, out, err = _invoke(["push", str(merged), "tester/dropped", "--token", GOOD])
    assert code == 1
    assert out == ""  # no URL: nothing is reported as pushed
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: push to tester/dropped did not complete: network error talking to ")
    assert last.endswith("run the same command again to finish (files already on the Hub are skipped)")
    assert "pushed" not in err
    repo = hub.repos["tester/dropped"]
    assert list(repo.commits) == [repo.branches["main"]]  # only the Hub's initial commit
    assert sum(1 for m, p, _ in hub.requests if p.endswith("/commit/main")) >= 1


def test_push_after_says_the_local_output_is_fine(hub, merged):
    with pytest.raises(QError, match=r"is complete, but push to tester/x did not complete: the Hub rejected") as e:
        push_after(merged, "tester/x", token=BAD, report=None)
    assert f"retry with: qconvert push {merged} tester/x" in str(e.value)


def test_offline_push_refused(hub, merged, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(QError, match="HF_HUB_OFFLINE is set"):
        push_folder(merged, "tester/x", token=GOOD, report=None)
    assert hub.requests == []


def test_push_help_explains():
    result = CliRunner().invoke(push_command, ["--help"])
    assert result.exit_code == 0
    for word in ("--dry-run", "--revision", "--private", "--commit-message", "--token", "NF4", "adapter", "merged"):
        assert word in result.stdout


# ---------------------------------------------------------------- pull


def _seed_repo(hub: FakeHub, repo_id: str, files: dict[str, bytes], **kw) -> str:
    from hub_server import Commit, _commit_oid

    repo = hub.create_repo(repo_id, **kw)
    head = repo.commits[repo.branches["main"]]
    all_files = {**head.files, **files}
    commit = Commit(_commit_oid(head.oid, all_files, "seed"), all_files, "seed", head.oid)
    repo.commits[commit.oid] = commit
    repo.branches["main"] = commit.oid
    return commit.oid


def test_pull_downloads_reports_then_serves_offline_from_cache(hub, tmp_path, monkeypatch):
    files = {"config.json": b'{"model_type": "llama"}', "model.safetensors": os.urandom(3000), "sub/notes.txt": b"hi"}
    oid = _seed_repo(hub, "tester/pulled", files)
    lines: list[str] = []
    first = pull("tester/pulled", token=GOOD, report=lines.append)
    cache = tmp_path / "hf_home" / "hub" / "models--tester--pulled" / "snapshots" / oid
    assert first.path == cache  # HF_HOME honoured at call time
    assert first.commit == oid and first.downloaded_files == 4  # three files plus the Hub's .gitattributes
    assert lines == [f"downloaded 4 files ({first.downloaded_bytes / 1000:.1f} KB) of tester/pulled@{oid[:10]} into {cache}"]
    for name, data in files.items():
        assert (cache / name).read_bytes() == data

    again = pull("tester/pulled", token=GOOD, report=lines.append)
    assert again.path == cache and again.downloaded_files == 0 and "already in the cache" in lines[-1]

    hub.stop()  # no Hub at all now
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = pull("tester/pulled", report=lines.append)
    assert offline.path == cache and lines[-1].startswith("HF_HUB_OFFLINE: using cached tester/pulled@")
    with pytest.raises(QError, match=r"tester/never is not in the local Hub cache .* HF_HUB_OFFLINE is set"):
        pull("tester/never", report=None)


def test_pull_revision_and_private_and_gated(hub):
    _seed_repo(hub, "tester/private", {"config.json": b"{}"}, private=True)
    repo = hub.repos["tester/private"]
    repo.branches["v2"] = repo.branches["main"]
    assert (resolve_source("tester/private", revision="v2", token=GOOD, report=None) / "config.json").is_file()
    with pytest.raises(QError, match=r"tester/private is not a local folder and no Hub repo .* pass --token"):
        resolve_source("tester/private", report=None)
    with pytest.raises(QError, match=r"tester/private has no revision 'nope'"):
        resolve_source("tester/private", revision="nope", token=GOOD, report=None)
    with pytest.raises(QError, match="the Hub rejected the token"):
        resolve_source("tester/private", token=BAD, report=None)

    _seed_repo(hub, "org/gated", {"config.json": b"{}"}, gated=True)
    with pytest.raises(QError, match=r"org/gated is gated: accept its terms .* pass a token"):
        resolve_source("org/gated", report=None)
    assert (resolve_source("org/gated", token=GOOD, report=None) / "config.json").is_file()


def test_local_folders_pass_through_and_bad_names_are_clear(hub, tmp_path):
    assert resolve_source(tmp_path, report=None) == tmp_path
    assert pull(str(tmp_path), report=None).describe() == f"using local folder {tmp_path}"
    with pytest.raises(QError, match="--revision applies to Hub repo ids"):
        resolve_source(tmp_path, revision="main", report=None)
    with pytest.raises(QError, match="no such folder"):
        resolve_source(tmp_path / "missing", report=None)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(QError, match="expected a folder"):
        resolve_source(tmp_path / "file.txt", report=None)
    assert hub.requests == []


def test_fake_hub_blob_ids_match_git():
    # the client compares these with its own sha1 to skip unchanged files
    assert git_blob_oid(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"


# ---------------------------------------------------------------- NF4 checkpoints from `qconvert quantize`


@pytest.fixture
def nf4(tmp_path, original) -> Path:
    from qconvert.quantize import quantize_checkpoint

    quantize_checkpoint(original, tmp_path / "nf4", progress=False)
    return tmp_path / "nf4"


def test_push_nf4_card_states_the_quantization(hub, nf4):
    code, _, err = _invoke(["push", str(nf4), "tester/tiny-nf4", "--token", GOOD])
    assert code == 0, err
    remote = hub.files("tester/tiny-nf4")
    assert {n for n in remote if n != ".gitattributes"} == set(_local_files(nf4))
    assert "qconvert.json" in remote and remote["model.safetensors"] == (nf4 / "model.safetensors").read_bytes()

    card = _card_from_hub("tester/tiny-nf4")
    assert card.data.base_model == ORIGINAL  # manifest source path -> Hub-cache folder -> repo id
    assert card.data.base_model_relation == "quantized"
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.license == "apache-2.0"
    assert card.data.tags == ["qlora", "nf4", "4-bit", "bitsandbytes"]
    assert "| quant type | nf4 |" in card.text and "| block size | 64 |" in card.text
    assert "| tensors | 7 quantized, 5 kept |" in card.text
    assert 'LLM(model="tester/tiny-nf4", quantization="bitsandbytes")' in card.text


def test_nf4_with_a_changed_shard_is_refused(hub, nf4):
    shard = nf4 / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, valid header: only the manifest's sha256 can tell
    shard.write_bytes(bytes(data))
    code, out, err = _invoke(["push", str(nf4), "tester/x", "--token", GOOD])
    assert code == 1 and out == "" and err.count("\n") == 1
    assert "manifest check failed" in err and "model.safetensors: sha256 differs" in err
    assert hub.requests == []


def test_quantize_from_hub_id_then_push_keeps_the_repo_id(hub, original, tmp_path):
    from qconvert.quantize import quantize_checkpoint

    _seed_repo(hub, ORIGINAL, {p.name: p.read_bytes() for p in original.iterdir()})
    quantize_checkpoint(ORIGINAL, tmp_path / "from_hub", progress=False)
    result = push_folder(tmp_path / "from_hub", "tester/from-hub", token=GOOD, report=None)
    card = ModelCard(result.card)
    assert card.data.base_model == ORIGINAL and card.data.base_model_relation == "quantized"
    assert f"| quantized from | `{ORIGINAL}` at `{hub.repos[ORIGINAL].branches['main'][:10]}` |" in card.text


def test_quantize_push_to_hub(hub, original, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", GOOD)  # the usual way to give the token to commands without --token
    out = tmp_path / "q"
    code, stdout, err = _invoke(["quantize", str(original), str(out), "--quiet", "--push-to-hub", "tester/q",
                                 "--private"])  # fmt: skip
    assert code == 0, err
    assert stdout.strip().splitlines()[-1].startswith(f"{hub.endpoint}/tester/q/commit/")
    assert hub.repos["tester/q"].private
    assert hub.files("tester/q")["qconvert.json"] == (out / "qconvert.json").read_bytes()
    assert ModelCard(hub.files("tester/q")["README.md"].decode()).data.base_model_relation == "quantized"


def test_finetune_push_to_hub_card_has_training_facts(hub, nf4, original, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", GOOD)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{w}?", "completion": f"ANSWER: {w}"}) + "\n"
                            for w in ["fox", "dog", "cat", "owl", "bee", "elk", "yak", "emu"]))  # fmt: skip
    out = tmp_path / "ft"
    code, stdout, err = _invoke(["finetune", str(nf4), str(data), str(out), "--rank", "4", "--alpha", "8",
                                 "--steps", "2", "--batch-size", "2", "--eval-fraction", "0.25",
                                 "--no-chat-template", "--quiet", "--push-to-hub", "tester/ft"])  # fmt: skip
    assert code == 0, err
    assert stdout.strip().splitlines()[-1].startswith(f"{hub.endpoint}/tester/ft/commit/")
    remote = hub.files("tester/ft")
    for name in ("adapter_config.json", "adapter_model.safetensors", "qconvert.json"):
        assert remote[name] == (out / name).read_bytes()
    card = ModelCard(remote["README.md"].decode())
    assert card.data.base_model == ORIGINAL  # adapter -> local NF4 folder -> its manifest's source -> repo id
    assert card.data.base_model_relation == "adapter" and card.data.library_name == "peft"
    assert card.data.license == "apache-2.0"
    training = json.loads((out / "qconvert.json").read_text())["training"]
    assert f"| steps | {training['steps']} |" in card.text and training["steps"] == 2
    assert f"| final train loss | {training['final train loss']:.4g} |" in card.text
    assert f"| eval loss after | {training['eval loss after']:.4g} |" in card.text
    assert 'quantization="bitsandbytes", enable_lora=True, max_lora_rank=8' in card.text

    # The card's transformers snippet loads ORIGINAL in 4-bit with bitsandbytes (as the adapter was trained)
    # and applies the adapter with PEFT, all from the Hub, in a fresh process.
    _seed_repo(hub, ORIGINAL, {p.name: p.read_bytes() for p in original.iterdir()})
    snippet = re.findall(r"```python\n(.*?)```", card.text, re.DOTALL)[0]
    assert "BitsAndBytesConfig(load_in_4bit=True" in snippet and f'from_pretrained("{ORIGINAL}"' in snippet
    env = {**os.environ, "HF_HOME": str(tmp_path / "user_cache")}
    run = subprocess.run([sys.executable, "-c", snippet], env=env, capture_output=True, text=True, timeout=600,
                         check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("The capital of France is")


def test_runtime_takes_model_and_adapter_by_hub_id(hub, original, adapter, tmp_path):
    from qserve.loader import load_model
    from qserve.lora import load_lora

    _seed_repo(hub, ORIGINAL, {p.name: p.read_bytes() for p in original.iterdir()})
    push_folder(adapter, "tester/lora-by-id", token=GOOD, report=None)
    tokens = torch.tensor([[5, 17, 99, 3]])
    local = load_model(original)
    load_lora(local, adapter)
    remote = load_model(ORIGINAL)  # public repo: no token needed
    assert load_lora(remote, "tester/lora-by-id") == load_lora(load_model(original), adapter)
    with torch.no_grad():
        assert torch.equal(remote(tokens), local(tokens))


def test_qserve_export_push_to_hub(hub, original, adapter, tmp_path, monkeypatch):
    from qserve.cli import main as qserve_main

    monkeypatch.setenv("HF_TOKEN", GOOD)
    out = tmp_path / "merged-out"
    result = CliRunner().invoke(qserve_main, ["export", "--model", str(original), "--adapter", str(adapter),
                                              "--out", str(out), "--push-to-hub", "tester/merged"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    remote = hub.files("tester/merged")
    for p in out.iterdir():
        if p.name != "README.md":
            assert remote[p.name] == p.read_bytes()
    assert ModelCard(remote["README.md"].decode()).data.library_name == "transformers"
