"""The Prometheus pull endpoint: prometheus_client's WSGI app behind optional TLS and basic auth.

prometheus_client's own ``start_http_server`` has TLS but no authentication, so gradtel serves the same WSGI app
(``make_wsgi_app``: exposition format, content negotiation, gzip) from a small threaded server of its own. It
binds 127.0.0.1 unless configured otherwise; credentials are compared in constant time; nothing but the
registry's metrics is served.
"""

from __future__ import annotations

import base64
import hmac
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app


@dataclass(frozen=True)
class Security:
    """TLS and basic-auth settings of the endpoint (all optional)."""

    certfile: str | None = None
    keyfile: str | None = None
    client_cafile: str | None = None
    username: str | None = None
    password: str | None = None


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    address_family = socket.AF_INET


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr for every scrape."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _basic_auth(app: Callable[..., Any], username: str, password: str) -> Callable[..., Any]:
    expected = b"Basic " + base64.b64encode(f"{username}:{password}".encode())

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        given = environ.get("HTTP_AUTHORIZATION", "").encode()
        if not hmac.compare_digest(given, expected):
            start_response("401 Unauthorized", [("WWW-Authenticate", 'Basic realm="gradtel"'),
                                                ("Content-Type", "text/plain")])
            return [b"unauthorized\n"]
        return app(environ, start_response)

    return guarded


def _tls_context(security: Security) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(security.certfile or "", security.keyfile)
    if security.client_cafile:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=security.client_cafile)
    return context


class Endpoint:
    """A running /metrics server; ``port`` is the bound port (useful when 0 asked for a free one)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int, security: Security) -> None:
        app = make_wsgi_app(registry)
        if security.username is not None:
            app = _basic_auth(app, security.username, security.password or "")
        server_class = _Server6 if ":" in host else _Server
        self._server = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        if security.certfile:
            self._server.socket = _tls_context(security).wrap_socket(self._server.socket, server_side=True)
        self.host = host
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="gradtel-metrics", daemon=True)
        self._thread.start()

    @property
    def scheme(self) -> str:
        return "https" if isinstance(self._server.socket, ssl.SSLSocket) else "http"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
