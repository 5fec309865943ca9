"""A small Hugging Face Hub-compatible HTTP server for testing the real huggingface_hub client against.

Uploads: the endpoints `create_repo`, `create_branch` and `upload_folder` use: whoami, repo and branch
creation, README.md metadata validation, preupload (every file is declared "regular", so contents travel
base64-encoded inside the commit, as the Hub does for small files) and the NDJSON commit; they need the
bearer token. Downloads: HEAD/GET `/{repo}/resolve/{rev}/{path}` with the commit and ETag headers the
client caches by, model info and file trees, no token. Content lives in memory:
`repos[repo_id]["branches"][branch][path] = bytes`.
"""

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

METADATA_TYPES = {"license": str, "base_model": (str, list), "tags": list, "library_name": str, "pipeline_tag": str}
REPO = r"(?P<repo>[\w.-]+/[\w.-]+|[\w.-]+)"
INFO = re.compile(rf"^/api/models/{REPO}(/revision/(?P<rev>[^/]+))?$")
TREE = re.compile(rf"^/api/models/{REPO}/tree/(?P<rev>[^/]+)(/(?P<path>.+))?$")
RESOLVE = re.compile(rf"^/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
ROUTES = [
    ("create_repo", re.compile(r"^/api/repos/create$")),
    ("validate_yaml", re.compile(r"^/api/validate-yaml$")),
    ("create_branch", re.compile(rf"^/api/models/{REPO}/branch/(?P<rev>[^/]+)$")),
    ("preupload", re.compile(rf"^/api/models/{REPO}/preupload/(?P<rev>[^/]+)$")),
    ("commit", re.compile(rf"^/api/models/{REPO}/commit/(?P<rev>[^/]+)$")),
]


class HubServer:
    def __init__(self, token: str, user: str = "someone"):
        self.token = token
        self.user = user
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, headers) of every request
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id]["branches"][branch]

    # -- endpoints ------------------------------------------------------------------------------------

    def create_repo(self, body: dict, **_):
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
        self.repos[repo_id] = {"visibility": body.get("visibility", "public" if not body.get("private") else "private"),
                               "branches": {"main": {}}}
        return 200, {"url": f"{self.url}/{repo_id}"}

    def validate_yaml(self, body: dict, **_):
        """The Hub checks a README.md's metadata before accepting it; so does this server, for the toolkit's fields."""
        content = body["content"]
        if not content.startswith("---\n"):
            return 200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]}
        try:
            metadata = yaml.safe_load(content.split("---\n")[1])
        except yaml.YAMLError as error:
            return 400, {"errors": [{"message": f"invalid YAML: {error}"}]}
        wrong = [key for key, kind in METADATA_TYPES.items() if key in metadata and not isinstance(metadata[key], kind)]
        if not isinstance(metadata, dict) or wrong:
            return 400, {"errors": [{"message": f"wrong type: {key}"} for key in wrong]}
        return 200, {"errors": [], "warnings": []}

    def create_branch(self, body: dict, repo: str, rev: str):
        branches = self._repo(repo)["branches"]
        if rev in branches:
            return 409, {"error": f"Reference already exists: refs/heads/{rev}"}
        branches[rev] = dict(branches["main"])
        return 200, {}

    def preupload(self, body: dict, repo: str, rev: str):
        self._branch(repo, rev)
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in body["files"]]
        return 200, {"files": files}

    def commit(self, lines: list[dict], repo: str, rev: str):
        files = self._branch(repo, rev)
        for line in lines:
            if line["key"] == "file":
                value = line["value"]
                assert value["encoding"] == "base64", value["encoding"]
                files[value["path"]] = base64.b64decode(value["content"])
        oid = self.commit_of(repo, rev)
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid}

    def commit_of(self, repo: str, branch: str = "main") -> str:
        """A commit id that changes whenever the branch's content does."""
        files = self._repo(repo)["branches"][branch]
        digest = hashlib.sha1()
        for path in sorted(files):
            digest.update(path.encode() + hashlib.sha1(files[path]).digest())
        return digest.hexdigest()

    def add_repo(self, repo_id: str, folder) -> None:
        """Publish a local folder as a public model repository, as if it had been pushed."""
        from pathlib import Path

        files = {str(p.relative_to(folder)): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}
        self.repos[repo_id] = {"visibility": "public", "branches": {"main": files}}

    def model_info(self, repo: str, rev: str | None = None) -> dict:
        """GET /api/models/{repo}[/revision/{rev}]: what `model_info` returns for a public repository."""
        files = self._branch(repo, rev or "main")
        branch = next(name for name, content in self._repo(repo)["branches"].items() if content is files)
        return {"id": repo, "modelId": repo, "sha": self.commit_of(repo, branch), "private": False,
                "siblings": [{"rfilename": path} for path in sorted(files)]}

    def tree(self, repo: str, rev: str, path: str | None = None) -> list[dict]:
        """GET /api/models/{repo}/tree/{rev}[/{path}]: the files under `path` (all of them; recursive)."""
        prefix = f"{path.rstrip('/')}/" if path else ""
        files = self._branch(repo, rev)
        found = [{"type": "file", "path": name, "size": len(content), "oid": hashlib.sha1(content).hexdigest()}
                 for name, content in sorted(files.items()) if name.startswith(prefix)]
        if prefix and not found:
            raise LookupError(f"{repo}/{path}")
        return found

    def download(self, repo: str, rev: str, path: str) -> tuple[int, dict, bytes]:
        """GET/HEAD /{repo}/resolve/{rev}/{path}: the file, with the headers huggingface_hub caches by."""
        try:
            files = self._branch(repo, rev)
        except LookupError:
            return 404, {"X-Error-Code": "RepoNotFound"}, b""
        if path not in files:
            return 404, {"X-Error-Code": "EntryNotFound"}, b""
        content = files[path]
        commit = next(name for name, branch in self._repo(repo)["branches"].items() if branch is files)
        return 200, {"X-Repo-Commit": self.commit_of(repo, commit), "ETag": f'"{hashlib.sha1(content).hexdigest()}"',
                     "Content-Length": str(len(content))}, content

    def _repo(self, repo: str) -> dict:
        if repo not in self.repos:
            raise LookupError(repo)
        return self.repos[repo]

    def _branch(self, repo: str, rev: str) -> dict:
        """A branch's files, by branch name or by its current commit id."""
        branches = self._repo(repo)["branches"]
        if rev in branches:
            return branches[rev]
        for name in branches:
            if self.commit_of(repo, name) == rev:
                return branches[name]
        raise LookupError(f"{repo}@{rev}")

    # -- HTTP plumbing --------------------------------------------------------------------------------

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_HEAD(self):
                self.do_GET(send_body=False)

            def do_GET(self, send_body=True):
                hub.requests.append(("GET" if send_body else "HEAD", self.path, dict(self.headers)))
                path = self.path.split("?")[0]
                for pattern, endpoint in ((INFO, hub.model_info), (TREE, hub.tree)):
                    match = pattern.match(path)
                    if match:
                        try:
                            return self._reply(200, endpoint(**match.groupdict()))
                        except LookupError as missing:
                            return self._reply(404, {"error": f"not found: {missing}"}, "EntryNotFound")
                resolve = RESOLVE.match(path)
                if resolve:  # downloads of public repositories need no token
                    status, headers, content = hub.download(**resolve.groupdict())
                    self.send_response(status)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    if status != 200:
                        self.send_header("Content-Length", "0")
                    self.end_headers()
                    if send_body:
                        self.wfile.write(content)
                    return
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                if self.path.split("?")[0] == "/api/whoami-v2":
                    return self._reply(200, {"type": "user", "name": hub.user, "auth": {"type": "access_token"}})
                self._reply(404, {"error": f"no route {self.path}"})

            def do_POST(self):
                size = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(size)
                path = self.path.split("?")[0]
                hub.requests.append(("POST", path, dict(self.headers)))
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                for name, pattern in ROUTES:
                    match = pattern.match(path)
                    if match:
                        break
                else:
                    return self._reply(404, {"error": f"no route {path}"})
                body = [json.loads(line) for line in raw.splitlines()] if name == "commit" else json.loads(raw or b"{}")
                try:
                    status, answer = getattr(hub, name)(body, **match.groupdict())
                except LookupError as missing:
                    status, answer = 404, {"error": f"Repository not found: {missing}"}
                self._reply(status, answer)

            def _reply(self, status: int, answer, error_code: str = "RepoNotFound"):
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 404:
                    self.send_header("X-Error-Code", error_code)
                self.end_headers()
                self.wfile.write(data)

        return Handler
