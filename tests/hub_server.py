"""A fake Hugging Face Hub on 127.0.0.1 for the tests: the few endpoints huggingface_hub 2.4 calls.

Point the real client at it with `HF_ENDPOINT` (or `endpoint=`). It implements, from the library
source: whoami-v2, repos/create, branch creation, preupload (every file "regular", so no LFS/xet
transfer is needed: keep test files small), the NDJSON commit, validate-yaml, model info at a
revision, the recursive tree listing, and HEAD/GET on `/{repo}/resolve/{rev}/{path}` for
snapshot_download. Errors carry the headers the client maps to its exception types
(X-Error-Code, X-Error-Message), so the client raises what it would raise against the real Hub.

Fault injection: `drop` names endpoints ("commit", "preupload", ...) whose requests are read
halfway and then the connection is closed without a response (a network failure mid-upload).
Every request is logged in `requests` as (method, path, authorization header).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


def git_blob_oid(data: bytes) -> str:
    """The git object id of a file, as the Hub reports it for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    files: dict[str, bytes]
    message: str
    parent: str | None


@dataclass
class Repo:
    repo_id: str
    private: bool
    gated: bool = False
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid

    def resolve(self, revision: str) -> Commit | None:
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)


class FakeHub:
    """Repos in memory; `tokens` maps valid tokens to user names."""

    def __init__(self, tokens: dict[str, str] | None = None) -> None:
        self.tokens = tokens if tokens is not None else {"hf_good": "tester"}
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.drop: set[str] = set()
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> str:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self.endpoint

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # ---------------------------------------------------------------- state helpers for tests

    def create_repo(self, repo_id: str, private: bool = False, gated: bool = False) -> Repo:
        repo = Repo(repo_id, private=private, gated=gated)
        first = Commit(_commit_oid(None, {".gitattributes": _GITATTRIBUTES}, "initial commit"),
                       {".gitattributes": _GITATTRIBUTES}, "initial commit", None)  # fmt: skip
        repo.commits[first.oid] = first
        repo.branches["main"] = first.oid
        self.repos[repo_id] = repo
        return repo

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        commit = self.repos[repo_id].resolve(revision)
        assert commit is not None, f"{repo_id} has no revision {revision}"
        return dict(commit.files)


# The real Hub seeds every new repo with a .gitattributes routing big binaries to LFS.
_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def _commit_oid(parent: str | None, files: dict[str, bytes], message: str) -> str:
    h = hashlib.sha1((parent or "").encode() + message.encode())
    for path in sorted(files):
        h.update(path.encode() + git_blob_oid(files[path]).encode())
    return h.hexdigest()


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    # ---------------------------------------------------------------- plumbing

    def _send(self, status: int, body: bytes | dict | list = b"", headers: dict[str, str] | None = None) -> None:
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers)

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _drop(self) -> None:
        """Read half the request, then close the socket without answering."""
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n // 2)
        self.close_connection = True
        self.connection.shutdown(2)

    def _user(self) -> tuple[bool, str | None]:
        """(ok, user): ok is False when a token was sent and is not valid."""
        auth = self.headers.get("Authorization")
        if not auth:
            return True, None
        token = auth.removeprefix("Bearer ").strip()
        user = self.hub.tokens.get(token)
        return user is not None, user

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        query = parse_qs(url.query)
        with self.hub.lock:
            self.hub.requests.append((self.command, url.path, self.headers.get("Authorization")))
        route, args = _route(self.command, parts)
        if route is None:
            return self._error(404, f"no route for {self.command} {url.path}")
        if route in self.hub.drop:
            return self._drop()
        ok, user = self._user()
        if not ok:
            return self._error(401, "Invalid credentials in Authorization header")
        getattr(self, f"_do_{route}")(user, query, *args)

    do_GET = do_POST = do_HEAD = _dispatch

    def _repo(self, repo_id: str, user: str | None, write: bool = False) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        owner = repo_id.split("/")[0]
        if repo is None or (repo.private and user != owner):
            self._error(401 if user is None else 404, "Repository not found", "RepoNotFound")
            return None
        if repo.gated and user is None:
            self._error(401, "Access to model is restricted: you must be authenticated", "GatedRepo")
            return None
        if write and user != owner:
            self._error(403, f"You don't have the rights to write to {repo_id}")
            return None
        return repo

    # ---------------------------------------------------------------- endpoints

    def _do_whoami(self, user, query):
        if user is None:
            return self._error(401, "Invalid credentials in Authorization header")
        self._send(200, {"type": "user", "name": user, "fullname": user, "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})  # fmt: skip

    def _do_create_repo(self, user, query):
        payload = json.loads(self._body() or b"{}")
        if user is None:
            return self._error(401, "You must be authenticated to create a repo")
        namespace = payload.get("organization") or user
        if namespace != user:
            return self._error(403, f"You don't have the rights to create a repo under {namespace}")
        repo_id = f"{namespace}/{payload['name']}"
        if payload.get("type") not in (None, "model"):
            return self._error(400, "only model repos in the fake Hub")
        with self.hub.lock:
            if repo_id in self.hub.repos:  # the real Hub's 409 still carries the url (create_repo reads it)
                msg = "You already created this model repo"
                return self._send(409, {"error": msg, "url": f"{self.hub.endpoint}/{repo_id}"}, {"X-Error-Message": msg})
            self.hub.create_repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        self._send(200, {"url": f"{self.hub.endpoint}/{repo_id}", "name": repo_id, "id": repo_id})

    def _do_create_branch(self, user, query, repo_id, branch):
        payload = json.loads(self._body() or b"{}")
        repo = self._repo(repo_id, user, write=True)
        if repo is None:
            return
        with self.hub.lock:
            if branch in repo.branches:
                return self._error(409, "Reference already exists")
            start = repo.resolve(payload.get("startingPoint") or "main")
            if start is None:
                return self._error(404, "Invalid starting point", "RevisionNotFound")
            repo.branches[branch] = start.oid
        self._send(200, {})

    def _do_validate_yaml(self, user, query):
        self._body()
        self._send(200, {"errors": [], "warnings": []})

    def _do_preupload(self, user, query, repo_id, revision):
        payload = json.loads(self._body())
        repo = self._repo(repo_id, user, write=True)
        if repo is None:
            return
        head = repo.resolve(revision)
        if head is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
             "oid": git_blob_oid(head.files[f["path"]]) if f["path"] in head.files else None}
            for f in payload["files"]
        ]  # fmt: skip
        self._send(200, {"files": files, "commitOid": head.oid})

    def _do_commit(self, user, query, repo_id, revision):
        body = self._body()
        repo = self._repo(repo_id, user, write=True)
        if repo is None:
            return
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = lines[0]
        if header.get("key") != "header":
            return self._error(400, "first NDJSON line must be the header")
        with self.hub.lock:
            head = repo.resolve(revision)
            if head is None or revision not in repo.branches:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            files = dict(head.files)
            for line in lines[1:]:
                value = line["value"]
                if line["key"] == "file":
                    if value.get("encoding") != "base64":
                        return self._error(400, "file content must be base64")
                    files[value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "deletedFile":
                    files.pop(value["path"], None)
                else:
                    return self._error(400, f"fake Hub does not support {line['key']} operations")
            message = header["value"]["summary"]
            commit = Commit(_commit_oid(head.oid, files, message), files, message, head.oid)
            repo.commits[commit.oid] = commit
            repo.branches[revision] = commit.oid
        self._send(200, {"commitUrl": f"{self.hub.endpoint}/{repo_id}/commit/{commit.oid}",
                         "commitOid": commit.oid, "pullRequestUrl": None})  # fmt: skip

    def _do_model_info(self, user, query, repo_id, revision="main"):
        repo = self._repo(repo_id, user)
        if repo is None:
            return
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        self._send(200, {"id": repo_id, "modelId": repo_id, "sha": commit.oid, "private": repo.private,
                         "gated": "auto" if repo.gated else False,
                         "siblings": [{"rfilename": p} for p in sorted(commit.files)]})  # fmt: skip

    def _do_tree(self, user, query, repo_id, revision, *path):
        repo = self._repo(repo_id, user)
        if repo is None:
            return
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        prefix = "/".join(path)
        entries = [
            {"type": "file", "path": p, "size": len(data), "oid": git_blob_oid(data)}
            for p, data in sorted(commit.files.items())
            if not prefix or p.startswith(prefix + "/")
        ]
        self._send(200, entries)

    def _do_resolve(self, user, query, repo_id, revision, *path):
        repo = self._repo(repo_id, user)
        if repo is None:
            return
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        name = "/".join(path)
        if name not in commit.files:
            return self._error(404, "Entry not found", "EntryNotFound")
        data = commit.files[name]
        self._send(200, data, {"X-Repo-Commit": commit.oid, "ETag": f'"{git_blob_oid(data)}"',
                               "Content-Type": "application/octet-stream"})  # fmt: skip


def _route(method: str, parts: list[str]) -> tuple[str | None, tuple]:
    """Map a request to (endpoint name, path arguments); repo ids are always `namespace/name`."""
    if parts[:2] == ["api", "whoami-v2"] and method == "GET":
        return "whoami", ()
    if parts[:3] == ["api", "repos", "create"] and method == "POST":
        return "create_repo", ()
    if parts[:2] == ["api", "validate-yaml"] and method == "POST":
        return "validate_yaml", ()
    if parts[:2] == ["api", "models"] and len(parts) >= 4:
        repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
        if not rest and method == "GET":
            return "model_info", (repo_id,)
        if len(rest) == 2 and rest[0] == "revision" and method == "GET":
            return "model_info", (repo_id, rest[1])
        if len(rest) == 2 and rest[0] == "branch" and method == "POST":
            return "create_branch", (repo_id, rest[1])
        if len(rest) == 2 and rest[0] == "preupload" and method == "POST":
            return "preupload", (repo_id, rest[1])
        if len(rest) == 2 and rest[0] == "commit" and method == "POST":
            return "commit", (repo_id, rest[1])
        if len(rest) >= 2 and rest[0] == "tree" and method == "GET":
            return "tree", (repo_id, rest[1], *rest[2:])
    if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
        return "resolve", (f"{parts[0]}/{parts[1]}", parts[3], *parts[4:])
    return None, ()
