"""The Prometheus pull endpoint: the latest exposition over HTTP, behind optional TLS and basic auth.

A small threaded WSGI server of gradtel's own (prometheus_client's ``start_http_server`` has TLS but no
authentication). It binds 127.0.0.1 unless configured otherwise; credentials are compared in constant time; it
serves the text exposition (gzipped when the scraper accepts it) on GET and HEAD of any path, nothing else.
"""

from __future__ import annotations

import base64
import errno
import hmac
import logging
import os
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from gradtel.exposition import CONTENT_TYPE, Exposition

if TYPE_CHECKING:
    from gradtel.config import Config

log = logging.getLogger("gradtel")
#: A WSGI application (PEP 3333): the environ and start_response in, the body's chunks out.
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
#: A client that connects over TLS and says nothing is dropped after this long.
_HANDSHAKE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Security:
    """TLS and basic-auth settings of the endpoint (all optional)."""

    certfile: str | None = None
    keyfile: str | None = None
    client_cafile: str | None = None
    username: str | None = None
    password: str | None = None


def security(config: Config) -> Security:
    """The TLS and basic-auth settings of ``config`` (checked there)."""
    return Security(
        certfile=config.tls_certfile,
        keyfile=config.tls_keyfile,
        client_cafile=config.tls_client_cafile,
        username=config.basic_auth_username,
        password=config.basic_auth_password,
    )


class _EndpointGone(Exception):
    """The listening socket is unusable (closed underneath): stop serving instead of spinning on it."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    address_family = socket.AF_INET
    tls: ssl.SSLContext | None = None

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            conn, address = self.socket.accept()
        except OSError as error:
            if error.errno in (errno.EBADF, errno.ENOTSOCK, errno.EINVAL):
                raise _EndpointGone(str(error)) from error
            if error.errno in (errno.EMFILE, errno.ENFILE):  # out of descriptors: back off, don't spin
                time.sleep(0.1)
            raise
        if self.tls is not None:
            # The handshake happens in the request's own thread (finish_request): one silent client must not
            # block every other scrape in accept().
            conn = self.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        return conn, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            request.settimeout(_HANDSHAKE_TIMEOUT_S)
            try:
                request.do_handshake()
            except (OSError, ssl.SSLError):
                return
            request.settimeout(None)
        super().finish_request(request, client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr for every scrape."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _metrics_app(source: Callable[[], Exposition]) -> WSGIApp:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD"), ("Content-Type", "text/plain")])
            return [b"method not allowed\n"]
        exposition = source()
        headers = [("Content-Type", CONTENT_TYPE)]
        body = exposition.text
        if "gzip" in environ.get("HTTP_ACCEPT_ENCODING", ""):
            body = exposition.gzipped()
            headers.append(("Content-Encoding", "gzip"))
        headers.append(("Content-Length", str(len(body))))
        start_response("200 OK", headers)
        return [] if method == "HEAD" else [body]

    return app


def _basic_auth(app: WSGIApp, username: str, password: str) -> WSGIApp:
    expected = b"Basic " + base64.b64encode(f"{username}:{password}".encode())

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        given = environ.get("HTTP_AUTHORIZATION", "").encode()
        if not hmac.compare_digest(given, expected):
            start_response(
                "401 Unauthorized", [("WWW-Authenticate", 'Basic realm="gradtel"'), ("Content-Type", "text/plain")]
            )
            return [b"unauthorized\n"]
        return app(environ, start_response)

    return guarded


class EndpointError(Exception):
    """The endpoint cannot start; the message names the real cause (a file, the address, the port)."""


def _readable(path: str, what: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise EndpointError(
            f"cannot serve metrics: the {what} {path!r} cannot be read ({error.strerror or error})"
        ) from None


def _tls_context(security: Security) -> ssl.SSLContext:
    """The server's TLS context; a file that cannot be read or does not hold what it should is named."""
    certfile, keyfile = security.certfile or "", security.keyfile
    _readable(certfile, "TLS certificate (GRADTEL_TLS_CERT_FILE)")
    if keyfile:
        _readable(keyfile, "TLS key (GRADTEL_TLS_KEY_FILE)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as error:
        raise EndpointError(
            f"cannot serve metrics: the TLS certificate {certfile!r} and key {keyfile!r} "
            f"(GRADTEL_TLS_CERT_FILE, GRADTEL_TLS_KEY_FILE) are not a matching PEM certificate "
            f"and private key ({error})"
        ) from None
    if security.client_cafile:
        _readable(security.client_cafile, "client CA file (GRADTEL_TLS_CLIENT_CA_FILE)")
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            context.load_verify_locations(cafile=security.client_cafile)
        except (ssl.SSLError, OSError) as error:
            raise EndpointError(
                f"cannot serve metrics: the client CA file {security.client_cafile!r} "
                f"(GRADTEL_TLS_CLIENT_CA_FILE) holds no usable PEM certificate ({error})"
            ) from None
    return context


def _address_family(host: str, port: int) -> socket.AddressFamily:
    """IPv4 or IPv6, as ``host`` resolves (a name is resolved here, so that one that does not is named as such)."""
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise EndpointError(
            f"cannot serve metrics: the bind address {host!r} (OTEL_EXPORTER_PROMETHEUS_HOST) "
            f"does not resolve ({error.strerror or error})"
        ) from None
    except OverflowError:
        raise EndpointError(
            f"cannot serve metrics on {host}:{port}: the port must be 0-65535 (OTEL_EXPORTER_PROMETHEUS_PORT)"
        ) from None
    families = [info[0] for info in infos]
    return socket.AF_INET if socket.AF_INET in families else families[0]


def _bind_error(host: str, port: int, error: OSError) -> EndpointError:
    """What a failed bind means, in the words of the setting to change."""
    where = f"cannot serve metrics on {host}:{port}"
    if error.errno == errno.EADDRINUSE:
        return EndpointError(
            f"{where}: the port is in use (set OTEL_EXPORTER_PROMETHEUS_PORT to a free port, or 0 for any free one)"
        )
    if error.errno == errno.EADDRNOTAVAIL:
        return EndpointError(f"{where}: {host!r} is not an address of this machine (OTEL_EXPORTER_PROMETHEUS_HOST)")
    if error.errno in (errno.EACCES, errno.EPERM):
        return EndpointError(
            f"{where}: permission denied (ports below 1024 need privileges; OTEL_EXPORTER_PROMETHEUS_PORT)"
        )
    return EndpointError(f"{where}: {error.strerror or error}")


class Endpoint:
    """A running /metrics server; ``port`` is the bound port (useful when 0 asked for a free one).

    Raises :class:`EndpointError`, naming the cause, when it cannot start."""

    def __init__(self, source: Callable[[], Exposition], host: str, port: int, security: Security) -> None:
        app = _metrics_app(source)
        if security.username is not None:
            app = _basic_auth(app, security.username, security.password or "")
        tls = _tls_context(security) if security.certfile else None  # before binding: nothing to undo
        server_class = _Server6 if _address_family(host, port) == socket.AF_INET6 else _Server
        try:
            self._server = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        except OSError as error:
            raise _bind_error(host, port, error) from None
        except OverflowError:
            raise EndpointError(
                f"cannot serve metrics on {host}:{port}: the port must be 0-65535 (OTEL_EXPORTER_PROMETHEUS_PORT)"
            ) from None
        self._server.tls = tls
        self.host = host
        self.port = self._server.server_address[1]
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._serve, name="gradtel-metrics", daemon=True)
        self._thread.start()
        _live.add(self)

    @property
    def scheme(self) -> str:
        return "https" if self._server.tls is not None else "http"

    def _serve(self) -> None:
        """serve_forever, but a failure is one clear log line and a closed socket (scrapers get 'connection
        refused' instead of hanging), never a silent dead thread."""
        try:
            self._server.serve_forever(poll_interval=0.5)
        except BaseException as error:
            log.warning(
                "gradtel: the metrics endpoint on %s:%d stopped (%r); training goes on without it.",
                self.host,
                self.port,
                error,
            )
            self._server.server_close()

    def close(self) -> None:
        if self._thread.is_alive() and os.getpid() == self._pid:
            self._server.shutdown()
        self._server.server_close()

    def _close_in_child(self) -> None:
        """After fork: the child must not hold the parent's listening socket (the port would stay bound)."""
        self._server.socket.close()


#: Endpoints of this process, closed in forked children (data-loader workers).
_live: weakref.WeakSet[Endpoint] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for endpoint in list(_live):
        endpoint._close_in_child()
    _live.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
