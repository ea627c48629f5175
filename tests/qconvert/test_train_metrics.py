"""finetune's metrics (metrics.jsonl, TensorBoard events, the card's loss curve) and what names the base.

Metrics are read back with TensorBoard's own event reader; pushes go to the fake Hub of tests/hub_server.py,
and every pushed byte is scanned for the local temporary path.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_finetune import cfg, tiny  # noqa: F401  (the tiny NF4 Llama and its dataset)
from test_hub import GOOD, hub  # noqa: F401  (the fake Hub)

from qconvert.cli import main as qconvert_main
from qconvert.finetune import _Run, finetune
from qformats.hub_push import push_folder

TAGS = {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_s", "train/memory_bytes", "eval/loss"}


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def f32(x: float) -> float:
    return float(np.float32(x))  # event files store scalars as float32


def test_metrics_jsonl_tensorboard_and_loss_curve(tiny, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    result = finetune(cfg(tiny, out, steps=4, eval_fraction=0.25, eval_every=2, report_to=["tensorboard"]))
    records = jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert records[0] == {"step": 0, "eval_loss": result.eval_loss_before}
    for record, entry in zip(records[1:], result.history):
        for key in ("loss", "lr", "grad_norm", "tokens", "seconds", "tokens_per_s", "memory_bytes"):
            assert record[key] == entry[key], key
        assert record["tokens_per_s"] == entry["tokens"] / entry["seconds"] and record["memory_bytes"] > 0
    assert records[2]["eval_loss"] == result.history[1]["eval_loss"]  # --eval-every 2
    assert records[4]["eval_loss"] == result.eval_loss_after and "eval_loss" not in records[1]
    assert records[1]["lr"] == 0.0 and records[2]["lr"] == 3e-3  # one warmup step (3% of 4, rounded up)

    # TensorBoard's own reader: in OUT, and live under the checkpoint folder, the same scalars.
    for logdir in (out / "runs", tmp_path / "out-checkpoints" / "runs"):
        got = scalars(logdir)
        assert set(got) == TAGS, logdir
        assert got["train/loss"] == [(r["step"], f32(r["loss"])) for r in records[1:]]
        assert got["train/learning_rate"] == [(r["step"], f32(r["lr"])) for r in records[1:]]
        assert got["train/grad_norm"] == [(r["step"], f32(r["grad_norm"])) for r in records[1:]]
        assert got["eval/loss"] == [(r["step"], f32(r["eval_loss"])) for r in records if "eval_loss" in r]

    # The card shows the loss curve, a PNG in OUT; the manifest lists it and the metrics with their hashes.
    png = (out / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    card = (out / "README.md").read_text()
    assert "![train and eval loss against step](loss.png)" in card
    files = json.loads((out / "qconvert.json").read_text())["files"]
    assert {"loss.png", "metrics.jsonl", "adapter_config.json"} <= set(files)


def test_resume_continues_the_metrics_without_duplicates(tiny, tmp_path, monkeypatch):  # noqa: F811
    whole = finetune(cfg(tiny, tmp_path / "whole", steps=6, dropout=0.0, report_to=["tensorboard"]))
    original = _Run._train_step

    def crash_at_step_5(self):
        if self.step == 4:
            raise RuntimeError("simulated crash")
        return original(self)

    monkeypatch.setattr(_Run, "_train_step", crash_at_step_5)
    run = cfg(tiny, tmp_path / "run", steps=6, dropout=0.0, save_every=2, report_to=["tensorboard"])
    with pytest.raises(RuntimeError, match="simulated crash"):
        finetune(run)
    monkeypatch.setattr(_Run, "_train_step", original)
    checkpoint = tmp_path / "run-checkpoints" / "step-0000004"
    assert [r["step"] for r in jsonl(checkpoint / "metrics.jsonl")] == [1, 2, 3, 4]
    finetune(cfg(tiny, tmp_path / "run", steps=6, dropout=0.0, save_every=2, report_to=["tensorboard"], resume=True))

    resumed, uninterrupted = jsonl(tmp_path / "run" / "metrics.jsonl"), jsonl(tmp_path / "whole" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(resumed, uninterrupted):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["lr"] == b["lr"]
    assert [s for s, _ in scalars(tmp_path / "run" / "runs")["train/loss"]] == [1, 2, 3, 4, 5, 6]
    # Live events: the resumed run logged steps 5 and 6 once more; TensorBoard's reader keeps each step once.
    live = scalars(tmp_path / "run-checkpoints" / "runs")["train/loss"]
    assert [s for s, _ in live] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in live] == [f32(r["loss"]) for r in resumed]
    assert whole.steps == 6


def test_card_says_when_matplotlib_is_absent(tiny, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    out = tmp_path / "out"
    finetune(cfg(tiny, out, steps=2))
    assert not (out / "loss.png").exists() and len(jsonl(out / "metrics.jsonl")) == 2
    card = (out / "README.md").read_text()
    assert "No loss curve: matplotlib was not installed when this adapter was trained" in card
    assert "loss.png" not in card and not (out / "runs").exists()  # no --report-to: no event files


def test_base_model_flows_into_adapter_config_card_and_manifest(tiny, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    finetune(cfg(tiny, out, steps=1, base_model="someone/tiny-llama"))
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "someone/tiny-llama"
    source = json.loads((out / "qconvert.json").read_text())["source"]
    assert source["base_model"] == "someone/tiny-llama" and source["path"] == "nf4" and source["data"] == "data.jsonl"
    card = ModelCard((out / "README.md").read_text())
    assert card.data.base_model == "someone/tiny-llama" and card.data.base_model_relation == "adapter"
    # Trained on a local NF4 copy: the card's snippet rebuilds it from the named base with bitsandbytes.
    assert 'from_pretrained("someone/tiny-llama", quantization_config=nf4' in card.text
    # Without --base-model and no lineage to the Hub: the folder's name, never its path.
    finetune(cfg(tiny, tmp_path / "plain", steps=1))
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["base_model_name_or_path"] == "nf4"


def test_quantize_base_model_is_recorded(tiny, tmp_path):  # noqa: F811
    r = CliRunner().invoke(qconvert_main, ["quantize", str(tiny / "fp"), str(tmp_path / "q"), "--quiet",
                                           "--base-model", "someone/tiny-llama"])  # fmt: skip
    assert r.exit_code == 0, r.output
    source = json.loads((tmp_path / "q" / "qconvert.json").read_text())["source"]
    assert source["base_model"] == "someone/tiny-llama" and source["path"] == "fp"
    assert str(tmp_path) not in (tmp_path / "q" / "qconvert.json").read_text()
    assert str(tiny) not in (tmp_path / "q" / "qconvert.json").read_text()


def _pushed(hub, repo_id: str) -> dict[str, bytes]:  # noqa: F811
    return {k: v for k, v in hub.files(repo_id).items() if k != ".gitattributes"}


def test_push_names_the_base_and_publishes_no_local_path(hub, tiny, tmp_path):  # noqa: F811
    out = tmp_path / "adapter"
    finetune(cfg(tiny, out, steps=2, eval_fraction=0.25, report_to=["tensorboard"]))
    # No lineage to the Hub: one warning line naming the way out, and a card without base_model.
    r = CliRunner().invoke(qconvert_main, ["push", str(out), "tester/no-base", "--token", GOOD])
    assert r.exit_code == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if "base_model" in line]
    assert warnings == [(f"warning: no Hub repo id found for the base model of {out}, so the card has no base_model "
                        "(name it with --base-model OWNER/NAME)")]  # fmt: skip
    assert ModelCard(_pushed(hub, "tester/no-base")["README.md"].decode()).data.base_model is None

    r = CliRunner().invoke(qconvert_main, ["push", str(out), "tester/named", "--token", GOOD,
                                           "--base-model", "someone/tiny-llama"])  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert "warning" not in r.stderr
    pushed = _pushed(hub, "tester/named")
    card = ModelCard(pushed["README.md"].decode())
    assert card.data.base_model == "someone/tiny-llama" and "![train and eval loss against step](loss.png)" in card.text
    assert {"loss.png", "metrics.jsonl", "adapter_model.safetensors", "qconvert.json"} <= set(pushed)
    assert any(name.startswith("runs/") and "tfevents" in name for name in pushed)
    for name, data in pushed.items():
        for local in (str(tmp_path), str(tiny), str(Path.home())):
            assert local.encode() not in data, (name, local)


def test_push_rewrites_absolute_paths_another_tool_wrote(hub, tiny, tmp_path):  # noqa: F811
    """A folder from another tool (or an older qconvert) names its base by absolute path: the push names it
    by the given base, and qconvert.json's sha256 follows the rewritten adapter_config.json."""
    out = tmp_path / "adapter"
    finetune(cfg(tiny, out, steps=1))
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tiny / "nf4")
    (out / "adapter_config.json").write_text(json.dumps(config))
    manifest = json.loads((out / "qconvert.json").read_text())
    from qformats.manifest import sha256_file

    manifest["files"]["adapter_config.json"] = sha256_file(out / "adapter_config.json")
    manifest["source"]["path"] = str(tiny / "nf4")
    (out / "qconvert.json").write_text(json.dumps(manifest))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "README.md"}

    push_folder(out, "tester/foreign", token=GOOD, base_model="someone/tiny-llama", report=None)
    pushed = _pushed(hub, "tester/foreign")
    assert json.loads(pushed["adapter_config.json"])["base_model_name_or_path"] == "someone/tiny-llama"
    remote_manifest = json.loads(pushed["qconvert.json"])
    assert remote_manifest["source"]["path"] == "nf4"
    import hashlib

    for name, digest in remote_manifest["files"].items():
        assert hashlib.sha256(pushed[name]).hexdigest() == digest, name  # the published manifest verifies
    for name, data in pushed.items():
        assert str(tmp_path).encode() not in data and str(tiny).encode() not in data, name
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "README.md"} == before  # local folder untouched


@pytest.mark.parametrize(("args", "message"), [
    (["--base-model", "not an id"], "error: --base-model 'not an id' is not a Hub repo id (owner/name"),
    (["--base-model", "/abs/path"], "error: --base-model '/abs/path' is not a Hub repo id (owner/name"),
    (["--report-to", "wandb"], "error: --report-to 'wandb': choose one of tensorboard"),
])  # fmt: skip
def test_bad_base_model_and_report_to_are_one_line(tiny, tmp_path, args, message):  # noqa: F811
    r = CliRunner().invoke(qconvert_main, ["finetune", str(tiny / "nf4"), str(tiny / "data.jsonl"),
                                           str(tmp_path / "out"), "--steps", "1", "--quiet", *args])  # fmt: skip
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and r.output.startswith(message), r.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out-checkpoints").exists()
    if args[0] == "--base-model":
        for command in (["quantize", str(tiny / "fp"), str(tmp_path / "q")], ["push", str(tiny / "nf4"), "me/x"]):
            r = CliRunner().invoke(qconvert_main, [*command, *args])
            assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
            assert r.output.startswith(message) and not (tmp_path / "q").exists()
