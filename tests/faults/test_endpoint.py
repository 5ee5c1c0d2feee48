"""The endpoint is safe to leave running: loopback by default, optional TLS with client certificates, basic
auth, nothing but gradient statistics and names in what it (or the report) says, and no code ever evaluated
from configuration.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradtel
from gradtel import export
from gradtel.config import Config
from tests.faults.helpers import ROOT, free_port, listening_inodes, parse, scrape_body, values

_trained: list = []


def _train_one_step(name: str) -> None:
    """One measured step of an optimizer that stays instrumented (retired optimizers stop exporting)."""
    var = keras.Variable(np.ones(2, "float32"), name="w")
    optimizer = keras.optimizers.SGD(0.0)
    gradtel.instrument(optimizer, name=name)
    optimizer.apply_gradients([(tf.constant([3.0, 4.0]), var)])
    _trained.append(optimizer)


@pytest.fixture
def from_env(monkeypatch):
    """Start the export from environment variables, as a training process would; shut it down after."""
    export.shutdown()
    yield _start_from_env(monkeypatch)
    while _trained:
        gradtel.uninstrument(_trained.pop())
    export.shutdown()


def _start_from_env(monkeypatch):

    def start(**env: str) -> tuple[str, int]:
        port = free_port()
        for key, value in {
            "OTEL_METRICS_EXPORTER": "prometheus",
            "OTEL_EXPORTER_PROMETHEUS_PORT": str(port),
            **env,
        }.items():
            monkeypatch.setenv(key, value)
        started = export.ensure_started(Config.from_env())
        assert started is not None and started.endpoint is not None
        return started.endpoint

    return start


@pytest.mark.parametrize(
    ("env", "address"), [({}, "0100007F"), ({"OTEL_EXPORTER_PROMETHEUS_HOST": "0.0.0.0"}, "00000000")]
)
def test_the_endpoint_binds_loopback_unless_configured(from_env, env, address):
    """Read from the kernel's table of listening sockets: 0100007F is 127.0.0.1, 00000000 is every address."""
    _, port = from_env(**env)
    assert sorted(listening_inodes(port).values()) == [address]


# --- TLS ------------------------------------------------------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, made with the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=gradtel-test-ca",
        cwd=d,
    )
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for who in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{who}.key",
            "-out",
            f"{who}.csr",
            "-subj",
            f"/CN={who}",
            cwd=d,
        )
        ext = "san.ext" if who == "server" else "client.ext"
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{who}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{who}.pem",
            "-days",
            "2",
            "-extfile",
            ext,
            cwd=d,
        )
    return d


def _client_context(pki: Path, with_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if with_cert:
        context.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    return context


def test_tls_serves_https_and_refuses_plain_http(from_env, pki):
    _, port = from_env(GRADTEL_TLS_CERT_FILE=str(pki / "server.pem"), GRADTEL_TLS_KEY_FILE=str(pki / "server.key"))
    _train_one_step("tls")
    body = scrape_body(port, scheme="https", context=_client_context(pki))
    assert values(parse(body), "gradtel_steps", optimizer="tls") == {(None, "tls"): 1}
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        scrape_body(port, scheme="http", timeout=5)
    # The endpoint survives the failed plain-HTTP attempt.
    assert 'optimizer="tls"' in scrape_body(port, scheme="https", context=_client_context(pki))


def test_tls_with_a_client_ca_requires_a_client_certificate(from_env, pki):
    _, port = from_env(
        GRADTEL_TLS_CERT_FILE=str(pki / "server.pem"),
        GRADTEL_TLS_KEY_FILE=str(pki / "server.key"),
        GRADTEL_TLS_CLIENT_CA_FILE=str(pki / "ca.pem"),
    )
    _train_one_step("mtls")
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        scrape_body(port, scheme="https", context=_client_context(pki), timeout=5)
    body = scrape_body(port, scheme="https", context=_client_context(pki, with_cert=True))
    assert values(parse(body), "gradtel_steps", optimizer="mtls") == {(None, "mtls"): 1}


def test_a_silent_tls_client_does_not_block_other_scrapes(from_env, pki):
    _, port = from_env(GRADTEL_TLS_CERT_FILE=str(pki / "server.pem"), GRADTEL_TLS_KEY_FILE=str(pki / "server.key"))
    with socket.create_connection(("127.0.0.1", port)):  # connects, never says a word
        time.sleep(0.2)
        scrape_body(port, scheme="https", context=_client_context(pki), timeout=5)


# --- basic auth -----------------------------------------------------------------------------------------------
def _status(port: int, headers: dict[str, str]) -> tuple[int, str]:
    try:
        body = scrape_body(port, headers=headers)
        return 200, body
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.mark.parametrize("password_from", ["env", "file"])
def test_basic_auth_guards_the_endpoint(from_env, tmp_path, password_from):
    secret = "s3cret: with colon and ünïcode"
    if password_from == "file":
        (tmp_path / "password").write_text(secret + "\n")
        env = {"GRADTEL_BASIC_AUTH_PASSWORD_FILE": str(tmp_path / "password")}
    else:
        env = {"GRADTEL_BASIC_AUTH_PASSWORD": secret}
    _, port = from_env(GRADTEL_BASIC_AUTH_USERNAME="prometheus", **env)
    _train_one_step(f"auth-{password_from}")
    for headers in ({}, _basic("prometheus", "wrong"), _basic("someone", secret), {"Authorization": "Bearer x"}):
        status, body = _status(port, headers)
        assert status == 401 and "gradtel_" not in body, headers
    status, body = _status(port, _basic("prometheus", secret))
    assert status == 200 and f'optimizer="auth-{password_from}"' in body


def test_basic_auth_and_tls_together(from_env, pki):
    _, port = from_env(
        GRADTEL_TLS_CERT_FILE=str(pki / "server.pem"),
        GRADTEL_TLS_KEY_FILE=str(pki / "server.key"),
        GRADTEL_BASIC_AUTH_USERNAME="u",
        GRADTEL_BASIC_AUTH_PASSWORD="p",
    )
    _train_one_step("auth-tls")
    with pytest.raises(urllib.error.HTTPError) as denied:
        scrape_body(port, scheme="https", context=_client_context(pki))
    assert denied.value.code == 401
    assert 'optimizer="auth-tls"' in scrape_body(
        port, scheme="https", context=_client_context(pki), headers=_basic("u", "p")
    )


# --- what is said, and how configuration is read ----------------------------------------------------------------
def test_no_tensor_contents_leave_the_process(exporter):
    """Distinctive constants in the data and the weights appear nowhere in a scrape or in the report."""
    port = exporter(run_id="privacy").endpoint[1]
    secret_weight, secret_input = 271828.1828, 314159.2653
    var = keras.Variable(np.full(3, secret_weight, "float32"), name="w")
    x = tf.constant(np.full(3, secret_input, "float32"))
    optimizer = keras.optimizers.SGD(0.0)
    gradtel.instrument(optimizer, name="privacy")
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.sin(var * 1e-9) * tf.cos(x * 1e-9))  # gradients far from either constant
    optimizer.apply_gradients(zip(tape.gradient(loss, [var]), [var], strict=True))
    body = scrape_body(port)
    report = json.dumps(gradtel.report())
    gradtel.uninstrument(optimizer)
    assert 'optimizer="privacy"' in body
    for text in (body, report):
        for secret in (secret_weight, secret_input):
            forms = (
                f"{secret:.4f}",
                f"{secret:.1f}",
                f"{float(np.float32(secret))}",
                f"{secret:e}"[:8],
                str(int(secret)),
            )
            for form in forms:
                assert form not in text, (form, text[:2000])


def test_configuration_is_never_evaluated_or_unpickled():
    """No eval/exec/pickle/marshal/unsafe YAML anywhere in gradtel's source: configuration is parsed as data."""
    pattern = re.compile(
        r"(?<![.\w])(eval|exec|compile)\s*\(|\bpickle\b|\bmarshal\b|\bshelve\b|\bdill\b|"
        r"yaml\.load\s*\(|yaml\.unsafe_load|__import__\s*\("
    )
    offenders = []
    for path in sorted((ROOT / "gradtel").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if pattern.search(code):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []
