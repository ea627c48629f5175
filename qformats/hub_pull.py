"""Resolve a model or adapter argument to a local folder: a path as-is, or a Hub repo id pulled into the cache.

Every command that takes a model or adapter calls `resolve_source` once, so all of them accept
`owner/name` ids the same way: `--revision` (branch, tag or commit), a token for gated or
private repos (`--token`, else `HF_TOKEN`, else `hf auth login`), `HF_HUB_OFFLINE=1` (cache
only), `HF_HOME` / `HF_HUB_CACHE` (where the cache lives), `HF_ENDPOINT` (which Hub). The
environment is read at call time, not at import time as huggingface_hub does, so a long-lived
process and the tests see the values in force when they call. What was downloaded (or found in
the cache) is reported on one line; failures become one-line `QError`s.

`explain_hub_error` is the one translation of huggingface_hub/network exceptions into user
messages; `qconvert push` uses it too.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from qformats.errors import QError

# `owner/name`: what the Hub accepts (letters, digits, `-`, `_`, `.`; no leading `-`/`.`, no `--`/`..`).
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def is_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text)) and "--" not in text and ".." not in text and not text.endswith((".", "-"))


# ---------------------------------------------------------------- environment, read at call time


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def hub_endpoint() -> str | None:
    endpoint = os.environ.get("HF_ENDPOINT")
    return endpoint.rstrip("/") if endpoint else None


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expandvars(os.environ["HF_HUB_CACHE"])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface" / "hub"


# ---------------------------------------------------------------- errors


def explain_hub_error(e: BaseException, repo_id: str, revision: str | None = None, token_given: bool = False) -> str:
    """One line saying what went wrong talking to the Hub about `repo_id`, and what to do."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        LocalTokenNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"{repo_id}@{revision}" if revision else repo_id
    endpoint = hub_endpoint() or "https://huggingface.co"
    if isinstance(e, LocalTokenNotFoundError):
        return "no Hugging Face token: pass --token, set HF_TOKEN, or run `hf auth login`"
    if isinstance(e, IncompleteSnapshotError):
        return f"{at}: the cached copy is incomplete and the Hub cannot be reached; run again online to finish it"
    if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        if hub_offline():
            return (f"{at} is not in the local Hub cache ({hub_cache_dir()}) and HF_HUB_OFFLINE is set: "
                    "run once online, or unset HF_HUB_OFFLINE")  # fmt: skip
        return f"cannot reach {endpoint} and {at} is not in the local Hub cache ({hub_cache_dir()})"
    if isinstance(e, HfHubHTTPError) and e.response is not None:
        status = e.response.status_code
        server_says = e.response.headers.get("X-Error-Message", "")
        if status == 401 and (server_says == "Invalid credentials in Authorization header" or "Invalid user token" in str(e)):
            return f"the Hub rejected the token (401 Unauthorized at {endpoint}): check --token or HF_TOKEN, or run `hf auth login`"
        if isinstance(e, GatedRepoError):
            return (f"{repo_id} is gated: accept its terms on {endpoint}/{repo_id}, then pass a token that has access "
                    "(--token or HF_TOKEN)")  # fmt: skip
        if isinstance(e, RevisionNotFoundError):
            return f"{repo_id} has no revision {revision or 'main'!r}"
        if isinstance(e, RemoteEntryNotFoundError):
            return f"{at}: a file it lists is missing on the Hub ({e.response.url})"
        if isinstance(e, RepositoryNotFoundError):
            hint = "check the id and that the token can read it" if token_given else "if it is private, pass --token"
            return f"{repo_id} is not a local folder and no Hub repo with that id was found ({status}); {hint}"
        if status == 403:
            return f"the token may not do this on {repo_id} (403 Forbidden): {server_says or 'it needs write access'}"
        return f"the Hub answered {status} for {repo_id}: {server_says or e.response.reason_phrase}"
    if isinstance(e, httpx2.HTTPError):
        return f"network error talking to {endpoint} about {at}: {e or type(e).__name__}"
    return f"{at}: {type(e).__name__}: {e}"


# ---------------------------------------------------------------- pull


@dataclass
class Pulled:
    """Where a source ended up, and what this call had to download."""

    path: Path
    repo_id: str | None = None  # None for a local folder
    commit: str | None = None
    downloaded_files: int = 0
    downloaded_bytes: int = 0
    from_cache_only: bool = False

    def describe(self) -> str:
        if self.repo_id is None:
            return f"using local folder {self.path}"
        where = f"{self.repo_id}@{(self.commit or '?')[:10]}"
        if self.from_cache_only:
            return f"HF_HUB_OFFLINE: using cached {where} from {self.path}"
        if self.downloaded_files == 0:
            return f"{where}: everything already in the cache ({self.path})"
        return f"downloaded {self.downloaded_files} files ({human_size(self.downloaded_bytes)}) of {where} into {self.path}"


def human_size(n: int) -> str:
    """Bytes in decimal units, as the Hub shows them: `512 B`, `1.5 MB`."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def _blobs(storage: Path) -> dict[str, int]:
    blobs = storage / "blobs"
    return {p.name: p.stat().st_size for p in blobs.iterdir() if p.is_file()} if blobs.is_dir() else {}


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def pull(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | None = None,
    allow_patterns: Sequence[str] | None = None,
    report: Callable[[str], None] | None = _stderr,
) -> Pulled:
    """A local folder as-is, or `owner/name` from the Hub into the HF cache (only what is missing)."""
    text = os.fspath(source)
    local = Path(text).expanduser()
    if local.exists():
        if not local.is_dir():
            raise QError(f"{text}: expected a folder (a checkpoint or adapter folder), got a file")
        if revision is not None:
            raise QError(f"--revision applies to Hub repo ids; {text} is a local folder")
        return Pulled(path=local)
    if not is_repo_id(text) or text.startswith((".", "/", "~")):
        raise QError(f"{text}: no such folder (Hub repo ids look like owner/name)")
    result = _snapshot(text, revision=revision, token=token, allow_patterns=allow_patterns)
    if report is not None:
        report(result.describe())
    return result


def resolve_source(source: str | os.PathLike, **kwargs) -> Path:
    """`pull(...)` for callers that only need the folder."""
    return pull(source, **kwargs).path


def _snapshot(repo_id: str, *, revision, token, allow_patterns) -> Pulled:
    from huggingface_hub import snapshot_download
    from huggingface_hub.file_download import repo_folder_name

    cache = hub_cache_dir()
    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    before = _blobs(storage)
    offline = hub_offline()
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            token=token,
            cache_dir=cache,
            endpoint=hub_endpoint(),
            local_files_only=offline,
            allow_patterns=list(allow_patterns) if allow_patterns else None,
        )
    except Exception as e:
        if _is_hub_error(e):
            raise QError(explain_hub_error(e, repo_id, revision, token_given=token is not None)) from e
        if isinstance(e, ValueError):  # huggingface_hub refuses what the repo lists, e.g. a file named `../x`
            raise QError(f"{repo_id}: cannot download this repo ({' '.join(str(e).split())})") from None
        raise
    new = {k: v for k, v in _blobs(storage).items() if k not in before}
    return Pulled(path=Path(path), repo_id=repo_id, commit=Path(path).name, downloaded_files=len(new),
                  downloaded_bytes=sum(new.values()), from_cache_only=offline)  # fmt: skip


def _is_hub_error(e: BaseException) -> bool:
    import httpx2
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    return isinstance(e, (HfHubHTTPError, EntryNotFoundError, LocalTokenNotFoundError, OfflineModeIsEnabled,
                          httpx2.HTTPError))  # fmt: skip
