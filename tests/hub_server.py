"""A small stand-in for the Hugging Face Hub's HTTP API, for testing pushes through the real `huggingface_hub` client.

It answers only what `HfApi.create_repo`, `HfApi.create_branch` and `HfApi.upload_folder` (huggingface_hub 2.x,
small files) call:

    POST /api/repos/create                              create a repo (409 when it exists; `exist_ok` handles it)
    POST /api/validate-yaml                             check README.md metadata (sent whenever README.md is uploaded)
    POST /api/{type}s/{repo_id}/branch/{branch}         create a branch from `startingPoint` (default: main)
    POST /api/{type}s/{repo_id}/preupload/{revision}    say how each file travels: always `regular`, i.e. inline
                                                        (base64) in the commit, so no LFS or Xet storage is involved
    POST /api/{type}s/{repo_id}/commit/{revision}       NDJSON: a header line, then one `file` line per file

Anything else gets a 404 and is recorded in `unhandled`, so a test can tell when the client starts calling
something new. What the server received is kept on the object: `repos` (visibility, branches with file bytes,
commits), `requests` (method and path, in order) and `authorizations` (the Authorization header of each request).
Set `fail_next_commit_with` to an HTTP status to make the next `fail_commit_count` commits answer it (the client
itself retries a commit answered 408, 429 or 5xx up to 5 times, so a Hub that stays down needs a count above 5).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_REPO_ACTION = re.compile(
    r"^/api/(?P<type>models|datasets|spaces)/(?P<repo>.+)/(?P<action>preupload|commit|branch)/(?P<rev>[^/]+)$"
)


@dataclass
class Repo:
    repo_type: str
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict] = field(default_factory=list)  # {"revision", "summary", "description", "oid", "paths"}


class HubError(Exception):
    """An error answer: HTTP status, message (the JSON "error" field), the Hub's X-Error-Code and extra JSON fields."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class HubServer:
    """Start with `with HubServer() as hub:` (127.0.0.1, a free port); `hub.url` is the endpoint to give the client."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.authorizations: list[str | None] = []
        self.unhandled: list[tuple[str, str]] = []
        self.commit_attempts = 0
        self.fail_next_commit_with: int | None = None
        self.fail_commit_count = 1
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="hub-server", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files on `revision` of `repo_id` (path -> bytes); empty when the repo or branch does not exist."""
        repo = self.repos.get(repo_id)
        return dict(repo.branches.get(revision, {})) if repo else {}

    # ---- endpoints: each takes the parsed request and returns (status, JSON body) or raises HubError ----

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        match = _REPO_ACTION.match(path)
        if method != "POST" or match is None:
            self.unhandled.append((method, path))
            raise HubError(404, f"Not implemented by the test Hub: {method} {path}")
        repo_id, revision = match["repo"], unquote(match["rev"])
        repo = self.repos.get(repo_id)
        if repo is None or f"{repo.repo_type}s" != match["type"]:
            raise HubError(404, f"Repository not found: {repo_id}", code="RepoNotFound")
        if match["action"] == "branch":
            return self._create_branch(repo, revision, json.loads(body or b"{}"))
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        if match["action"] == "preupload":
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        return self._commit(repo_id, repo, revision, body)

    def _create_repo(self, payload: dict) -> tuple[int, dict]:
        repo_id = "/".join(part for part in (payload.get("organization"), payload["name"]) if part)
        repo_type = payload.get("type") or "model"
        url = f"{self.url}/{repo_id}" if repo_type == "model" else f"{self.url}/{repo_type}s/{repo_id}"
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo", url=url)  # the client reads `url` even here
        self.repos[repo_id] = Repo(repo_type=repo_type, private=payload.get("visibility") == "private")
        return 200, {"url": url, "name": repo_id}

    def _create_branch(self, repo: Repo, branch: str, payload: dict) -> tuple[int, dict]:
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: {branch}")
        start = payload.get("startingPoint", "main")
        if start not in repo.branches:
            raise HubError(404, f"Invalid rev id: {start}", code="RevisionNotFound")
        repo.branches[branch] = dict(repo.branches[start])
        return 200, {}

    def _commit(self, repo_id: str, repo: Repo, revision: str, body: bytes) -> tuple[int, dict]:
        self.commit_attempts += 1
        if self.fail_next_commit_with is not None:
            status = self.fail_next_commit_with
            self.fail_commit_count -= 1
            if self.fail_commit_count <= 0:
                self.fail_next_commit_with, self.fail_commit_count = None, 1
            raise HubError(status, "The test Hub was told to fail this commit")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            raise HubError(400, "A commit starts with a header line")
        added: dict[str, bytes] = {}
        for line in lines[1:]:
            if line["key"] != "file" or line["value"].get("encoding") != "base64":
                raise HubError(400, f"Only inline base64 files are supported here, got {line['key']!r}")
            added[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        oid = hashlib.sha1(body + str(len(repo.commits)).encode()).hexdigest()
        repo.branches[revision].update(added)
        header = lines[0]["value"]
        repo.commits.append(
            {"revision": revision, "summary": header["summary"], "description": header.get("description", ""),
             "oid": oid, "paths": sorted(added)}
        )  # fmt: skip
        return 200, {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{repo_id}/commit/{oid}"}


def _handler_for(server: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer carries Content-Length

        def do_GET(self) -> None:
            self._serve()

        def do_POST(self) -> None:
            self._serve()

        def _serve(self) -> None:
            path = urlsplit(self.path).path
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {"Content-Type": "application/json"}
            with server._lock:  # one request at a time: the state is plain dicts
                server.requests.append((self.command, path))
                server.authorizations.append(self.headers.get("Authorization"))
                try:
                    if not (self.headers.get("Authorization") or "").startswith("Bearer "):
                        raise HubError(401, "Invalid credentials in Authorization header")
                    status, answer = server.handle(self.command, path, body)
                except HubError as err:
                    status, answer = err.status, {"error": err.message, **err.extra}
                    if err.code:
                        headers["X-Error-Code"] = err.code
            data = json.dumps(answer).encode()
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(data))}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args) -> None:  # the request list is the log; keep stderr quiet
            pass

    return Handler
