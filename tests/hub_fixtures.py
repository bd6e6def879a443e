"""A test Hub (`hub_server.py`) on a free port, and fresh client processes that talk to it.

`huggingface_hub` reads `HF_ENDPOINT` and `HF_HUB_OFFLINE` once, when it is imported, and the test process has already
imported it in offline mode; so every client runs in a new process whose environment points at the test Hub, with an
empty `HF_HOME` of its own. A test module makes it a fixture:

    @pytest.fixture
    def hub(tmp_path):
        with Hub(tmp_path / "hub", tmp_path / "clients") as hub:
            yield hub
"""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Self

from hub_server import HubServer


# Settings of the test process that must not leak into the clients: where the Hub is, offline mode, caches, tokens.
HUB_SETTINGS = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_OFFLINE", "TRANSFORMERS_CACHE", "XDG_CACHE_HOME")
PROXY_SETTINGS = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}


class Hub:
    """A running test Hub, on the same port and folder for its whole life, even across a stop and a restart.

    Attributes:
        server: the `HubServer`; tests read its repos (`server.repos`) and its request log (`server.requests`).
        endpoint: `HF_ENDPOINT` for the clients.
    """

    def __init__(self, root: Path, workdir: Path):
        self.root, self.workdir = root, workdir
        self.server = self._serve(port=0)
        self.endpoint = self.server.endpoint

    def _serve(self, port: int) -> HubServer:
        server = HubServer(self.root, port=port)
        threading.Thread(target=server.serve_forever, args=(0.05,), name="test-hub", daemon=True).start()
        return server

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info):
        self.server.shutdown()
        self.server.server_close()

    def restart(self):
        """Start the Hub again after it stopped (see `HubServer.stop_before`), with the repos it had."""
        self.server = self._serve(port=int(self.endpoint.rsplit(":", 1)[1]))

    def client_env(self, hf_home: Path) -> dict[str, str]:
        """The environment of a client process: this Hub, online, no Xet, its own empty cache, a dummy token."""
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(HUB_SETTINGS) and k.lower() not in PROXY_SETTINGS
        }
        env.update(
            HF_ENDPOINT=self.endpoint,
            HF_HUB_OFFLINE="0",
            HF_HUB_DISABLE_XET="1",
            HF_HOME=str(hf_home),
            HF_TOKEN="hf_test_token",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_UPDATE_CHECK="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            NO_PROXY="127.0.0.1,localhost",
            OMP_NUM_THREADS="1",  # one thread per process, as the tests themselves use at most 2 cores
        )
        return env

    def run(self, args: list[str], name: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run a client command in a fresh process with an empty `HF_HOME` (`workdir/name/hf_home`).

        With `check`, a failure shows the client's output. The process runs in `workdir/name`, so that a repo id
        never resolves to a local folder.
        """
        cwd = self.workdir / name
        (cwd / "hf_home").mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            args,
            check=False,
            cwd=cwd,
            env=self.client_env(cwd / "hf_home"),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check:
            assert result.returncode == 0, f"{args[:3]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        return result

    def run_python(self, script: str, *args: str, name: str) -> dict:
        """Run `script` in a fresh client process; it prints its findings as JSON on its last line."""
        result = self.run([sys.executable, "-I", "-c", script, *map(str, args)], name=name)
        return json.loads(result.stdout.strip().splitlines()[-1])
