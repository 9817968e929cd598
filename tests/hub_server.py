"""A minimal stand-in for the Hugging Face Hub, so that tests can publish a model and load it back offline.

`HubServer` answers on 127.0.0.1 (a free port) only the requests that huggingface_hub 2.4 makes for:

- `HfApi.create_repo` (model repos)                 POST /api/repos/create
- `HfApi.upload_folder`                              POST /api/validate-yaml                 (when README.md is sent)
                                                     POST /api/models/{repo}/preupload/{rev}
                                                     POST /api/models/{repo}/commit/{rev}    (NDJSON)
- `hf_hub_download`, `snapshot_download`, hence      HEAD, GET /{repo}/resolve/{rev}/{path}
  transformers' `from_pretrained` and `pipeline`     GET /api/models/{repo}[/revision/{rev}] (model info)
                                                     GET /api/models/{repo}/tree/{rev}[/{path}]
- any client process, once (user-agent telemetry)    GET /api/agent-harnesses

The preupload answer puts every file in "regular" mode, so the commit carries the contents base64-encoded and no
LFS or Xet transfer ever happens. Each repo has a single branch, `main`, whose files are kept as plain files under
`root/{org}/{name}/`; a commit writes them there and moves the head to a new 40-hex id. ETags are git blob ids, like
the Hub's for regular files. Missing repos, revisions and files get 404s with the `X-Error-Code` that
huggingface_hub turns into its own errors (a missing optional file is then skipped cleanly). A request that matches
no endpoint is printed to stderr, kept in `unhandled` and answered 501.

`HubServer(faults=[("create_repo", "stall"), ("commit", "drop")])` misbehaves once per entry, on the next request to
that endpoint (named by its method here): "drop" closes the connection without an answer, "stall" never answers
(until the server stops), as a failing or unresponsive Hub does. (huggingface_hub retries some requests, pre-upload
and commit among them, five times: a fault there needs six entries to be seen.)
"""

import base64
import hashlib
import json
import re
import sys
import tempfile
import threading
import traceback
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

Response = tuple[int, dict[str, str], bytes]
REPO = r"(?P<repo>[^/]+/[^/]+)"


def json_response(data, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(data).encode()


def error_response(status: int, code: str | None, message: str, headers: dict[str, str] | None = None) -> Response:
    """huggingface_hub picks the exception class from `X-Error-Code` and the message from the body's `error`."""
    return json_response({"error": message}, status, {**({"X-Error-Code": code} if code else {}), **(headers or {})})


class Request(NamedTuple):
    headers: Message
    query: dict[str, str]
    body: bytes


class HubError(Exception):
    def __init__(self, response: Response):
        super().__init__(response[2].decode())
        self.response = response


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    """`with HubServer() as hub:` serves at `hub.url` until the block ends, then stops and deletes its files."""

    def __init__(self, faults: list[tuple[str, str]] = ()):
        self.faults = list(faults)  # (endpoint name, "drop" | "stall"), each used once
        self._released = threading.Event()  # stalled requests end when the server stops
        self._routes = [
            ("POST", re.compile(r"/api/repos/create"), self.create_repo),
            ("GET", re.compile(r"/api/agent-harnesses"), self.agent_harnesses),
            ("POST", re.compile(r"/api/validate-yaml"), self.validate_yaml),
            ("POST", re.compile(rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)"), self.preupload),
            ("POST", re.compile(rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)"), self.commit),
            ("GET", re.compile(rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?"), self.model_info),
            ("GET", re.compile(rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?"), self.tree),
            ("GET", re.compile(rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), self.resolve),
            ("HEAD", re.compile(rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), self.resolve),
        ]
        self._heads: dict[str, str] = {}  # repo id -> commit id of `main`
        self._lock = threading.RLock()
        self.unhandled: list[str] = []

    # ------------------------------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "HubServer":
        self._folder = tempfile.TemporaryDirectory(prefix="hub-server-")
        self.root = Path(self._folder.name)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.hub = self
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._released.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
        self._folder.cleanup()

    def repo_folder(self, repo_id: str) -> Path:
        return self.root / repo_id

    def fault(self, method: str, raw_path: str) -> str | None:
        """The next fault planned for this request's endpoint, if any (used up)."""
        path = urlsplit(raw_path).path
        name = next((e.__name__ for m, p, e in self._routes if m == method and p.fullmatch(path)), None)
        with self._lock:
            index = next((i for i, (endpoint, _) in enumerate(self.faults) if endpoint == name), None)
            return None if index is None else self.faults.pop(index)[1]

    def handle(self, method: str, raw_path: str, headers: Message, body: bytes) -> Response:
        path, query = urlsplit(raw_path)[2:4]
        request = Request(headers, {k: v[-1] for k, v in parse_qs(query).items()}, body)
        for route_method, pattern, endpoint in self._routes:
            match = pattern.fullmatch(path)
            if route_method == method and match:
                groups = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                try:
                    return endpoint(request, **groups)
                except HubError as error:
                    return error.response
                except Exception:  # a bug here: 400, not 500, which huggingface_hub would retry for half a minute
                    traceback.print_exc()
                    return error_response(400, None, f"hub_server failed on {method} {path}")
        self.unhandled.append(f"{method} {raw_path}")
        print(f"hub_server: no endpoint for {method} {raw_path}", file=sys.stderr)
        return error_response(501, None, f"hub_server does not implement {method} {path}")

    # ------------------------------------------------------------------------------------------ repo state

    def _head(self, repo: str, rev: str = "main") -> str:
        with self._lock:
            head = self._heads.get(repo)
        if head is None:
            raise HubError(error_response(404, "RepoNotFound", f"Repository {repo} not found"))
        if rev not in ("main", head):
            raise HubError(error_response(404, "RevisionNotFound", f"Revision {rev} not found in {repo}"))
        return head

    def _file(self, repo: str, path: str) -> Path:
        folder = self.repo_folder(repo).resolve()
        target = (folder / path).resolve()
        if folder not in target.parents:
            raise HubError(error_response(400, None, f"Invalid path {path!r}"))
        return target

    def _files(self, repo: str) -> list[str]:
        folder = self.repo_folder(repo)
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())

    @staticmethod
    def _require_token(headers: Message) -> None:
        if not headers.get("Authorization", "").startswith("Bearer "):
            raise HubError(error_response(401, None, "Writing needs a token (set HF_TOKEN)"))

    # ------------------------------------------------------------------------------------------ endpoints

    def create_repo(self, request):
        self._require_token(request.headers)
        payload = json.loads(request.body)
        if payload.get("type", "model") != "model":
            raise HubError(error_response(400, None, "hub_server only hosts model repos"))
        repo = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        url = f"{self.url}/{repo}"
        with self._lock:
            if repo in self._heads:
                return json_response({"error": "You already created this model repo", "url": url}, 409)
            self.repo_folder(repo).mkdir(parents=True)
            self._heads[repo] = hashlib.sha1(f"create {repo}".encode()).hexdigest()
        return json_response({"url": url, "name": repo})

    def agent_harnesses(self, request):
        """The registry huggingface_hub fetches to name a calling AI agent in its user agent: here, empty."""
        return json_response({"standardEnvVars": [], "harnesses": {}})

    def validate_yaml(self, request):
        return json_response({"errors": [], "warnings": []})

    def preupload(self, request, repo, rev):
        self._require_token(request.headers)
        self._head(repo, rev)
        files = []
        for file in json.loads(request.body)["files"]:
            existing = self._file(repo, file["path"])
            oid = git_blob_id(existing.read_bytes()) if existing.is_file() else None
            files.append({"path": file["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        return json_response({"files": files})

    def commit(self, request, repo, rev):
        """NDJSON: a `header` line (summary, description), then one `file` line per file, base64-encoded."""
        self._require_token(request.headers)
        lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        unsupported = {line["key"] for line in lines} - {"header", "file"}
        if unsupported:
            raise HubError(error_response(400, None, f"hub_server only commits regular files, not {unsupported}"))
        with self._lock:
            parent = self._heads.get(repo)
            if parent is None or rev not in ("main", parent):
                raise HubError(error_response(404, "RevisionNotFound", f"Cannot commit to {repo}@{rev}"))
            for line in lines:
                if line["key"] == "file":
                    target = self._file(repo, line["value"]["path"])
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(base64.b64decode(line["value"]["content"]))
            head = hashlib.sha1(parent.encode() + request.body).hexdigest()
            self._heads[repo] = head
        return json_response({"commitUrl": f"{self.url}/{repo}/commit/{head}", "commitOid": head})

    def model_info(self, request, repo, rev="main"):
        head = self._head(repo, rev)
        files = self._files(repo)
        info = {"id": repo, "modelId": repo, "sha": head, "private": False,
                "siblings": [{"rfilename": name} for name in files]}
        if "README.md" in files:
            front_matter = re.match(r"---\n(.*?)\n---", self._file(repo, "README.md").read_text(), re.DOTALL)
            tag = re.search(r"^pipeline_tag:\s*(\S+)", front_matter.group(1), re.MULTILINE) if front_matter else None
            if tag:
                info["pipeline_tag"] = tag.group(1)
        return json_response(info)

    def tree(self, request, repo, rev, path=""):
        """The files and folders in `path` (all the way down with `recursive=true`), in one page."""
        head = self._head(repo, rev)
        repo_folder = self.repo_folder(repo)
        folder = self._file(repo, path) if path else repo_folder
        if not folder.is_dir():
            return error_response(404, "EntryNotFound", f"{path} not found in {repo}", {"X-Repo-Commit": head})
        entries = []
        for child in sorted(folder.rglob("*") if request.query.get("recursive") == "true" else folder.iterdir()):
            name = child.relative_to(repo_folder).as_posix()
            if child.is_dir():  # the oid stands in for a git tree id: stable within one commit
                tree_id = hashlib.sha1(f"{head}/{name}".encode()).hexdigest()
                entries.append({"type": "directory", "path": name, "oid": tree_id})
            else:
                data = child.read_bytes()
                entries.append({"type": "file", "path": name, "size": len(data), "oid": git_blob_id(data)})
        return json_response(entries)

    def resolve(self, request, repo, rev, path):
        with self._lock:
            head = self._head(repo, rev)
            target = self._file(repo, path)
            data = target.read_bytes() if target.is_file() else None
        if data is None:
            return error_response(404, "EntryNotFound", f"{path} not found in {repo}", {"X-Repo-Commit": head})
        return 200, {"Content-Type": "application/octet-stream", "ETag": f'"{git_blob_id(data)}"',
                     "X-Repo-Commit": head}, data


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every response carries a Content-Length

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        fault = self.server.hub.fault(self.command, self.path)
        if fault == "stall":
            self.server.hub._released.wait()
        if fault in ("drop", "stall"):
            self.close_connection = True  # no answer at all: the client sees the connection end
            return
        status, headers, payload = self.server.hub.handle(self.command, self.path, self.headers, body)
        self.send_response(status)
        for name, value in {"Content-Length": str(len(payload)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_HEAD = do_POST = _answer

    def log_request(self, code="-", size="-") -> None:  # quiet on success; errors still go to stderr
        pass
