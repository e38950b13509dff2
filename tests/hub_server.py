"""A loopback Hugging Face Hub for tests: the subset of the Hub HTTP API that ``huggingface_hub`` 2.4 uses.

The real client talks to it (``HF_ENDPOINT``, ``HF_HUB_DISABLE_XET=1``, a dummy token); nothing is mocked
on the client side. Served, for model repos only:

* ``POST /api/repos/create`` (409 when the repo exists; ``exist_ok`` handles that), ``GET /api/whoami-v2``
* ``POST /api/validate-yaml``, ``POST /api/models/{repo}/preupload/{rev}`` (always ``regular``: no LFS)
* ``POST /api/models/{repo}/commit/{rev}`` (NDJSON: header, file, deletedFile, deletedFolder)
* ``GET /api/models/{repo}[/revision/{rev}]`` (repo info), ``GET /api/models/{repo}/tree/{rev}[/{path}]``
* ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``

Writes need ``Authorization: Bearer <token>``; a wrong token is a 401, an unknown repo a 404 with the
Hub's ``X-Error-Code: RepoNotFound``. Everything received is kept in :attr:`LoopbackHub.repos` (files of the
latest commit), :attr:`LoopbackHub.commits` and :attr:`LoopbackHub.requests`, for tests to assert on.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import pytest


TOKEN = "hf_loopback_test_token"
_REPO = r"(?P<repo>[^/]+/[^/]+)"


class LoopbackHub:
    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.repos: dict[str, dict[str, bytes]] = {}  # repo id -> files of its head commit
        self.history: dict[str, dict[str, dict[str, bytes]]] = {}  # repo id -> commit sha -> files
        self.heads: dict[str, str] = {}
        self.commits: list[dict] = []  # every commit received: repo, message, paths
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.endpoint = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> LoopbackHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- state -------------------------------------------------------------------------------
    def create(self, repo: str) -> None:
        self._commit(repo, {}, "initial commit")

    def _commit(self, repo: str, files: dict[str, bytes], message: str) -> str:
        sha = hashlib.sha1(f"{repo}:{len(self.commits)}:{message}".encode()).hexdigest()
        self.repos[repo] = files
        self.history.setdefault(repo, {})[sha] = dict(files)
        self.heads[repo] = sha
        self.commits.append({"repo": repo, "sha": sha, "message": message, "paths": sorted(files)})
        return sha

    def files_at(self, repo: str, revision: str) -> tuple[str, dict[str, bytes]]:
        sha = self.heads[repo] if revision in ("main", "HEAD") else revision
        return sha, self.history[repo][sha]


def _handler(hub: LoopbackHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        # -- helpers ---------------------------------------------------------------------------
        def _send(self, status: int, body=b"", headers: dict | None = None, head_only: bool = False) -> None:
            if not isinstance(body, bytes):
                body = json.dumps(body).encode()
                headers = {"Content-Type": "application/json", **(headers or {})}
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head_only:
                self.wfile.write(body)

        def _error(self, status: int, message: str, code: str | None = None) -> None:
            self._send(status, {"error": message}, {"X-Error-Code": code} if code else None)

        def _body(self) -> bytes:
            return self._payload

        def _authorized(self) -> bool:
            if self.headers.get("Authorization") == f"Bearer {hub.token}":
                return True
            self._error(401, "Invalid credentials in Authorization header")
            return False

        def _repo_known(self, repo: str) -> bool:
            if repo in hub.repos:
                return True
            self._error(404, f"Repository {repo} not found", "RepoNotFound")
            return False

        def _route(self, method: str):
            url = urlparse(self.path)
            path = unquote(url.path)
            hub.requests.append((method, path))
            self._payload = self.rfile.read(int(self.headers.get("Content-Length") or 0))  # always drained
            routes = [
                ("POST", r"/api/repos/create", self._create),
                ("GET", r"/api/whoami-v2", self._whoami),
                ("POST", r"/api/validate-yaml", lambda: self._send(200, {"errors": [], "warnings": []})),
                ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", self._preupload),
                ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", self._commit),
                ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", self._tree),
                ("GET", rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", self._info),
                ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
                ("HEAD", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
            ]
            for verb, pattern, action in routes:
                match = re.fullmatch(pattern, path)
                if verb == method and match:
                    with hub._lock:
                        return action(**match.groupdict())
            self._error(404, f"loopback hub: no route for {method} {path}")

        def do_GET(self) -> None:
            self._route("GET")

        def do_HEAD(self) -> None:
            self._route("HEAD")

        def do_POST(self) -> None:
            self._route("POST")

        # -- endpoints -------------------------------------------------------------------------
        def _create(self) -> None:
            data = json.loads(self._body() or b"{}")
            if not self._authorized():
                return
            repo = f"{data.get('organization') or 'user'}/{data['name']}"
            if repo in hub.repos:
                return self._send(
                    409, {"error": "You already created this model repo", "url": f"{hub.endpoint}/{repo}"}
                )
            hub.create(repo)
            self._send(200, {"url": f"{hub.endpoint}/{repo}", "name": repo})

        def _whoami(self) -> None:
            if self._authorized():
                self._send(
                    200, {"type": "user", "name": "user", "orgs": [], "auth": {"accessToken": {"role": "write"}}}
                )

        def _preupload(self, repo: str, rev: str) -> None:
            data = json.loads(self._body())
            if self._authorized() and self._repo_known(repo):
                files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in data["files"]]
                self._send(200, {"files": files, "commitOid": hub.heads[repo]})

        def _commit(self, repo: str, rev: str) -> None:
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            if not (self._authorized() and self._repo_known(repo)):
                return
            files = dict(hub.repos[repo])
            message = ""
            for line in lines:
                value = line["value"]
                if line["key"] == "header":
                    message = value.get("summary", "")
                elif line["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "deletedFile":
                    files.pop(value["path"], None)
                elif line["key"] == "deletedFolder":
                    files = {p: c for p, c in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
                else:
                    return self._error(400, f"loopback hub: unsupported commit operation {line['key']!r}")
            sha = hub._commit(repo, files, message)
            self._send(
                200, {"commitUrl": f"{hub.endpoint}/{repo}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}
            )

        def _info(self, repo: str, rev: str | None = None) -> None:
            if not self._repo_known(repo):
                return
            sha, files = hub.files_at(repo, rev or "main")
            siblings = [{"rfilename": p} for p in sorted(files)]
            self._send(
                200, {"id": repo, "modelId": repo, "sha": sha, "private": False, "siblings": siblings, "tags": []}
            )

        def _tree(self, repo: str, rev: str, sub: str | None = None) -> None:
            if not self._repo_known(repo):
                return
            _, files = hub.files_at(repo, rev)
            prefix = f"{sub.rstrip('/')}/" if sub else ""
            entries = [
                {"type": "file", "path": p, "size": len(c), "oid": hashlib.sha1(c).hexdigest()}
                for p, c in sorted(files.items())
                if p.startswith(prefix)
            ]
            self._send(200, entries)

        def _resolve(self, repo: str, rev: str, file: str) -> None:
            head = self.command == "HEAD"
            if not self._repo_known(repo):
                return
            if rev not in ("main", "HEAD") and rev not in hub.history[repo]:
                return self._send(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"}, head)
            sha, files = hub.files_at(repo, rev)
            if file not in files:
                return self._send(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}, head)
            content = files[file]
            etag = f'"{hashlib.sha1(content).hexdigest()}"'
            self._send(200, content, {"X-Repo-Commit": sha, "ETag": etag}, head_only=head)

    return Handler


@pytest.fixture
def loopback_hub(tmp_path, monkeypatch):
    """A running :class:`LoopbackHub`, with the real client of this process and of subprocesses pointed at it."""
    import huggingface_hub.constants as constants
    from huggingface_hub import hf_api

    with LoopbackHub() as hub:
        env = {
            "HF_ENDPOINT": hub.endpoint,
            "HF_HUB_DISABLE_XET": "1",
            "HF_TOKEN": hub.token,
            "HF_HOME": str(tmp_path / "hf_home"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }
        for key, value in env.items():  # subprocesses read these at import
            monkeypatch.setenv(key, value)
        # this process imported huggingface_hub already: patch what the client reads at call time
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
        monkeypatch.setattr(hf_api.api, "endpoint", hub.endpoint)  # the module-level HfApi() behind create_repo & co
        yield hub
