"""TLS: the server serves HTTPS/WSS with a certificate; the client verifies it.

A private CA and its certificates are made IN THE TEST with the ``openssl`` command:
a CA, a server certificate for ``127.0.0.1``/``localhost`` and one for another name.
Then a real server (in a thread, or ``python -m server`` with the flags) and a real
:class:`client.session.DistributedClient`: with the CA configured it registers; without
it, or on a name the certificate does not list, it fails with plain words.
"""

from __future__ import annotations

import itertools
import json
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from client.backoff import Backoff
from client.config import Settings
from client.session import DistributedClient, _tls_words
from client.snapshot import ClientSnapshot
from server.config import ConfigError, ServerConfig
from server.tls import TLSConfigError, server_ssl_context
from tests.device_info import quick_device_info
from tests.server_harness import (
    REPO_ROOT,
    running_server,
    server_args,
    server_process,
    subprocess_env,
)
from tests.waiting import poll, scale_waits, scaled

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path  # for 127.0.0.1 and localhost
    key: Path
    wrong_cert: Path  # for wrong.example only
    wrong_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=scaled(60), check=False
    )
    assert done.returncode == 0, f"openssl {' '.join(args)} failed: {done.stderr}"


def _issue(directory: Path, name: str, san: str) -> tuple[Path, Path]:
    key, csr, cert = (directory / f"{name}.{ext}" for ext in ("key", "csr", "pem"))
    ext = directory / f"{name}.ext"
    ext.write_text(
        f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-new", *ec, "-keyout", key.name, "-out", csr.name, "-subj", f"/CN={name}",
             cwd=directory)  # fmt: skip
    _openssl("x509", "-req", "-in", csr.name, "-CA", "ca.pem", "-CAkey", "ca.key",
             "-set_serial", str(abs(hash(name)) + 2), "-days", "2", "-extfile", ext.name,
             "-out", cert.name, cwd=directory)  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=fedtray test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)  # fmt: skip
    cert, key = _issue(d, "server", "DNS:localhost,IP:127.0.0.1")
    wrong_cert, wrong_key = _issue(d, "wrong", "DNS:wrong.example")
    return Pki(ca=d / "ca.pem", cert=cert, key=key, wrong_cert=wrong_cert, wrong_key=wrong_key)


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_DATA_HOME"):
        monkeypatch.setenv(var, str(tmp_path / "xdg" / var.lower()))


def _client(tmp_path: Path, url: str, ca_file: Path | None) -> DistributedClient:
    settings = Settings(
        server_url=url, device_name="tls-dev", ca_file=str(ca_file) if ca_file else None
    )
    client = DistributedClient(
        settings,
        device_info=quick_device_info(),
        data_dir=tmp_path / "client",
        backoff=Backoff(base=0.2, cap=1.0),
        settings_file=None,
    )
    return scale_waits(client)


@pytest.fixture
def clients() -> Iterator[list[DistributedClient]]:
    made: list[DistributedClient] = []
    yield made
    for client in made:
        assert client.stop(scaled(30)), "the session did not stop in time"


def _https_json(url: str, ca: Path) -> dict[str, Any]:
    ctx = ssl.create_default_context(cafile=str(ca))
    with urllib.request.urlopen(url, timeout=scaled(10), context=ctx) as resp:
        data: dict[str, Any] = json.loads(resp.read().decode("utf-8"))
    return data


# --------------------------------------------------------------------------- server side


def test_server_context_serves_the_certificate(pki: Pki) -> None:
    ctx = server_ssl_context(pki.cert, pki.key)
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2


@pytest.mark.parametrize(
    ("which", "expected"),
    [
        ("missing_cert", "cannot read the certificate --certfile"),
        ("missing_key", "cannot read the private key --keyfile"),
        ("not_pem_cert", "is not a PEM file"),
        ("mismatched_key", "does not belong to the certificate"),
        ("key_as_cert", "cannot use --certfile"),
    ],
)
def test_server_context_errors_are_one_line(
    pki: Pki, tmp_path: Path, which: str, expected: str
) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("hello, not a certificate\n")
    cert, key = {
        "missing_cert": (tmp_path / "nope.pem", pki.key),
        "missing_key": (pki.cert, tmp_path / "nope.key"),
        "not_pem_cert": (junk, pki.key),
        "mismatched_key": (pki.cert, pki.wrong_key),
        "key_as_cert": (pki.key, pki.key),
    }[which]
    with pytest.raises(TLSConfigError) as info:
        server_ssl_context(cert, key)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize(("certfile", "keyfile"), [(Path("a.pem"), None), (None, Path("a.key"))])
def test_certfile_and_keyfile_go_together(
    certfile: Path | None, keyfile: Path | None, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="--certfile and --keyfile go together"):
        ServerConfig(state_dir=tmp_path, certfile=certfile, keyfile=keyfile)


# --------------------------------------------------------------------------- client words


@pytest.mark.parametrize(
    ("code", "ca_file", "names", "expected"),
    [
        (19, None, [], "not trusted (self-signed or unknown CA): set ca_file"),
        (20, None, [], "fedtray-client config set ca_file"),
        (20, "/x/ca.pem", [], "the CA in ca_file /x/ca.pem did not sign it"),
        (
            62,
            None,
            ["wrong.example"],
            "the certificate is for wrong.example, not 127.0.0.1 (hostname mismatch)",
        ),
        (64, None, [], "not valid for 127.0.0.1 (hostname mismatch)"),
        (10, None, [], "has expired"),
        (99, None, [], "was refused: odd detail"),
    ],
)
def test_tls_words(code: int, ca_file: str | None, names: list[str], expected: str) -> None:
    assert expected in _tls_words(code, "odd detail", "127.0.0.1", ca_file, names)


# --------------------------------------------------------------------------- end to end


def _connected(s: ClientSnapshot) -> bool:
    return s.connection == "connected"


def test_client_registers_over_tls_with_the_ca(
    tmp_path: Path, pki: Pki, clients: list[DistributedClient]
) -> None:
    with running_server(tmp_path, certfile=pki.cert, keyfile=pki.key, min_clients=5) as server:
        assert server.server.url.startswith("https://")
        url = f"https://127.0.0.1:{server.port}"
        client = _client(tmp_path, url, pki.ca)
        clients.append(client)
        client.start()
        client.wait_for(_connected, 30)
        # The dashboard and status are served over HTTPS too, and show the device.
        status = poll(
            lambda: _https_json(f"{url}/api/status", pki.ca),
            lambda st: len(st["devices"]) == 1,
            30.0,
            "the device in the status",
        )
        assert status["devices"][0]["name"] == "tls-dev"
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        with urllib.request.urlopen(f"{url}/", timeout=scaled(10), context=ctx) as resp:
            assert resp.status == 200 and b"<html" in resp.read().lower()
        # Plain HTTP to the TLS port does not get the status.
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/api/status", timeout=scaled(5))


def test_client_without_the_ca_says_not_trusted(
    tmp_path: Path, pki: Pki, clients: list[DistributedClient]
) -> None:
    with running_server(tmp_path, certfile=pki.cert, keyfile=pki.key, min_clients=5) as server:
        client = _client(tmp_path, f"https://127.0.0.1:{server.port}", None)
        clients.append(client)
        seen: list[ClientSnapshot] = []
        client.subscribe(seen.append)
        client.start()
        snap = client.wait_for(lambda s: s.last_error is not None, 30)
        assert snap.connection != "connected"
        assert snap.last_error is not None
        assert "not trusted (self-signed or unknown CA): set ca_file" in snap.last_error
        # It waits between tries (backoff), it does not spin.
        client.wait_for(lambda s: s.next_retry_at is not None, 10)
        assert len(_https_json(f"{server.server.url}/api/status", pki.ca)["devices"]) == 0
        attempts = sum(
            1 for a, b in itertools.pairwise(seen) if b.connection == "connecting" != a.connection
        )
        assert attempts <= 3


def test_client_on_a_wrong_hostname_names_the_certificate(
    tmp_path: Path, pki: Pki, clients: list[DistributedClient]
) -> None:
    with running_server(
        tmp_path, certfile=pki.wrong_cert, keyfile=pki.wrong_key, min_clients=5
    ) as server:
        client = _client(tmp_path, f"https://127.0.0.1:{server.port}", pki.ca)
        clients.append(client)
        client.start()
        snap = client.wait_for(lambda s: s.last_error is not None, 30)
        assert snap.last_error == (
            "the certificate is for wrong.example, not 127.0.0.1 (hostname mismatch): "
            "connect with a name the certificate lists"
        )


def test_server_process_serves_https_with_the_flags(tmp_path: Path, pki: Pki) -> None:
    flags = ("--certfile", str(pki.cert), "--keyfile", str(pki.key), "--min-clients", "5")
    with server_process(tmp_path, *flags) as server:
        assert server.url.startswith("https://127.0.0.1:")
        assert _https_json(f"{server.url}/api/status", pki.ca)["task"] == "synthetic"
        server.terminate()


def test_server_process_with_a_bad_key_exits_with_one_line(tmp_path: Path, pki: Pki) -> None:
    args = server_args(tmp_path, "--certfile", str(pki.cert), "--keyfile", str(pki.wrong_key))
    done = subprocess.run(
        [sys.executable, "-m", "server", *args],
        cwd=REPO_ROOT,
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=scaled(120),
        check=False,
    )
    assert done.returncode == 1
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("fedtray-server: error:")]
    assert len(errors) == 1
    assert "does not belong to the certificate" in errors[0]
    assert "Traceback" not in done.stderr


def test_ca_file_flag_is_saved_as_an_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from client.cli import apply_cli_overrides, build_parser
    from client.config import load_settings

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "config.toml"
    args = build_parser().parse_args(["--ca-file", "certs/ca.pem"])
    updated = apply_cli_overrides(Settings(), args, path=path)
    assert updated.ca_file == str(tmp_path / "certs" / "ca.pem")
    assert load_settings(path).ca_file == str(tmp_path / "certs" / "ca.pem")
