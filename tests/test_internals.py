"""The library internals we build on are still there, with the names and signatures we use.

``app/server.py`` subclasses waitress's channel and task and drives its event loop;
``loadtest/booths.py`` takes a connection from requests' adapter and urllib3's pool and drives
it directly; ``app/stores/postgres.py`` dumps and loads a batch with a psycopg Transformer.
None of that is public API, so pyproject.toml pins waitress and psycopg to the minor
versions tested and gives requests and urllib3 the floors that have it. After an upgrade
(make lock LOCK_ARGS=--upgrade), a failure here names what moved, before anything else
breaks oddly.
"""

from __future__ import annotations

import inspect
import socket
from collections.abc import Callable, Iterator
from typing import Any

import psycopg.adapt
import psycopg.pq
import pytest
import requests
import requests.adapters
import urllib3.connection
import urllib3.connectionpool
import urllib3.exceptions
import urllib3.util
from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import BaseWSGIServer, create_server
from waitress.task import Task, ThreadedTaskDispatcher, WSGITask


def params(function: Callable[..., Any]) -> list[str]:
    return [p for p in inspect.signature(function).parameters if p != "self"]


def takes(function: Callable[..., Any], *names: str) -> bool:
    return set(names) <= set(params(function))


#: (what we use, where, a check that is True while it is there as we use it)
SIGNATURES: list[tuple[str, str, Callable[[], bool]]] = [
    ("waitress.wasyncore.loop(timeout, use_poll, map, count)", "app/server.py",
     lambda: takes(wasyncore.loop, "timeout", "use_poll", "map", "count")),
    ("waitress.wasyncore.dispatcher.close(self)", "app/server.py",
     lambda: params(wasyncore.dispatcher.close) == []),
    ("waitress.wasyncore.close_all(map)", "app/server.py",
     lambda: takes(wasyncore.close_all, "map")),
    ("waitress.channel.HTTPChannel(server, sock, addr, adj, map)", "app/server.py",
     lambda: params(HTTPChannel.__init__)[:5] == ["server", "sock", "addr", "adj", "map"]),
    ("waitress.channel.HTTPChannel.task_class", "app/server.py",
     lambda: issubclass(HTTPChannel.task_class, WSGITask)),
    ("waitress.channel.HTTPChannel.service(self), .writable(self)", "app/server.py",
     lambda: params(HTTPChannel.service) == [] and params(HTTPChannel.writable) == []),
    ("waitress.task.Task(channel, request)", "app/server.py",
     lambda: params(Task.__init__) == ["channel", "request"]),
    ("waitress.task.WSGITask.get_environment(self)", "app/server.py",
     lambda: params(WSGITask.get_environment) == []),
    ("waitress.task.ThreadedTaskDispatcher.add_task(task), .shutdown(timeout=)",
     "app/server.py", lambda: params(ThreadedTaskDispatcher.add_task) == ["task"]
     and takes(ThreadedTaskDispatcher.shutdown, "timeout")),
    ("psycopg.adapt.Transformer.from_context(context), .dump_sequence(params, formats), "
     ".set_pgresult(result), .load_rows(row0, row1, make_row)", "app/stores/postgres.py",
     lambda: takes(psycopg.adapt.Transformer.from_context, "context")
     and takes(psycopg.adapt.Transformer.dump_sequence, "params", "formats")
     and takes(psycopg.adapt.Transformer.set_pgresult, "result")
     and takes(psycopg.adapt.Transformer.load_rows, "row0", "row1", "make_row")),
    ("psycopg.pq.PGconn.send_query_prepared, .prepare, .flush, .is_busy, .consume_input, "
     ".get_result, .socket (public, documented)", "app/stores/postgres.py",
     lambda: not missing(psycopg.pq.PGconn, ["send_query_prepared", "prepare", "flush",
                                             "is_busy", "consume_input", "get_result",
                                             "socket"])),
    ("requests.adapters.HTTPAdapter.get_connection_with_tls_context(request, verify)",
     "loadtest/booths.py", lambda: params(
         requests.adapters.HTTPAdapter.get_connection_with_tls_context)[:2]
     == ["request", "verify"]),
    ("requests.adapters.HTTPAdapter.cert_verify(conn, url, verify, cert)", "loadtest/booths.py",
     lambda: params(requests.adapters.HTTPAdapter.cert_verify)
     == ["conn", "url", "verify", "cert"]),
    ("urllib3.connectionpool.HTTPConnectionPool._new_conn(self)", "loadtest/booths.py",
     lambda: params(urllib3.connectionpool.HTTPConnectionPool._new_conn) == []),
    ("urllib3.connection.HTTPConnection.is_connected (a property)", "loadtest/booths.py",
     lambda: isinstance(inspect.getattr_static(urllib3.connection.HTTPConnection,
                                               "is_connected", None), property)),
    ("urllib3.connection.HTTPConnection.putrequest(method, url, skip_host, "
     "skip_accept_encoding)", "loadtest/booths.py",
     lambda: takes(urllib3.connection.HTTPConnection.putrequest, "method", "url",
                   "skip_host", "skip_accept_encoding")),
    ("urllib3.util.parse_url(url).netloc", "loadtest/booths.py",
     lambda: urllib3.util.parse_url("http://127.0.0.1:8000/buy").netloc == "127.0.0.1:8000"),
    ("urllib3.exceptions.NewConnectionError subclasses ConnectTimeoutError (classified first)",
     "loadtest/booths.py", lambda: issubclass(urllib3.exceptions.NewConnectionError,
                                              urllib3.exceptions.ConnectTimeoutError)),
]


@pytest.mark.parametrize(("name", "user", "check"), SIGNATURES, ids=[s[0] for s in SIGNATURES])
def test_signature_is_as_we_use_it(name: str, user: str, check: Callable[[], bool]) -> None:
    try:
        there = check()
    except AttributeError as exc:
        there, name = False, f"{name} ({exc})"
    assert there, f"{name} is gone or changed; {user} relies on it (see pyproject.toml's pins)"


def missing(obj: object, names: list[str]) -> list[str]:
    return [n for n in names if not hasattr(obj, n)]


@pytest.fixture
def waitress_server() -> Iterator[Any]:
    """A real waitress server on a free loopback port, made with every setting app/server.py
    passes (an unknown one raises), and never started."""
    server = create_server(
        lambda environ, start_response: [], map={}, host="127.0.0.1", port=0, threads=1,
        ident="ticketbooth", connection_limit=10, channel_timeout=5, cleanup_interval=2,
        max_request_body_size=1 << 20, clear_untrusted_proxy_headers=True)
    yield server
    server.task_dispatcher.shutdown(timeout=5)
    server.trigger.close()
    wasyncore.close_all(server._map)


def test_waitress_server_has_what_app_server_uses(waitress_server: Any) -> None:
    gone = missing(waitress_server, ["channel_class", "task_dispatcher", "add_task",
                                     "effective_host", "effective_port", "trigger", "adj"])
    assert not gone, f"waitress's server lost {gone}; app/server.py uses them"
    dispatcher = waitress_server.task_dispatcher
    assert isinstance(dispatcher, ThreadedTaskDispatcher)
    # Server._answering asks the dispatcher how many tasks are queued or running.
    gone = missing(dispatcher, ["lock", "queue", "active_count"])
    assert not gone, f"waitress's task dispatcher lost {gone}; app/server.py uses them"
    with dispatcher.lock:  # a lock, a sized queue and a count, as Server._answering reads them
        assert len(dispatcher.queue) == 0 and isinstance(dispatcher.active_count, int)


def test_waitress_channel_has_what_app_server_uses(waitress_server: Any) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        channel = HTTPChannel(waitress_server, ours, ("127.0.0.1", 0), waitress_server.adj,
                              map={})
        gone = missing(channel, ["requests", "server", "will_close", "close_when_flushed",
                                 "total_outbufs_len", "adj"])
        gone += missing(channel.adj, ["outbuf_high_watermark"])
        channel.del_channel()
    assert not gone, f"waitress's HTTPChannel lost {gone}; app/server.py uses them"


def test_waitress_request_has_what_app_server_uses(waitress_server: Any) -> None:
    request = HTTPRequestParser(waitress_server.adj)
    raw = (b"POST /buy?quantity=2 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: 2\r\n\r\n{}")
    for _ in range(len(raw)):  # the parser takes the head, then the body
        raw = raw[request.received(raw):]
        if request.completed:
            break
    assert request.completed and not raw
    read = {"command": request.command, "path": request.path, "query": request.query,
            "content type": request.headers.get("CONTENT_TYPE"), "error": request.error,
            "body": request.get_body_stream().read()}
    assert read == {"command": "POST", "path": "/buy", "query": "quantity=2",
                    "content type": "application/json", "error": None, "body": b"{}"}, (
        "waitress's parsed request changed; app/server.py hands these to the parking hook")


def test_requests_session_gives_the_pool_a_booth_uses() -> None:
    with requests.Session() as session:
        prepared = session.prepare_request(requests.Request("POST", "http://127.0.0.1:1/buy"))
        adapter = session.get_adapter(prepared.url or "")
        assert isinstance(adapter, requests.adapters.HTTPAdapter)
        pool = adapter.get_connection_with_tls_context(prepared, True)
        assert isinstance(pool, urllib3.connectionpool.HTTPConnectionPool)
        conn = pool._new_conn()
        assert isinstance(conn, urllib3.connection.HTTPConnection)
        assert (prepared.path_url, conn.is_connected) == ("/buy", False)
        conn.close()


@pytest.mark.parametrize(("owner", "names"), [
    (HTTPChannel, ["request", "requests", "requests_lock", "will_close", "close_when_flushed",
                   "total_outbufs_len", "received", "write_soon", "del_channel",
                   "handle_close", "service", "writable"]),
    (HTTPRequestParser, ["header_plus", "body_rcv", "close", "error"]),
    (BaseWSGIServer, ["channel_class", "add_task", "effective_host", "trigger",
                      "task_dispatcher"]),
])
def test_the_waitress_attributes_the_server_uses_are_there(owner: type, names: list[str]) -> None:
    # Instance attributes set in __init__ are looked for in its code.
    code = owner.__init__.__code__.co_names
    missing = [name for name in names if not hasattr(owner, name) and name not in code]
    assert not missing, f"waitress changed: {owner.__name__} has no {missing}"
