"""The HTTP device API server, run by :class:`~connectors.devices.ingress.DeviceServers`.

Devices ``POST`` to::

    /api/v1/{token}/telemetry   JSON telemetry (any Content-Type; application/json expected)
    /api/v1/{token}/vibration   one EVB1 block (any Content-Type; application/octet-stream expected)

The Content-Type header is not checked: the path names the channel and the
channel's decoder judges the bytes, so a device that sends JSON as
``application/x-www-form-urlencoded`` (curl's ``-d`` default) is served too.
``Content-Encoding: gzip`` / ``deflate`` bodies are decompressed by aiohttp and
the size limit applies to the decompressed bytes; any other encoding is
refused before the body is read. ``Expect: 100-continue`` is answered only
after the token, the encoding, the declared size and the device's requests in
progress are checked, so a refused device never sends its body.

Answers (every error body is JSON ``{"error": "<one line reason>"}``):

====  ===========================================================  ===================
code  when                                                         queued
====  ===========================================================  ===================
200   accepted; body ``{"status": "accepted"}``                    yes
400   malformed payload (the decoder's reason)                     yes, a dead letter
400   empty body                                                   no
400   a Content-Encoding other than gzip/deflate/identity          no
400   a body that does not decompress                              no
400   a request aiohttp cannot parse (answered before routing)     no
401   unknown token                                                no
404   any other path                                               no
405   a method other than POST on a device path (``Allow: POST``)  no
413   body over ``ingress.max_payload_bytes``                      no
417   an ``Expect`` other than ``100-continue``                    no
503   the hand-off queue or the journal is full (``Retry-After``)  no
503   the device has ``max_requests_per_device`` in progress       no
====  ===========================================================  ===================

A client that closes its connection mid-body is one INFO line (the access
log shows 499, nginx's "client closed request"); nothing of it is kept.

With a journal (``Ingress(journal=...)``) "queued" means committed to the
ingest journal: 200 and the 400 for a malformed payload are sent only after
the commit, and the journal's push-back reason (over ``journal.max_bytes``,
disk full) is the 503's reason.

A 401 or 413 sent before the body was read closes the connection (the rest of
the body is discarded, bounded by aiohttp's lingering time); every other answer
keeps the connection alive. Offers run on the event loop thread, as
:class:`~connectors.devices.ingress.Ingress` requires; a request waiting for
its commit does not hold up the others.

Tokens never reach the logs: aiohttp's access log is replaced by one that
logs the route template (``/api/v1/{token}/telemetry``) and the device id, and
parse errors of malformed requests, whose text may hold the request line, are
logged by class only.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from typing import Any, Final

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import ContentEncodingError, HttpProcessingError
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from connectors.common.address import parse_host_port
from connectors.devices.ingress import Ingress, Offer, Verdict
from connectors.devices.registry import DeviceRegistry

__all__ = ["HttpServer"]

logger = logging.getLogger("edgesieve.http")
access_logger = logging.getLogger("edgesieve.http.access")
server_logger = logging.getLogger("edgesieve.http.server")
"""aiohttp's own connection-level messages; see :class:`_RedactParseErrors`."""

TRANSPORT: Final = "http"
ROUTE: Final = "/api/v1/{token:[^/]+}/{channel:telemetry|vibration|attributes|logs}"
KEEPALIVE_TIMEOUT_S: Final = 75.0
"""Idle keep-alive connections are closed after this long."""
SHUTDOWN_TIMEOUT_S: Final = 5.0
""":meth:`HttpServer.stop` waits this long for requests in progress."""
DEFAULT_MAX_REQUESTS_PER_DEVICE: Final = 8
"""Requests one device may have in progress at once (``max_requests_per_device``)."""
CLIENT_CLOSED: Final = 499
"""The status the access log shows for a client gone mid-request (nginx's "client closed")."""
ENCODINGS: Final = frozenset({"identity", "gzip", "deflate"})
"""The ``Content-Encoding`` values a body may have; any other is refused with 400."""
_ENCODING_HINT: Final = "send the body uncompressed, or compressed with gzip or deflate"

_ACCEPTED: Final = b'{"status": "accepted"}'
"""The 200 body, encoded once: what ``web.json_response`` sends, without a dumps per request."""
_HINTS: Final = {
    "telemetry": 'POST JSON telemetry like {"temperature": 21.5}',
    "vibration": "POST one EVB1 block as application/octet-stream",
    "attributes": 'POST a JSON object of attributes like {"firmware": "1.4.2"}',
    "logs": 'POST log lines as text, or JSON like {"level": "error", "msg": "disk full"}',
}
_ENDPOINTS: Final = (
    "devices POST to /api/v1/{token}/telemetry, /api/v1/{token}/attributes, "
    "/api/v1/{token}/logs or /api/v1/{token}/vibration"
)
_TOKEN_IN_PATH = re.compile(r"(/api/v1/)[^/\s]+")

if hasattr(web, "RequestKey"):
    _DEVICE: Any = web.RequestKey("edgesieve_device", str)
else:  # aiohttp < 3.13 has no typed request keys
    _DEVICE = "edgesieve_device"


def _error(status: int, reason: str, *, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": reason}, status=status, headers=headers)


def _closing(response: web.Response) -> web.Response:
    """``response``, closing the connection after it (sent before the body was read)."""
    response.force_close()
    return response


def _first_line(text: str, most: int = 120) -> str:
    """The first line of an aiohttp message, without the request bytes it quotes.

    Those bytes may hold a token; any token left in the line is redacted too.
    """
    line = re.split(r":\s*(?:b'|b\"|bytearray\()", text.strip().split("\n", 1)[0])[0]
    return _TOKEN_IN_PATH.sub(r"\1<token>", line).rstrip(":. ")[:most]


class _RedactParseErrors(logging.Filter):
    """Keeps request lines, which hold the token, out of aiohttp's connection-level logs.

    A request aiohttp cannot parse, and a refused body that turns out to be
    undecodable while aiohttp discards it after the answer, are the client's
    mistakes, answered 400: one INFO line each, no traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        message = _TOKEN_IN_PATH.sub(r"\1<token>", record.getMessage())
        client_error = True
        if isinstance(exc, HttpProcessingError):
            message = (
                f"{message}: {type(exc).__name__} (HTTP {exc.code}); "
                "the request text is not logged, it may hold a device token"
            )
        elif isinstance(exc, RequestPayloadError):
            message = (
                f"{message}: the rest of a refused request's body could not be read "
                f"({_first_line(str(exc))}); the connection is closed"
            )
        else:
            client_error = False
        if client_error:
            record.exc_info = None
            record.exc_text = None
            if record.levelno > logging.INFO:
                record.levelno, record.levelname = logging.INFO, "INFO"
        record.msg, record.args = message, ()
        return True


server_logger.addFilter(_RedactParseErrors())


def _corrupt_body_reason(encoding: str) -> str:
    return (
        f"body is not valid {encoding} data (Content-Encoding: {encoding}); "
        f"compress it with {encoding}, or send it uncompressed without the header"
    )


def _parse_error_reason(status: int, exc: BaseException | None) -> str:
    """The JSON ``error`` of an answer aiohttp makes itself (a request it could not parse)."""
    if isinstance(exc, ContentEncodingError):
        if "install" in exc.message:
            # "Can not decode content-encoding: brotli (br). Please install `Brotli`"
            named = re.search(r"content-encoding: ([^.]+)", exc.message)
            what = named.group(1) if named else "this"
            return f"Content-Encoding {what} is not supported; {_ENCODING_HINT}"
        # a stream that ends early: "deflate", "Can not decode content-encoding: gzip"
        return _corrupt_body_reason(exc.message.split()[-1] if exc.message else "compressed")
    if isinstance(exc, HttpProcessingError):
        return (
            f"malformed HTTP request: {_first_line(exc.message)}; hint: {_ENDPOINTS} "
            "in HTTP/1.1 with well-formed headers"
        )
    if status == 504:
        return "the edge took too long to answer; retry later"
    return "internal error in the edge; see its logs"


class _JsonErrorsHandler(RequestHandler):
    """aiohttp's connection handler, answering the errors it raises itself in JSON.

    aiohttp answers requests it cannot parse (bad request line, bad headers, a
    ``Content-Encoding`` it cannot decode) before any routing or middleware,
    with a text/plain body, and offers no hook for it (aio-libs/aiohttp#3287).
    :meth:`handle_error` is the one place those answers are made; this keeps
    aiohttp's logging and connection handling and replaces only the body.
    """

    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> StreamResponse:
        """Log as aiohttp does, answer ``{"error": ...}`` and close the connection."""
        super().handle_error(request, status, exc, message)  # raises if an answer has started
        response = _error(status, _parse_error_reason(status, exc))
        response.force_close()
        return response


class _Server(web.Server):
    """aiohttp's server making :class:`_JsonErrorsHandler` connections."""

    def __call__(self) -> RequestHandler:
        handler = super().__call__()
        handler.__class__ = _JsonErrorsHandler  # same slots: only handle_error differs
        return handler


def _route(request: BaseRequest) -> str:
    """The request's route template with the channel filled in; never the token."""
    try:
        match_info = request.match_info  # type: ignore[attr-defined]
    except (AttributeError, AssertionError):  # a request aiohttp could not parse
        return "(unparsed request)"
    resource = match_info.route.resource if match_info is not None else None
    if resource is None:
        return "(no route)"
    return resource.canonical.replace("{channel}", match_info.get("channel", "{channel}"))


class _AccessLogger(AbstractAccessLogger):
    """One line per request with the route template instead of the path (which holds the token)."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %s %d %dB %.4fs device=%s",
            request.remote,
            request.method,
            _route(request),
            response.status,
            response.body_length,
            time,
            request.get(_DEVICE, "-"),
        )

    @property
    def enabled(self) -> bool:
        """Whether INFO lines would be emitted at all."""
        return self.logger.isEnabledFor(logging.INFO)


class HttpServer:
    """The HTTP device API on ``listen``, handing bodies to ``ingress``.

    Implements :class:`connectors.devices.ingress.DeviceServer`. ``listen`` is
    ``"HOST:PORT"`` (``"[::1]:8080"`` for IPv6, port 0 for an ephemeral port,
    read back from :attr:`port` after :meth:`start`). Request bodies are
    bounded by ``ingress.max_payload_bytes``; one device has at most
    ``max_requests_per_device`` requests in progress (503 beyond), so one
    device's token cannot hold the server's capacity.
    """

    name = "http"

    def __init__(
        self,
        listen: str,
        registry: DeviceRegistry,
        ingress: Ingress,
        *,
        max_requests_per_device: int = DEFAULT_MAX_REQUESTS_PER_DEVICE,
    ) -> None:
        self._host, self._port = parse_host_port(listen, key="HttpServer.listen")
        if isinstance(max_requests_per_device, bool) or not (
            isinstance(max_requests_per_device, int) and max_requests_per_device > 0
        ):
            msg = (
                f"HttpServer: max_requests_per_device must be a positive integer "
                f"(got {max_requests_per_device!r}); hint: {DEFAULT_MAX_REQUESTS_PER_DEVICE} "
                "lets a device pipeline a few requests"
            )
            raise ValueError(msg)
        self.listen = listen
        self.max_requests_per_device = max_requests_per_device
        self._registry = registry
        self._ingress = ingress
        self._in_flight: Counter[str] = Counter()
        """Requests in progress per device, from the token check to the answer."""
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    def __repr__(self) -> str:
        return f"HttpServer({self.listen!r})"

    @property
    def running(self) -> bool:
        """Whether the server is bound and answering."""
        return self._site is not None

    @property
    def port(self) -> int:
        """The bound TCP port (the real one when ``listen`` asked for port 0)."""
        if self._site is None:
            msg = f"HttpServer({self.listen!r}).port: not started yet; await start() first"
            raise RuntimeError(msg)
        return self._site.port

    async def start(self) -> None:
        """Bind ``listen`` and serve; raise OSError naming the address if it cannot be used."""
        if self._runner is not None:
            msg = f"HttpServer({self.listen!r}).start: already started; stop() it first"
            raise RuntimeError(msg)
        app = web.Application(
            client_max_size=self._ingress.max_payload_bytes, middlewares=[self._json_errors]
        )
        app.router.add_post(ROUTE, self._receive, expect_handler=self._expect)
        runner = web.AppRunner(
            app,
            access_log_class=_AccessLogger,
            access_log=access_logger,
            logger=server_logger,
            keepalive_timeout=KEEPALIVE_TIMEOUT_S,
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        )
        await runner.setup()
        if type(runner.server) is web.Server:  # what aiohttp >= 3.9 makes
            runner.server.__class__ = _Server  # aiohttp's own 400s in JSON too
        site = web.TCPSite(runner, self._host, self._port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            msg = (
                f"HttpServer: cannot listen on {self.listen!r}: {exc.strerror or exc}; hint: "
                f"another process may hold port {self._port} (pick another, or 0 for an "
                f"ephemeral port), or {self._host!r} is not an address of this machine"
            )
            raise OSError(exc.errno, msg) from exc
        self._runner, self._site = runner, site
        logger.info("http device API listening on %s", self._url())

    async def stop(self) -> None:
        """Stop accepting, finish requests in progress and close keep-alive connections."""
        if self._runner is None:
            return
        url = self._url()
        runner, self._runner, self._site = self._runner, None, None
        await runner.cleanup()
        # aiohttp discards the unread body of a request refused early ("lingering", up to 10 s)
        # and does not notice when that client leaves; such a task would outlive the server
        lingering = [
            task
            for task in asyncio.all_tasks()
            if getattr(task.get_coro(), "__qualname__", "") == "RequestHandler.start"
        ]
        for task in lingering:
            task.cancel()
        await asyncio.gather(*lingering, return_exceptions=True)
        logger.info("http device API on %s stopped", url)

    def _url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    def _precheck(self, request: web.Request) -> web.Response | None:
        """Refuse before reading the body.

        Unknown token (401), a ``Content-Encoding`` that is not in
        :data:`ENCODINGS` (400), too large a ``Content-Length`` (413), the
        device's requests in progress at their limit (503).
        """
        device = self._registry.authenticate(request.match_info["token"])
        if device is None:
            return _closing(
                _error(
                    401,
                    "unknown access token; use the token of this device in devices.yaml "
                    "(/api/v1/{token}/...)",
                )
            )
        request[_DEVICE] = device
        encodings = request.headers.getall("Content-Encoding", [])
        if encodings and (len(encodings) > 1 or encodings[0].strip().lower() not in ENCODINGS):
            named = ", ".join(encodings)[:40]
            return _closing(
                _error(400, f"Content-Encoding {named!r} is not supported; {_ENCODING_HINT}")
            )
        limit = self._ingress.max_payload_bytes
        size = request.content_length
        if size is not None and size > limit:
            return _closing(
                _error(
                    413,
                    f"Content-Length {size} is over the {limit}-byte limit; "
                    "split the payload into smaller messages",
                )
            )
        most = self.max_requests_per_device
        if self._in_flight[device] >= most:
            self._ingress.refused += 1
            reason = (
                f"device {device} already has {most} requests in progress "
                f"(transports.http.max_requests_per_device); wait for their answers, "
                f"retry in {self._ingress.retry_after_s}s"
            )
            return _closing(self._overloaded(reason))
        return None

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        """Answer ``Expect: 100-continue`` only when the body would be taken."""
        if request.version < (1, 1):
            return None  # RFC 9110 §10.1.1: an HTTP/1.0 expectation is ignored
        expect = request.headers.get("Expect", "")
        if expect.lower() != "100-continue":
            return _closing(
                _error(
                    417,
                    f"Expect: {expect[:40]!r} is not supported; send 'Expect: 100-continue' "
                    "or no Expect header",
                )
            )
        refusal = self._precheck(request)
        if refusal is not None:
            return refusal
        ingress = self._ingress
        busy = ingress.busy()
        if busy is not None:
            ingress.refused += 1
            return _closing(self._overloaded(busy))
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
        return None

    def _overloaded(self, reason: str) -> web.Response:
        retry = str(self._ingress.retry_after_s)
        return _error(503, reason, headers={"Retry-After": retry})

    async def _receive(self, request: web.Request) -> web.Response:
        """Authenticate, read the bounded body and offer it to the ingress."""
        refusal = self._precheck(request)
        if refusal is not None:
            return refusal
        device: str = request[_DEVICE]
        self._in_flight[device] += 1
        try:
            return await self._read_and_deliver(request, device)
        finally:
            self._in_flight[device] -= 1
            if not self._in_flight[device]:
                del self._in_flight[device]

    async def _read_and_deliver(self, request: web.Request, device: str) -> web.Response:
        channel = request.match_info["channel"]
        limit = self._ingress.max_payload_bytes
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _closing(
                _error(
                    413,
                    f"payload is over the {limit}-byte limit (refused while reading); "
                    "split it into smaller messages",
                )
            )
        except ConnectionError:
            return self._client_closed(request, device)
        except RequestPayloadError as exc:
            transport = request.transport
            if transport is None or transport.is_closing():
                return self._client_closed(request, device)
            return self._bad_body(request, device, exc)
        except asyncio.CancelledError:
            logger.debug(
                "http: %s %s from %s cancelled while reading its body (the edge is stopping); "
                "nothing was stored",
                request.method,
                _route(request),
                device,
            )
            raise
        if not body:
            return _error(400, f"empty body; {_HINTS[channel]}")
        offer: Offer = await self._ingress.deliver(device, channel, TRANSPORT, body)
        verdict = offer.verdict
        if verdict is Verdict.ACCEPTED:
            return web.Response(body=_ACCEPTED, content_type="application/json", charset="utf-8")
        logger.debug("http %s from %s: %s (%s)", channel, device, verdict.value, offer.reason)
        if verdict is Verdict.REJECTED:
            return _error(400, offer.reason)
        if verdict is Verdict.TOO_LARGE:
            return _error(413, offer.reason)
        return self._overloaded(offer.reason)

    def _client_closed(self, request: web.Request, device: str) -> web.Response:
        """One line for a client gone mid-body; the 499 only reaches the access log."""
        declared = request.content_length
        self._ingress.aborted += 1
        logger.info(
            "http: %s closed the connection after %d of %s body bytes (%s %s); nothing was stored",
            device,
            request.content.total_bytes,
            "?" if declared is None else declared,
            request.method,
            _route(request),
        )
        return _closing(_error(CLIENT_CLOSED, "the client closed the connection mid-request"))

    def _bad_body(
        self, request: web.Request, device: str, exc: RequestPayloadError
    ) -> web.Response:
        """400 for a body that cannot be decoded (corrupt gzip/deflate, broken chunked framing)."""
        cause = exc.__cause__
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        if isinstance(cause, ContentEncodingError) and encoding:
            reason = _corrupt_body_reason(encoding)
        else:
            reason = (
                f"malformed request body: {_first_line(str(exc))}; "
                "send the body with a correct Content-Length or chunked framing"
            )
        logger.debug("http: %s from %s refused: %s", _route(request), device, reason)
        return _closing(_error(400, reason))

    @web.middleware
    async def _json_errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Turn aiohttp's routing errors and unexpected failures into JSON error bodies."""
        try:
            return await handler(request)
        except web.HTTPMethodNotAllowed as exc:
            allow = exc.headers.get("Allow", "POST")
            reason = f"method {request.method} is not allowed here; use {allow}"
            return _error(405, reason, headers={"Allow": allow})
        except web.HTTPNotFound:
            return _error(404, f"no such endpoint; {_ENDPOINTS}")
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _error(exc.status, exc.reason)
        except ConnectionError:
            raise
        except Exception:
            logger.exception("http: %s %s failed", request.method, _route(request))
            return _error(500, "internal error in the edge; see its logs")
