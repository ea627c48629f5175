"""Publish an artifact folder (NF4 base, PEFT adapter, merged model) to the Hugging Face Hub.

`push_folder` refuses a folder that does not verify (the qconvert.json manifest's sha256s, or the
PEFT fields of an adapter), writes or refreshes the model card, then creates the repo, the branch
for `revision`, and uploads with `upload_folder` (huggingface_hub decides which files go as
regular git blobs and which as LFS/xet). Nothing is reported as done until the commit is
confirmed; any failure is one `QError` line. `dry_run` needs no network: it lists the files,
their sizes and the card. `push_after` is the tail of `qconvert quantize`/`finetune` and
`qserve export --push-to-hub` (`qserve.cli_options.push_if_asked`): the same push, in the same
process, with a message that says the local output is intact on failure. It sits in qformats, next
to the pull, so that every layer above can publish.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qformats.errors import QError
from qformats.hub_pull import explain_hub_error, hub_endpoint, hub_offline, is_repo_id
from qformats.lineage import check_base_model_id, portable_name
from qformats.manifest import MANIFEST_FILE
from qformats.model_card import Artifact, card_text, read_artifact, refresh_card

# Never published: hidden files and folders, temporaries, caches, training checkpoints.
IGNORE_PATTERNS = [".*", "*/.*", "*.tmp", "*.partial", "__pycache__/*", "*/__pycache__/*",
                   "checkpoints/*", "checkpoint-*/*", "*.lock"]  # fmt: skip
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass
class PushResult:
    repo_id: str
    files: list[tuple[str, int]]  # (path in repo, bytes), README.md included
    card: str
    kind: str
    url: str | None = None  # the commit's URL; None for a dry run
    commit: str | None = None
    revision: str | None = None


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def list_upload_files(folder: Path) -> list[tuple[str, int]]:
    from huggingface_hub.utils import filter_repo_objects

    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    kept = filter_repo_objects(paths, ignore_patterns=IGNORE_PATTERNS)
    return [(p, (folder / p).stat().st_size) for p in kept]


# ---------------------------------------------------------------- verification


def verify_artifact(art: Artifact) -> None:
    """Refuse what `qconvert inspect --verify` would refuse, and what others could not load."""
    folder = art.folder
    pickles = [p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES]
    if pickles:
        raise QError(f"{folder}: holds pickle files ({', '.join(sorted(pickles))}); qconvert publishes safetensors only")
    if (folder / "qconvert.json").is_file():
        from qformats.manifest import verify_manifest

        verify_manifest(folder)
    if art.kind == "adapter":
        _verify_adapter(art)
    else:
        _verify_weights(folder)


def _verify_weights(folder: Path) -> None:
    from qformats.checkpoint import open_checkpoint

    open_checkpoint(folder)  # config, every shard header against its file size, the index against the headers


def _verify_adapter(art: Artifact) -> None:
    """The PEFT fields, and A/B shapes that agree with r (qformats.peft_adapter's own checks)."""
    from qformats.peft_adapter import read_adapter

    read_adapter(art.folder)


# ---------------------------------------------------------------- what leaves the machine


def _is_local_path(text: str) -> bool:
    return text.startswith(("/", "~", "\\\\")) or bool(len(text) > 2 and text[1] == ":" and text[2] in "/\\")


def _portable(value: Any, base_model: str | None, key: str | None = None) -> Any:
    """`value` with every absolute local path replaced by the Hub id or the folder's name."""
    if isinstance(value, dict):
        return {k: _portable(v, base_model, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v, base_model) for v in value]
    if isinstance(value, str) and _is_local_path(value):
        return base_model if key == "base_model_name_or_path" and base_model else portable_name(value)
    return value


def portable_json_files(art: Artifact, names: list[str]) -> dict[str, bytes]:
    """New bytes for the JSON files among `names` that hold absolute local paths (a folder another tool
    wrote, or an older qconvert): the paths become Hub ids or folder names, and qconvert.json's sha256s
    follow the files rewritten. The local folder is left as it is."""
    rewritten: dict[str, bytes] = {}
    for name in names:
        if not name.endswith(".json") or name == MANIFEST_FILE:
            continue
        try:
            data = json.loads((art.folder / name).read_text())
        except (OSError, ValueError, RecursionError):
            continue  # not ours to judge: uploaded as it is
        portable = _portable(data, art.base_model)
        if portable != data:
            rewritten[name] = (json.dumps(portable, indent=2) + "\n").encode()
    if MANIFEST_FILE in names:
        manifest = _portable(dict(art.manifest), art.base_model)
        if isinstance(manifest.get("files"), dict):
            manifest["files"] = {k: hashlib.sha256(rewritten[k]).hexdigest() if k in rewritten else v for k, v in manifest["files"].items()}
        if manifest != art.manifest:
            rewritten[MANIFEST_FILE] = (json.dumps(manifest, indent=2) + "\n").encode()
    return rewritten


# ---------------------------------------------------------------- push


def _describe(files: list[tuple[str, int]]) -> str:
    total = sum(n for _, n in files)
    return f"{len(files)} files, {total / 1e6:.2f} MB"


def push_folder(
    path: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    dry_run: bool = False,
    report: Callable[[str], None] | None = _stderr,
    base_model: str | None = None,
) -> PushResult:
    """Verify `path`, write its card, upload it to `repo_id` (created if needed) on `revision` (created if needed).

    `base_model` (a Hub repo id) names the base where the folder's lineage does not lead to one."""
    say = report or (lambda _line: None)
    check_base_model_id(base_model)
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise QError(f"{path}: no such folder")
    art = read_artifact(folder)
    art.base_model = base_model or art.base_model
    verify_artifact(art)
    if "/" in repo_id and not is_repo_id(repo_id) or "/" not in repo_id and not is_repo_id(f"user/{repo_id}"):
        raise QError(f"{repo_id!r} is not a valid Hub repo id (owner/name: letters, digits, '-', '_', '.')")

    card = card_text(art, repo_id)
    files = [f for f in list_upload_files(folder) if f[0] != "README.md"] + [("README.md", len(card.encode()))]
    files.sort()
    result = PushResult(repo_id=repo_id, files=files, card=card, kind=art.kind, revision=revision)
    no_base = (f"warning: no Hub repo id found for the base model of {folder}, so the card has no base_model "
               "(name it with --base-model OWNER/NAME)")
    if dry_run:
        if not art.base_model:
            say(no_base)
        return result
    if hub_offline():
        raise QError("HF_HUB_OFFLINE is set: unset it to push (or use --dry-run)")

    import httpx2
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=hub_endpoint(), token=token)
    target = repo_id
    try:
        user = api.whoami()["name"]  # a bad token fails here, before anything is created
        if "/" not in repo_id:
            target = result.repo_id = f"{user}/{repo_id}"
        result.card = card_text(art, target)
        refresh_card(art, target)
        files = result.files = list_upload_files(folder)
        rewritten = portable_json_files(art, [name for name, _ in files])
        files = result.files = [(name, len(rewritten[name]) if name in rewritten else size) for name, size in files]
        repo_url = api.create_repo(target, private=private, exist_ok=True)
        if revision:
            api.create_branch(target, branch=revision, exist_ok=True)
        say(f"uploading {_describe(files)} from {folder} to {repo_url}" + (f" (branch {revision})" if revision else ""))
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=rewritten.get(name, folder / name))
                      for name, _ in files]  # fmt: skip
        info = api.create_commit(
            repo_id=target,
            operations=operations,
            revision=revision,
            commit_message=commit_message or f"Upload {_KIND_NAMES[art.kind]} with qconvert",
        )
    except Exception as e:
        if not _is_hub_error(e):
            raise
        why = explain_hub_error(e, target, revision, token_given=token is not None)
        if isinstance(e, httpx2.HTTPError) and not isinstance(e, HfHubHTTPError):
            why += "; run the same command again to finish (files already on the Hub are skipped)"
        raise QError(f"push to {target} did not complete: {why}") from e
    result.url, result.commit = info.commit_url, info.oid
    say(f"pushed {_describe(files)} to {target}" + (f"@{revision}" if revision else "") + f": {info.commit_url}")
    if not art.base_model:
        say(no_base)
    return result


_KIND_NAMES = {"nf4": "NF4 checkpoint", "adapter": "LoRA adapter", "merged": "merged model"}


def _is_hub_error(e: BaseException) -> bool:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    return isinstance(e, (HfHubHTTPError, LocalTokenNotFoundError, httpx2.HTTPError))


def push_after(path: str | os.PathLike, repo_id: str, **kwargs) -> PushResult:
    """`--push-to-hub` at the end of a run: push `path`; on failure say that the local output is complete."""
    try:
        return push_folder(path, repo_id, **kwargs)
    except QError as e:
        raise QError(f"{path} is complete, but {e}; retry with: qconvert push {path} {repo_id}") from e
