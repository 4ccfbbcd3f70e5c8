"""Start a simulated engine and sluice (HTTPS, trusted test CA) for the SDK tests."""

import hashlib
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import trustme

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-py-acme"
LIMITED_KEY = "sk-py-limited"
POLICY_KEY = "sk-py-policy"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary() -> str:
    path = os.environ.get("SLUICE_BIN") or str(ROOT / "target" / "debug" / "sluice")
    if not Path(path).exists():
        raise RuntimeError(f"sluice binary not found at {path}: run `cargo build` first")
    return path


# Talk to loopback directly, whatever proxy the environment names.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _wait_ready(url: str, proc: subprocess.Popen) -> None:
    for _ in range(500):
        if proc.poll() is not None:
            raise RuntimeError(f"process exited early with {proc.returncode}")
        try:
            with _OPENER.open(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"{url} never became ready")


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="session")
def sluice():
    """Yields (base_url, ca_pem_path)."""
    tmp = Path(tempfile.mkdtemp(prefix="sluice-py-"))
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp / "cert.pem"))
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))

    engine_port, https_port, ops_port = _free_port(), _free_port(), _free_port()
    engine = subprocess.Popen(
        [_binary(), "sim-engine", "--listen", f"127.0.0.1:{engine_port}", "--ttft", "5", "--tpot", "5"],
        stdout=subprocess.DEVNULL,
    )
    _wait_ready(f"http://127.0.0.1:{engine_port}/health", engine)

    config = tmp / "sluice.toml"
    config.write_text(
        f"""
[server]
https = {{ listen = "127.0.0.1:{https_port}", cert = "cert.pem", key = "key.pem" }}
ops = "127.0.0.1:{ops_port}"

[[pools]]
name = "p"
endpoints = ["http://127.0.0.1:{engine_port}"]
models = ["deepseek-v4-flash"]
retries = 0

[[tenants]]
id = "acme"
deployment = "serverless"
pool = "p"
[[tenants.api_keys]]
id = "py"
sha256 = "{_sha(KEY)}"

[[tenants]]
id = "limited"
deployment = "serverless"
pool = "p"
max_concurrent_requests = 1
[[tenants.api_keys]]
id = "py"
sha256 = "{_sha(LIMITED_KEY)}"

[[tenants]]
id = "policy"
deployment = "serverless"
pool = "p"
[[tenants.api_keys]]
id = "py"
sha256 = "{_sha(POLICY_KEY)}"
[[tenants.plugins]]
builtin = "rate-limit"
config = {{ requests_per_minute = 60, request_burst = 6 }}
[[tenants.plugins]]
builtin = "context-cap"
config = {{ max_input_tokens = 1000 }}
[[tenants.plugins]]
builtin = "thinking-policy"
config = {{ tasks = {{ agent = "force-on" }} }}
[[tenants.plugins]]
builtin = "output-validator"
config = {{ max_retries = 1 }}
"""
    )
    proxy = subprocess.Popen([_binary(), "serve", "--config", str(config)], stdout=subprocess.DEVNULL)
    try:
        _wait_ready(f"http://127.0.0.1:{ops_port}/readyz", proxy)
        yield f"https://localhost:{https_port}/v1", str(tmp / "ca.pem")
    finally:
        for p in (proxy, engine):
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
