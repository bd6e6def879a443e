"""A small Hugging Face Hub-compatible HTTP server for the tests, built on the standard library, PyYAML and `git`.

The unmodified `huggingface_hub` and `transformers` clients talk to it as they talk to huggingface.co. Set
`HF_ENDPOINT=http://127.0.0.1:PORT` before `huggingface_hub` is imported (it reads the variable once) and
`HF_HUB_DISABLE_XET=1`, so that uploads use the Git LFS protocol, which this server speaks, instead of Xet.

It implements, for model repos, what those clients call:

- `POST /api/repos/create`: a repo is a bare git repository whose first commit holds the Hub's default
  `.gitattributes`.
- `POST /api/validate-yaml`: the model card check (YAML syntax, license, pipeline tag, `model-index` structure).
- `POST /api/models/{repo}/preupload/{revision}`: which files go through LFS, and the ids of those already there.
- `POST /{repo}.git/info/lfs/objects/batch`, then the upload and verify URLs it hands out: large files go to a
  content-addressed store that checks their sha256; git keeps only their LFS pointer files.
- `POST /api/models/{repo}/commit/{branch}`: an ndjson commit of regular, LFS and deleted files, and
  `POST /api/models/{repo}/branch/{branch}` to start a branch.
- `GET /api/models/{repo}[/revision/{revision}]` (repo info with siblings) and
  `GET /api/models/{repo}/tree/{revision}[/{path}]`.
- `HEAD` and `GET /{repo}/resolve/{revision}/{path}` with `X-Repo-Commit`, `ETag` and, for LFS files,
  `X-Linked-Etag` and `X-Linked-Size`.

A revision is a branch name or a full commit sha. A missing repo, revision or file gets the Hub's 404 with
`X-Error-Code: RepoNotFound`, `RevisionNotFound` or `EntryNotFound`, which `huggingface_hub` turns into its typed
errors. Unlike the Hub, every repo is public, any bearer token may write, LFS files are served directly rather than
through a redirect to a CDN, and there are no pull requests and no `.gitignore` rules.

Run it by hand with `python tests/hub_server.py --port 8080 --root /tmp/hub`.
"""

import argparse
import base64
import fnmatch
import functools
import hashlib
import json
import os
import re
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote

import yaml


def main():
    args = parse_args()
    server = HubServer(args.root, host=args.host, port=args.port, verbose=True)
    print(f"Serving a test Hub from {args.root}: export HF_ENDPOINT={server.endpoint} HF_HUB_DISABLE_XET=1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, type=Path, help="Folder that holds the repos and the LFS objects.")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on.")
    parser.add_argument("--port", type=int, default=8080, help="Port to listen on; 0 picks a free one.")
    return parser.parse_args()


# The `.gitattributes` that the Hub commits into every new model repo: these files always go through LFS.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model *.msgpack *.npy *.npz "
        "*.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors saved_model/**/* *.tar.* *.tar "
        "*.tflite *.tgz *.wasm *.xz *.zip *.zst *tfevents*"
    ).split()
)
# Larger files must go through LFS whatever their name.
LFS_SIZE_THRESHOLD = 10 * 1000 * 1000

# License identifiers of https://huggingface.co/docs/hub/repositories-licenses.
LICENSES = set(
    "apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m "
    "afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0 "
    "cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 "
    "cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 "
    "cdla-permissive-1.0 cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 agpl-3.0 gfdl gpl "
    "gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 isc lppl-1.3c ms-pl mpl-2.0 odc-by odbl openrail++ osl-3.0 postgresql "
    "ofl-1.1 ncsa unlicense zlib pddl lgpl-lr deepfloyd-if-license llama2 gemma unknown other".split()
)

# Pipeline tags of the Hub's task taxonomy (`PIPELINE_DATA` in huggingface.js).
PIPELINE_TAGS = set(
    "biology text-classification token-classification table-question-answering question-answering "
    "zero-shot-classification translation summarization feature-extraction text-generation text2text-generation "
    "fill-mask sentence-similarity text-to-speech text-to-audio automatic-speech-recognition audio-to-audio "
    "audio-classification audio-text-to-text voice-activity-detection depth-estimation image-classification "
    "object-detection image-segmentation text-to-image image-to-text image-to-image image-to-video "
    "unconditional-image-generation video-classification reinforcement-learning robotics tabular-classification "
    "tabular-regression tabular-to-text table-to-text multiple-choice text-ranking text-retrieval "
    "time-series-forecasting text-to-video image-text-to-text visual-question-answering document-question-answering "
    "zero-shot-image-classification graph-ml mask-generation zero-shot-object-detection text-to-3d image-to-3d "
    "image-feature-extraction video-text-to-text keypoint-detection visual-document-retrieval any-to-any other".split()
)

# The evaluation results of a model card (https://github.com/huggingface/hub-docs/blob/main/modelcard.md).
# A list holds items of its one element's schema; a key ending in "!" is required.
MODEL_INDEX_SCHEMA = [
    {
        "name!": str,
        "results!": [
            {
                "task!": {"type!": str, "name": str},
                "dataset!": {"type!": str, "name!": str, "config": str, "split": str, "revision": str, "args": dict},
                "metrics!": [
                    {
                        "type!": str,
                        "value!": (int, float, str),
                        "name": str,
                        "config": str,
                        "args": dict,
                        "verified": bool,
                    }
                ],
                "source": {"name": str, "url": str},
            }
        ],
    }
]

EMPTY_METADATA_WARNING = (
    "Empty or missing yaml metadata in repo card (https://huggingface.co/docs/hub/model-cards#model-card-metadata)"
)
FRONT_MATTER = re.compile(r"\A\s*---\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)
LFS_POINTER = re.compile(rb"version https://git-lfs\.github\.com/spec/v1\noid sha256:([0-9a-f]{64})\nsize (\d+)\n")
SHA256 = re.compile(r"[0-9a-f]{64}")
COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
BRANCH_NAME = re.compile(r"[\w-]+(?:[./][\w-]+)*")
REPO_NAME = re.compile(r"[A-Za-z0-9][\w.-]*")

REPO = r"(?P<repo_id>[\w.-]+/[\w.-]+?)"
ROUTES = [
    # (methods, path pattern on the still-quoted URL path, handler method)
    (("POST",), r"/api/repos/create", "create_repo"),
    (("POST",), r"/api/validate-yaml", "validate_yaml"),
    (("GET",), rf"/api/models/{REPO}(?:/revision/(?P<revision>[^/]+))?", "repo_info"),
    (("GET",), rf"/api/models/{REPO}/tree/(?P<revision>[^/]+)(?:/(?P<path>.*))?", "tree"),
    (("POST",), rf"/api/models/{REPO}/preupload/(?P<revision>[^/]+)", "preupload"),
    (("POST",), rf"/api/models/{REPO}/commit/(?P<revision>[^/]+)", "commit"),
    (("POST",), rf"/api/models/{REPO}/branch/(?P<branch>[^/]+)", "create_branch"),
    (("POST",), rf"/{REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
    (("PUT",), rf"/{REPO}\.git/info/lfs/objects/(?P<oid>[0-9a-f]{{64}})", "lfs_upload"),
    (("POST",), rf"/{REPO}\.git/info/lfs/objects/verify", "lfs_verify"),
    (("GET", "HEAD"), rf"/{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", "resolve"),
]
ROUTES = [(methods, re.compile(pattern), handler) for methods, pattern, handler in ROUTES]

GIT_ENV = {
    **os.environ,
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "Test Hub",
    "GIT_AUTHOR_EMAIL": "hub@127.0.0.1",
    "GIT_COMMITTER_NAME": "Test Hub",
    "GIT_COMMITTER_EMAIL": "hub@127.0.0.1",
}


class HubServer(ThreadingHTTPServer):
    """The test Hub: repos under `root/models`, LFS objects under `root/lfs`, one thread per request.

    Args:
        root: folder of the repos and LFS objects; a new server on the same folder serves the same repos.
        host: address to listen on.
        port: port to listen on; 0 picks a free one.
        user: namespace of repos created without one (every token belongs to this user).
        verbose: log every request to stderr.
    """

    daemon_threads = True

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0, user: str = "user", verbose=False):
        self.repos = GitRepos(Path(root) / "models")
        self.lfs = LfsStore(Path(root) / "lfs")
        self.user = user
        self.verbose = verbose
        self.requests: list[tuple[str, str, int]] = []  # (method, handler or path, status) of every request
        self.stop_before_handler: str | None = None
        super().__init__((host, port), HubRequestHandler)

    @property
    def endpoint(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def stop_before(self, handler: str):
        """Make the server stop, as if its process died, when a request for `handler` (e.g. "commit") arrives.

        The request is read but never answered, and the server stops listening.
        """
        self.stop_before_handler = handler


class HubError(Exception):
    """An error answered the way the Hub answers it: a JSON body and the `X-Error-*` headers the clients read."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, **details):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.details = status, message, code, headers or {}, details

    def response(self) -> "Response":
        headers = {"X-Error-Message": self.message, **self.headers}
        if self.code is not None:
            headers["X-Error-Code"] = self.code
        return json_response({"error": self.message, **self.details}, status=self.status, headers=headers)


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    file: Path | None = None  # sent instead of `body`


def json_response(data, status: int = 200, headers: dict[str, str] | None = None, content_type="application/json"):
    return Response(
        status, json.dumps(data).encode(), {"Content-Type": f"{content_type}; charset=utf-8", **(headers or {})}
    )


class HubRequestHandler(BaseHTTPRequestHandler):
    """Routes each request to the method named in `ROUTES`, which returns a `Response` or raises a `HubError`."""

    server: HubServer

    def do_GET(self):
        self.dispatch("GET")

    def do_HEAD(self):
        self.dispatch("HEAD")

    def do_POST(self):
        self.dispatch("POST")

    def do_PUT(self):
        self.dispatch("PUT")

    def dispatch(self, method: str):
        path, _, query = self.path.partition("?")
        self.query = parse_qs(query)
        self.body_unread = True
        handler, params = self.route(method, path)
        if handler is not None and handler == self.server.stop_before_handler:
            self.body()
            self.die()
            return
        try:
            if handler is None:
                raise HubError(404, f"No route for {method} {path}")
            response = getattr(self, handler)(**params)
        except HubError as error:
            response = error.response()
        if self.body_unread:  # answering before the whole request is read could reset the connection
            self.body()
        self.send(response, method)
        self.server.requests.append((method, handler or path, response.status))

    @staticmethod
    def route(method: str, path: str) -> tuple[str | None, dict[str, str]]:
        """The handler of a request and its unquoted path parameters, or (None, {})."""
        for methods, pattern, handler in ROUTES:
            match = pattern.fullmatch(path)
            if match is not None and method in methods:
                return handler, {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
        return None, {}

    # ---------------------------------------------------------------- repos, files and revisions

    def create_repo(self) -> Response:
        self.require_token()
        payload = self.json_body()
        if payload.get("type", "model") != "model":
            raise HubError(400, "This test Hub only hosts model repos.")
        repo_id = f"{payload.get('organization') or self.server.user}/{payload.get('name')}"
        if not is_repo_id(repo_id):
            raise HubError(400, f"Invalid repo name: {repo_id}")
        url = f"{self.endpoint}/{repo_id}"
        if not self.server.repos.create(repo_id):
            # `create_repo(exist_ok=True)` reads the url of the existing repo from this answer.
            raise HubError(409, "You already created this model repo", url=url)
        return json_response({"url": url, "name": repo_id})

    def repo_info(self, repo_id: str, revision: str = "main") -> Response:
        commit = self.resolve_revision(repo_id, revision)
        files = self.server.repos.files(repo_id, commit)
        card = card_metadata(self.read_file(repo_id, files["README.md"])) if "README.md" in files else {}
        with_blobs = self.query.get("blobs", ["false"])[0].lower() in ("1", "true")
        return json_response(
            {
                "id": repo_id,
                "author": repo_id.split("/")[0],
                "sha": commit,
                "lastModified": self.server.repos.commit_date(repo_id, commit),
                "private": False,
                "gated": False,
                "disabled": False,
                "library_name": card.get("library_name"),
                "pipeline_tag": card.get("pipeline_tag"),
                "tags": as_list(card.get("tags")),
                "cardData": card or None,
                "siblings": [sibling(file, with_blobs) for file in files.values()],
            }
        )

    def tree(self, repo_id: str, revision: str, path: str = "") -> Response:
        commit = self.resolve_revision(repo_id, revision)
        files = self.server.repos.files(repo_id, commit)
        folders = self.server.repos.folders(repo_id, commit)
        folder = path.strip("/")
        if folder and folder not in folders:
            raise HubError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": commit})
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = f"{folder}/" if folder else ""

        def listed(entry_path: str) -> bool:
            return entry_path.startswith(prefix) and (recursive or "/" not in entry_path[len(prefix) :])

        entries = [{"type": "directory", "oid": oid, "size": 0, "path": p} for p, oid in folders.items() if listed(p)]
        entries += [tree_entry(file) for file in files.values() if listed(file.path)]
        return json_response(entries)

    def resolve(self, repo_id: str, revision: str, path: str) -> Response:
        commit = self.resolve_revision(repo_id, revision)
        file = self.server.repos.files(repo_id, commit).get(path)
        if file is None:
            raise HubError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": commit})
        headers = {"X-Repo-Commit": commit, "ETag": f'"{file.blob_id}"', "Content-Type": "application/octet-stream"}
        if file.lfs_oid is None:
            return Response(body=self.server.repos.read(repo_id, file.blob_id), headers=headers)
        headers.update({"X-Linked-Etag": f'"{file.lfs_oid}"', "X-Linked-Size": str(file.size)})
        return Response(headers=headers, file=self.server.lfs.path(file.lfs_oid))

    # ---------------------------------------------------------------- uploads

    def preupload(self, repo_id: str, revision: str) -> Response:
        self.require_token()
        commit = self.resolve_revision(repo_id, revision)
        files = self.server.repos.files(repo_id, commit)
        gitattributes = self.read_file(repo_id, files[".gitattributes"]) if ".gitattributes" in files else ""
        answers = []
        for upload in self.json_body()["files"]:
            sample = base64.b64decode(upload["sample"])
            lfs = (
                upload["size"] >= LFS_SIZE_THRESHOLD or is_binary(sample) or is_lfs_path(upload["path"], gitattributes)
            )
            answer = {"path": upload["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            if upload["path"] in files:
                existing = files[upload["path"]]
                answer["oid"] = existing.lfs_oid or existing.blob_id
            answers.append(answer)
        return json_response({"files": answers, "commitOid": commit})

    def lfs_batch(self, repo_id: str) -> Response:
        self.require_token()
        if not self.server.repos.exists(repo_id):
            raise HubError(404, "Repository not found", code="RepoNotFound")
        request = self.json_body()
        if request.get("operation") != "upload":
            raise HubError(400, "This test Hub serves LFS files through /resolve; the batch API only takes uploads.")
        objects = []
        for obj in request["objects"]:
            answer = {"oid": obj["oid"], "size": obj["size"]}
            if not SHA256.fullmatch(obj["oid"]):
                answer["error"] = {"code": 422, "message": "The oid must be a sha256 in hexadecimal."}
            elif self.server.lfs.size(obj["oid"]) != obj["size"]:
                answer["authenticated"] = True
                answer["actions"] = {
                    "upload": {"href": f"{self.endpoint}/{repo_id}.git/info/lfs/objects/{obj['oid']}"},
                    "verify": {"href": f"{self.endpoint}/{repo_id}.git/info/lfs/objects/verify"},
                }
            objects.append(answer)
        return json_response({"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def lfs_upload(self, repo_id: str, oid: str) -> Response:
        # Like a signed storage URL, the upload URL carries no token: the content is accepted only if it hashes to it.
        if not self.server.lfs.put(oid, self.body_chunks()):
            raise HubError(400, f"The uploaded content does not have the sha256 {oid}.")
        return Response()

    def lfs_verify(self, repo_id: str) -> Response:
        self.require_token()
        obj = self.json_body()
        if self.server.lfs.size(obj["oid"]) != obj["size"]:
            raise HubError(404, f"LFS object {obj['oid']} of {obj['size']} bytes was not uploaded.")
        return json_response({"success": True})

    def commit(self, repo_id: str, revision: str) -> Response:
        self.require_token()
        if self.query.get("create_pr"):
            raise HubError(400, "This test Hub has no pull requests.")
        self.resolve_revision(repo_id, revision)
        lines = [json.loads(line) for line in self.body().splitlines() if line.strip()]
        header = lines[0]["value"] if lines and lines[0]["key"] == "header" else {}
        repos = self.server.repos
        with repos.lock(repo_id):
            head = repos.branch_head(repo_id, revision)
            if head is None:
                raise HubError(404, f"Invalid rev id: {revision} is not a branch", code="RevisionNotFound")
            parent = header.get("parentCommit")
            if parent is not None and not head.startswith(parent):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            blobs = {path: file.blob_id for path, file in repos.files(repo_id, head).items()}
            for line in lines[1:]:
                self.apply(line["key"], line["value"], blobs, repo_id)
            message = "\n\n".join(part for part in (header.get("summary"), header.get("description")) if part)
            new_commit = repos.commit(repo_id, revision, head, blobs, message or "Upload files")
        return json_response(
            {"success": True, "commitOid": new_commit, "commitUrl": f"{self.endpoint}/{repo_id}/commit/{new_commit}"}
        )

    def apply(self, key: str, operation: dict, blobs: dict[str, str], repo_id: str):
        """Apply one line of an ndjson commit to `blobs`, the blob id of every file of the new tree."""
        path = check_path(operation["path"].rstrip("/") if key == "deletedFolder" else operation["path"])
        if key == "file":
            blobs[path] = self.server.repos.write(repo_id, base64.b64decode(operation["content"]))
        elif key == "lfsFile":
            size = self.server.lfs.size(operation["oid"])
            if size is None:
                raise HubError(400, f"LFS object {operation['oid']} of {path} was never uploaded.")
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{operation['oid']}\nsize {size}\n"
            blobs[path] = self.server.repos.write(repo_id, pointer.encode())
        elif key in ("deletedFile", "deletedFolder"):
            doomed = (
                [p for p in blobs if p == path]
                if key == "deletedFile"
                else [p for p in blobs if p.startswith(f"{path}/")]
            )
            if not doomed:
                # `huggingface_hub` looks for these words to explain folder and file deletions.
                raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
            for doomed_path in doomed:
                del blobs[doomed_path]
        else:
            raise HubError(400, f"Unknown commit operation {key!r}.")

    def create_branch(self, repo_id: str, branch: str) -> Response:
        self.require_token()
        start = self.resolve_revision(repo_id, self.json_body().get("startingPoint") or "main")
        if not BRANCH_NAME.fullmatch(branch) or COMMIT_SHA.fullmatch(branch):
            raise HubError(400, f"Invalid branch name: {branch}")
        if not self.server.repos.create_branch(repo_id, branch, start):
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        return json_response({})

    # ---------------------------------------------------------------- model cards

    def validate_yaml(self) -> Response:
        payload = self.json_body()
        errors, warnings = check_card_metadata(payload.get("content", ""), payload.get("repoType", "model"))
        status = 400 if errors else 200
        if "text/plain" in self.headers.get("Accept", ""):
            return Response(
                status, "\n".join(errors or warnings).encode(), {"Content-Type": "text/plain; charset=utf-8"}
            )
        return json_response(
            {"errors": [{"message": m} for m in errors], "warnings": [{"message": m} for m in warnings]}, status=status
        )

    # ---------------------------------------------------------------- helpers

    @property
    def endpoint(self) -> str:
        return f"http://{self.headers.get('Host') or self.server.endpoint.removeprefix('http://')}"

    def resolve_revision(self, repo_id: str, revision: str) -> str:
        if not self.server.repos.exists(repo_id):
            raise HubError(404, "Repository not found", code="RepoNotFound")
        commit = self.server.repos.resolve(repo_id, revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return commit

    def read_file(self, repo_id: str, file: "RepoFile") -> str:
        return self.server.repos.read(repo_id, file.blob_id).decode("utf-8", errors="replace")

    def require_token(self):
        if not self.headers.get("Authorization", "").startswith("Bearer "):
            raise HubError(401, "Invalid username or password.")

    def body_chunks(self, chunk_size: int = 1 << 20):
        """The request body, by chunks; the clients always send its `Content-Length`."""
        self.body_unread = False
        size = int(self.headers.get("Content-Length") or 0)
        while size > 0:
            chunk = self.rfile.read(min(size, chunk_size))
            if not chunk:
                raise ConnectionError("The client closed the connection in the middle of its request.")
            size -= len(chunk)
            yield chunk

    def body(self) -> bytes:
        return b"".join(self.body_chunks())

    def json_body(self):
        try:
            return json.loads(self.body())
        except json.JSONDecodeError as error:
            raise HubError(400, f"Invalid JSON body: {error}") from error

    def send(self, response: Response, method: str):
        length = response.file.stat().st_size if response.file is not None else len(response.body)
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if method == "HEAD":
            return
        if response.file is not None:
            with open(response.file, "rb") as source:
                while chunk := source.read(1 << 20):
                    self.wfile.write(chunk)
        else:
            self.wfile.write(response.body)

    def die(self):
        """Stop the whole server and drop this connection without an answer."""
        self.server.shutdown()
        self.server.server_close()
        self.close_connection = True

    def log_message(self, format, *args):
        if self.server.verbose:
            super().log_message(format, *args)


@dataclass(frozen=True)
class RepoFile:
    """A file of a commit. For an LFS file git stores a pointer, `blob_id` is the pointer's and `size` the content's."""

    path: str
    blob_id: str
    size: int
    lfs_oid: str | None = None
    pointer_size: int | None = None


class GitRepos:
    """Model repos as bare git repositories, `root/<namespace>/<name>.git`, read and written with git's plumbing."""

    def __init__(self, root: Path):
        self.root = root
        self.locks: dict[str, threading.Lock] = {}
        self.locks_lock = threading.Lock()

    def path(self, repo_id: str) -> Path:
        return self.root / f"{repo_id}.git"

    def exists(self, repo_id: str) -> bool:
        return is_repo_id(repo_id) and self.path(repo_id).is_dir()

    def lock(self, repo_id: str) -> threading.Lock:
        with self.locks_lock:
            return self.locks.setdefault(repo_id, threading.Lock())

    def create(self, repo_id: str) -> bool:
        """Create the repo with the Hub's first commit; False if it already exists."""
        with self.lock(repo_id):
            if self.exists(repo_id):
                return False
            self.path(repo_id).parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                ["git", "init", "--bare", "--quiet", "--initial-branch=main", str(self.path(repo_id))],
                check=True,
                env=GIT_ENV,
            )
            blobs = {".gitattributes": self.write(repo_id, DEFAULT_GITATTRIBUTES.encode())}
            self.commit(repo_id, "main", None, blobs, "initial commit")
            return True

    def resolve(self, repo_id: str, revision: str) -> str | None:
        """The commit a branch name or a full commit sha names, or None."""
        name = revision if COMMIT_SHA.fullmatch(revision) else f"refs/heads/{revision}"
        found = self.git(
            repo_id, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{name}^{{commit}}", check=False
        )
        return found.decode().strip() or None

    def branch_head(self, repo_id: str, branch: str) -> str | None:
        found = self.git(
            repo_id, "rev-parse", "--verify", "--quiet", "--end-of-options", f"refs/heads/{branch}", check=False
        )
        return found.decode().strip() or None

    def create_branch(self, repo_id: str, branch: str, commit: str) -> bool:
        """Start `branch` at `commit`; False if the branch already exists."""
        with self.lock(repo_id):
            if self.branch_head(repo_id, branch) is not None:
                return False
            self.git(repo_id, "update-ref", f"refs/heads/{branch}", commit, "")
            return True

    def files(self, repo_id: str, commit: str) -> dict[str, RepoFile]:
        return list_files(str(self.path(repo_id)), commit)

    def folders(self, repo_id: str, commit: str) -> dict[str, str]:
        """Every folder of the commit and its git tree id."""
        listing = self.git(repo_id, "ls-tree", "-r", "-d", "-z", commit)
        folders = {}
        for line in listing.decode().split("\0"):
            if line:
                info, path = line.split("\t", 1)
                folders[path] = info.split()[2]
        return folders

    def read(self, repo_id: str, blob_id: str) -> bytes:
        return self.git(repo_id, "cat-file", "blob", blob_id)

    def write(self, repo_id: str, content: bytes) -> str:
        return self.git(repo_id, "hash-object", "-w", "--stdin", input=content).decode().strip()

    def commit_date(self, repo_id: str, commit: str) -> str:
        """When the commit was made, in the Hub's format (`2024-05-01T12:00:00.000Z`)."""
        timestamp = int(self.git(repo_id, "show", "-s", "--format=%ct", commit))
        return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")

    def commit(self, repo_id: str, branch: str, parent: str | None, blobs: dict[str, str], message: str) -> str:
        """Commit the tree of `blobs` (path -> blob id) on `branch`, which must still point to `parent`."""
        with tempfile.TemporaryDirectory() as scratch:
            index = {"GIT_INDEX_FILE": os.path.join(scratch, "index")}
            entries = "".join(f"100644 {blob}\t{path}\0" for path, blob in sorted(blobs.items()))
            self.git(repo_id, "update-index", "-z", "--index-info", input=entries.encode(), env=index)
            tree = self.git(repo_id, "write-tree", env=index).decode().strip()
        parents = ["-p", parent] if parent else []
        commit = self.git(repo_id, "commit-tree", tree, *parents, "-m", message).decode().strip()
        self.git(repo_id, "update-ref", f"refs/heads/{branch}", commit, parent or "")
        return commit

    def git(self, repo_id: str, *args: str, input: bytes | None = None, env=None, check=True) -> bytes:
        return run_git(str(self.path(repo_id)), *args, input=input, env=env, check=check)


@functools.lru_cache(maxsize=256)
def list_files(git_dir: str, commit: str) -> dict[str, RepoFile]:
    """Every file of a commit, with the content size and sha256 of LFS files read from their pointers.

    Cached: a commit never changes.
    """
    listing = run_git(git_dir, "ls-tree", "-r", "-l", "-z", commit).decode()
    blobs = {}
    for line in listing.split("\0"):
        if line:
            info, path = line.split("\t", 1)
            _, _, blob_id, size = info.split()
            blobs[path] = (blob_id, int(size))
    # Pointer files are about 130 bytes: read every small blob in one `cat-file --batch` call.
    small = [blob_id for blob_id, size in blobs.values() if size < 256]
    contents = read_blobs(git_dir, small)
    files = {}
    for path, (blob_id, size) in blobs.items():
        pointer = LFS_POINTER.fullmatch(contents.get(blob_id, b""))
        if pointer is None:
            files[path] = RepoFile(path, blob_id, size)
        else:
            files[path] = RepoFile(path, blob_id, int(pointer.group(2)), pointer.group(1).decode(), size)
    return files


def read_blobs(git_dir: str, blob_ids: list[str]) -> dict[str, bytes]:
    output = run_git(git_dir, "cat-file", "--batch", input="".join(f"{b}\n" for b in blob_ids).encode())
    contents = {}
    while output:
        header, _, output = output.partition(b"\n")
        blob_id, _, size = header.decode().split()
        contents[blob_id], output = output[: int(size)], output[int(size) + 1 :]
    return contents


def run_git(git_dir: str, *args: str, input: bytes | None = None, env=None, check=True) -> bytes:
    result = subprocess.run(
        ["git", "--git-dir", git_dir, *args],
        check=False,
        input=input,
        capture_output=True,
        env={**GIT_ENV, **(env or {})},
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {result.stderr.decode()}")
    return result.stdout if result.returncode == 0 else b""


class LfsStore:
    """LFS objects by sha256, in git-lfs's layout (`root/objects/ab/cd/abcd...`), shared by all repos like the Hub's."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, oid: str) -> Path:
        return self.root / "objects" / oid[:2] / oid[2:4] / oid

    def size(self, oid: str) -> int | None:
        path = self.path(oid)
        return path.stat().st_size if SHA256.fullmatch(oid) and path.is_file() else None

    def put(self, oid: str, chunks) -> bool:
        """Store the content of `chunks` under `oid`; False, and nothing stored, if it does not hash to `oid`."""
        self.path(oid).parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with tempfile.NamedTemporaryFile(dir=self.path(oid).parent, delete=False) as partial:
            for chunk in chunks:
                digest.update(chunk)
                partial.write(chunk)
        if digest.hexdigest() != oid:
            os.unlink(partial.name)
            return False
        os.replace(partial.name, self.path(oid))
        return True


def is_binary(sample: bytes) -> bool:
    """Git's test, on the first 512 bytes: a NUL byte, or text that is not UTF-8."""
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as error:
        return error.start < len(sample) - 3  # a multi-byte character cut at the end of the sample is still text
    return b"\0" in sample


def is_lfs_path(path: str, gitattributes: str) -> bool:
    """Whether `.gitattributes` sends `path` through LFS; as in git, the last matching line wins."""
    lfs = False
    for line in gitattributes.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        pattern, attributes = fields[0], fields[1:]
        subject = path if "/" in pattern else path.rsplit("/", 1)[-1]
        if fnmatch.fnmatchcase(subject, pattern.lstrip("/").replace("**/", "*")):
            lfs = "filter=lfs" in attributes
    return lfs


def is_repo_id(repo_id: str) -> bool:
    parts = repo_id.split("/")
    return len(parts) == 2 and all(REPO_NAME.fullmatch(part) for part in parts) and not repo_id.endswith(".git")


def check_path(path: str) -> str:
    parts = path.split("/")
    if path.startswith("/") or any(part in ("", ".", "..", ".git") for part in parts):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


def sibling(file: RepoFile, with_blobs: bool) -> dict:
    if not with_blobs:
        return {"rfilename": file.path}
    lfs = {"size": file.size, "sha256": file.lfs_oid, "pointerSize": file.pointer_size} if file.lfs_oid else None
    return {"rfilename": file.path, "size": file.size, "blobId": file.blob_id, "lfs": lfs}


def tree_entry(file: RepoFile) -> dict:
    entry = {"type": "file", "oid": file.blob_id, "size": file.size, "path": file.path}
    if file.lfs_oid:
        entry["lfs"] = {"oid": file.lfs_oid, "size": file.size, "pointerSize": file.pointer_size}
    return entry


def card_metadata(readme: str) -> dict:
    """The metadata block of a model card, or {} when it has none or it is not a YAML mapping."""
    match = FRONT_MATTER.match(readme)
    try:
        metadata = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return {}
    return metadata if isinstance(metadata, dict) else {}


def check_card_metadata(readme: str, repo_type: str) -> tuple[list[str], list[str]]:
    """The errors and warnings the Hub's model card check finds in a README.md."""
    match = FRONT_MATTER.match(readme)
    if match is None:
        return [], [EMPTY_METADATA_WARNING]
    try:
        metadata = yaml.safe_load(match.group(1))
    except yaml.YAMLError as error:
        return [f"Invalid YAML in the metadata block of README.md: {error}"], []
    if metadata is None:
        return [], [EMPTY_METADATA_WARNING]
    if not isinstance(metadata, dict):
        return ['"metadata" must be of type object'], []
    if repo_type != "model":
        return [], []
    errors = []
    for key in ("license", "tags", "datasets", "metrics", "language", "base_model"):
        if key in metadata and not all(isinstance(v, str) for v in as_list(metadata[key])):
            errors.append(f'"{key}" must be a string or an array of strings')
    for license_id in as_list(metadata.get("license")):
        if isinstance(license_id, str) and license_id not in LICENSES:
            errors.append(f'"license" must be a license identifier of the Hub, not "{license_id}"')
    if "library_name" in metadata and not isinstance(metadata["library_name"], str):
        errors.append('"library_name" must be of type string')
    if "pipeline_tag" in metadata and metadata["pipeline_tag"] not in PIPELINE_TAGS:
        errors.append(f'"pipeline_tag" must be a task of the Hub, not "{metadata["pipeline_tag"]}"')
    if "model-index" in metadata:
        errors += schema_errors(metadata["model-index"], MODEL_INDEX_SCHEMA, "model-index")
    return errors, []


def schema_errors(value, schema, where: str) -> list[str]:
    """Where `value` breaks `schema` (see `MODEL_INDEX_SCHEMA`), in the Hub's wording."""
    if isinstance(schema, list):
        if not isinstance(value, list) or not value:
            return [f'"{where}" must be a non-empty array']
        return [error for i, item in enumerate(value) for error in schema_errors(item, schema[0], f"{where}[{i}]")]
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return [f'"{where}" must be of type object']
        errors = []
        for key, item_schema in schema.items():
            name = key.rstrip("!")
            if value.get(name) is not None:
                errors += schema_errors(value[name], item_schema, f"{where}.{name}")
            elif key.endswith("!"):
                errors.append(f'"{where}.{name}" is required')
        return errors
    types = schema if isinstance(schema, tuple) else (schema,)
    if isinstance(value, types) and not (isinstance(value, bool) and bool not in types):
        return []
    return [f'"{where}" must be of type {" or ".join(t.__name__ for t in types)}']


def as_list(value) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


if __name__ == "__main__":
    main()
