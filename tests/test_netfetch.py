"""Tests for netfetch: address checks, the allowlist, pinning, downloads and webhooks.

All traffic goes to 127.0.0.1 or ::1. Other names and addresses only ever pass through a stubbed
resolver; an autouse guard fails the test if anything connects elsewhere or asks real DNS.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import urllib3
from conftest import free_port
from hypothesis import given
from hypothesis import strategies as st

import netfetch
from netfetch import FetchError, check_url, classify_address, download, parse_allowlist, post_json

HOST = "media.example.test"
LOOPBACK = ("127.0.0.1", "::1")


# --- guards and stubs -----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Fail on any connection to a non-loopback address and on any real DNS lookup."""
    attempts: list[object] = []
    real_connect = socket.socket.connect
    real_getaddrinfo = socket.getaddrinfo

    def guarded_connect(self: socket.socket, address: object) -> None:
        attempts.append(address)
        host = address[0] if isinstance(address, tuple) else address
        if host not in LOOPBACK:
            raise AssertionError(f"test tried to connect to {address!r}")
        return real_connect(self, address)

    def guarded_getaddrinfo(host: object, *args: object, **kwargs: object) -> object:
        try:
            ipaddress.ip_address(host if isinstance(host, str) else "")
        except ValueError:
            raise AssertionError(f"real DNS lookup of {host!r}") from None
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    return attempts


@pytest.fixture
def no_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection at all fails the test (refusals must happen before connecting)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"unexpected connection: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib3.util.connection, "create_connection", refuse)


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """A stub resolver: tests put name -> addresses in the returned dict; lookups are counted
    under the key ("calls", name)."""
    table: dict = {}

    def fake_resolve(host: str, port: int) -> list[str]:
        table[("calls", host)] = table.get(("calls", host), 0) + 1
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        answer = table[host]
        return list(answer() if callable(answer) else answer)

    monkeypatch.setattr(netfetch, "resolve", fake_resolve)
    return table


# --- a loopback HTTP server -----------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []

    def paths(self) -> list[str]:
        return [path for _method, path, _headers, _body in self.requests]


def make_handler(rec: Recorder) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _record(self, body: bytes = b"") -> tuple[str, dict[str, list[str]]]:
            self.close_connection = True
            rec.requests.append((self.command, self.path, dict(self.headers.items()), body))
            parts = urlsplit(self.path)
            return parts.path, parse_qs(parts.query)

        def do_GET(self) -> None:
            path, query = self._record()
            size = int(query.get("size", ["1000"])[0])
            try:
                self._route(path, query, size)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                pass

        def _route(self, path: str, query: dict[str, list[str]], size: int) -> None:
            if path == "/file":
                self._send(200, b"x" * size, {"Content-Type": "image/png; charset=binary"})
            elif path == "/redirect":
                status = int(query.get("status", ["302"])[0])
                self._send(status, b"", {"Location": query["to"][0]})
            elif path == "/nolocation":
                self._send(302)
            elif path == "/chain":
                n = int(query["n"][0])
                if n == 0:
                    self._send(200, b"end", {"Content-Type": "text/plain"})
                else:
                    self._send(301, b"", {"Location": f"chain?n={n - 1}"})
            elif path == "/loop":
                self._send(302, b"", {"Location": "/loop"})
            elif path == "/big":
                self.send_response(200)
                self.send_header("Content-Length", str(10**9))
                self.end_headers()
            elif path == "/nolength":
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"y" * size)
            elif path == "/chunked":
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for start in range(0, size, 700):
                    piece = b"z" * min(700, size - start)
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")
            elif path == "/slow":
                time.sleep(float(query.get("delay", ["3"])[0]))
                self._send(200, b"late")
            elif path == "/drip-headers":
                self._drip_headers()
            elif path == "/drip":
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                for _ in range(200):
                    self.wfile.write(b"d" * 10)
                    self.wfile.flush()
                    time.sleep(0.05)
            else:
                self._send(404, b"not here")

        def _drip_headers(self) -> None:
            # one header byte every 0.1 s, for 6 s: each read gets data long before a read timeout
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            for _ in range(60):
                self.wfile.write(b"X")
                self.wfile.flush()
                time.sleep(0.1)
            self.wfile.write(b": y\r\nContent-Length: 0\r\n\r\n")

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            path, query = self._record(body)
            try:
                self._route_post(path, query)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _route_post(self, path: str, query: dict[str, list[str]]) -> None:
            if path == "/hook":
                self._send(204)
            elif path == "/hook-redirect":
                self._send(int(query.get("status", ["307"])[0]), b"", {"Location": "/hook"})
            elif path == "/slow":
                time.sleep(3)
                self._send(200)
            elif path == "/drip-headers":
                self._drip_headers()
            else:
                self._send(500, b"oops")

    return Handler


class V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _serve(server: ThreadingHTTPServer) -> Iterator[ThreadingHTTPServer]:
    server.daemon_threads = True
    server.block_on_close = False
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def server(rec: Recorder) -> Iterator[ThreadingHTTPServer]:
    yield from _serve(ThreadingHTTPServer(("127.0.0.1", 0), make_handler(rec)))


@pytest.fixture
def port(server: ThreadingHTTPServer) -> int:
    return server.server_address[1]


@pytest.fixture
def media(dns: dict, port: int) -> str:
    """Base URL of the loopback server under the fake name HOST (allowed by name)."""
    dns[HOST] = ["127.0.0.1"]
    return f"http://{HOST}:{port}"


ALLOW = [HOST]


# --- the address classifier -----------------------------------------------------------------------

PRIVATE = "a private or loopback address"
REFUSED = [
    ("127.0.0.1", PRIVATE),
    ("127.255.255.254", PRIVATE),
    ("10.0.0.1", PRIVATE),
    ("10.255.255.255", PRIVATE),
    ("172.16.0.1", PRIVATE),
    ("172.31.255.254", PRIVATE),
    ("192.168.1.1", PRIVATE),
    ("169.254.169.254", "link-local"),
    ("169.254.1.1", "link-local"),
    ("100.64.0.1", "carrier-grade NAT"),
    ("100.127.255.254", "carrier-grade NAT"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("240.0.0.1", "reserved"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "reserved"),
    ("255.255.255.255", "broadcast"),
    ("198.18.0.1", "reserved"),
    ("192.0.2.1", "non-public"),
    ("::1", PRIVATE),
    ("::", "unspecified"),
    ("fc00::1", PRIVATE),
    ("fd12:3456:789a::1", PRIVATE),
    ("fe80::1", "link-local"),
    ("fe80::1%2", "link-local"),
    ("fec0::1", PRIVATE),
    ("ff02::1", "multicast"),
    ("ff0e::1", "multicast"),
    ("::ffff:127.0.0.1", PRIVATE),
    ("::ffff:10.1.2.3", PRIVATE),
    ("::ffff:169.254.169.254", "link-local"),
    ("::ffff:0.0.0.0", "unspecified"),
    ("::127.0.0.1", "reserved"),  # deprecated IPv4-compatible
    ("::ffff:0:808:808", "reserved"),  # IPv4-translated (RFC 2765) of a public address
    ("::ffff:0:7f00:1", "reserved"),  # IPv4-translated of 127.0.0.1
    ("2002:7f00:1::1", PRIVATE),  # 6to4 of 127.0.0.1
    ("2002:a00:1::1", PRIVATE),  # 6to4 of 10.0.0.1
    ("2002:a9fe:a9fe::", "link-local"),  # 6to4 of 169.254.169.254
    ("64:ff9b::a00:1", PRIVATE),  # NAT64 of 10.0.0.1
    ("64:ff9b::7f00:1", PRIVATE),  # NAT64 of 127.0.0.1
    ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
    ("64:ff9b:1::a00:1", PRIVATE),  # local-use NAT64
    ("2001:db8::1", "reserved"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "reserved"),  # Teredo
]


@pytest.mark.parametrize(("address", "reason"), REFUSED)
def test_classify_refuses(address: str, reason: str) -> None:
    result = classify_address(address)
    assert result is not None and reason in result


@pytest.mark.parametrize(
    "address", ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8", "2002:808:808::1"]
)
def test_classify_passes_public(address: str) -> None:
    assert classify_address(address) is None


@pytest.mark.parametrize(("address", "reason"), REFUSED)
def test_download_refuses_each_range_before_connecting(
    address: str, reason: str, dns: dict, no_connect: None, tmp_path: Path
) -> None:
    dns["evil.example.test"] = [address]
    dest = tmp_path / "in.bin"
    with pytest.raises(FetchError) as err:
        download("http://evil.example.test/x.png", dest, field="image_url", max_bytes=1000, allowlist=[])
    message = str(err.value)
    assert message.startswith("image_url: host resolves to ")
    assert reason in message and message.endswith("(refused; see URL_ALLOWLIST)")
    assert address.split("%")[0] not in message
    assert not dest.exists()


@pytest.mark.parametrize(("address", "reason"), REFUSED)
def test_post_json_refuses_each_range_before_connecting(
    address: str, reason: str, dns: dict, no_connect: None
) -> None:
    dns["hooks.example.test"] = [address]
    with pytest.raises(FetchError) as err:
        post_json("https://hooks.example.test/h", b"{}", {}, allowlist=[])
    assert str(err.value).startswith("notify_url: host resolves to ")
    assert reason in str(err.value)


def test_refusal_message_exact(dns: dict, no_connect: None) -> None:
    dns["db.internal.test"] = ["10.0.0.7"]
    with pytest.raises(FetchError) as err:
        check_url("http://db.internal.test/", [], field="image_url")
    assert str(err.value) == (
        "image_url: host resolves to a private or loopback address (refused; see URL_ALLOWLIST)"
    )


def test_any_resolved_address_private_refuses(dns: dict, no_connect: None) -> None:
    dns["mixed.example.test"] = ["93.184.216.34", "10.0.0.1"]
    with pytest.raises(FetchError, match="private or loopback"):
        check_url("http://mixed.example.test/", [], field="audio_url")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::ffff:7f00:1]:8080/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1%25eth0]/",
    ],
)
def test_ip_literals_refused(url: str, dns: dict, no_connect: None) -> None:
    with pytest.raises(FetchError, match=r"^audio_url: host is .* \(refused; see URL_ALLOWLIST\)$"):
        check_url(url, [], field="audio_url")
    assert not [k for k in dns if isinstance(k, tuple)]  # IP literals are not looked up


# Hypothesis: the classifier as a whole.

v4_in = st.integers(min_value=0, max_value=2**32 - 1)


def _in(network: str) -> st.SearchStrategy[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    net = ipaddress.ip_network(network)
    return st.integers(0, net.num_addresses - 1).map(lambda n: net[n])


@given(_in("10.0.0.0/8") | _in("172.16.0.0/12") | _in("192.168.0.0/16") | _in("127.0.0.0/8"))
def test_prop_private_v4_refused(ip: ipaddress.IPv4Address) -> None:
    assert classify_address(ip) == PRIVATE
    assert classify_address(str(ip)) == PRIVATE


@given(_in("169.254.0.0/16") | _in("fe80::/10"))
def test_prop_link_local_refused(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    assert "link-local" in (classify_address(ip) or "")


@given(_in("100.64.0.0/10"))
def test_prop_cgnat_refused(ip: ipaddress.IPv4Address) -> None:
    assert "carrier-grade" in (classify_address(ip) or "")


@given(_in("fc00::/7") | _in("::1/128"))
def test_prop_private_v6_refused(ip: ipaddress.IPv6Address) -> None:
    assert classify_address(ip) == PRIVATE


@given(_in("ff00::/8") | _in("224.0.0.0/4"))
def test_prop_multicast_refused(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    assert classify_address(ip) == "a multicast address"


def _embeddings(v4: ipaddress.IPv4Address) -> list[ipaddress.IPv6Address]:
    n = int(v4)
    return [
        ipaddress.IPv6Address((0xFFFF << 32) | n),  # ::ffff:a.b.c.d
        ipaddress.IPv6Address((0x2002 << 112) | (n << 80) | 1),  # 6to4
        ipaddress.IPv6Address((0x64FF9B << 96) | n),  # NAT64
    ]


@given(v4_in.map(ipaddress.IPv4Address))
def test_prop_embedded_v4_classified_like_v4(v4: ipaddress.IPv4Address) -> None:
    for v6 in _embeddings(v4):
        assert classify_address(v6) == classify_address(v4)


@given(v4_in.map(ipaddress.IPv4Address).filter(lambda ip: ip.is_global and not ip.is_multicast))
def test_prop_public_v4_passes(ip: ipaddress.IPv4Address) -> None:
    assert classify_address(ip) is None
    for v6 in _embeddings(ip):
        assert classify_address(v6) is None


_EMBEDDING_V6 = [ipaddress.ip_network(n) for n in ("::ffff:0:0/96", "2002::/16", "64:ff9b::/96")]
# Refused by netfetch although some Python versions call them global: local-use NAT64,
# deprecated site-local and deprecated IPv4-compatible addresses.
_STRICTER_V6 = [ipaddress.ip_network(n) for n in ("64:ff9b:1::/48", "fec0::/10", "::/96", "::ffff:0:0:0/96")]


@given(
    st.ip_addresses(v=6).filter(
        lambda ip: (
            ip.is_global and not ip.is_multicast and not any(ip in n for n in _EMBEDDING_V6 + _STRICTER_V6)
        )
    )
)
def test_prop_public_v6_passes(ip: ipaddress.IPv6Address) -> None:
    assert classify_address(ip) is None


@given(st.ip_addresses())
def test_prop_nothing_non_global_passes(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    result = classify_address(ip)
    if result is None:
        if isinstance(ip, ipaddress.IPv6Address) and any(ip in n for n in _EMBEDDING_V6):
            inner = netfetch._embedded_ipv4(ip)
            assert inner is not None and inner.is_global
        else:
            assert ip.is_global and not ip.is_multicast


# --- URL syntax and the allowlist -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("file:///etc/passwd", "only http and https"),
        ("ftp://media.example.test/a", "only http and https"),
        ("gopher://media.example.test:70/", "only http and https"),
        ("javascript:alert(1)", "only http and https"),
        ("http://user:hunter2@media.example.test/a", "user name or password"),
        ("http://media.example.test@127.0.0.1/a", "user name or password"),
        ("http://media.example.test\\@127.0.0.1/a", "backslashes"),
        ("http://media.example.test /a", "spaces"),
        ("http:///path", "no host"),
        ("http://media.example.test:99999/", "port"),
        ("http://media.example.test:0/", "port"),
        ("http://2130706433/", "not a valid hostname or IP"),
        ("http://127.1/", "not a valid hostname or IP"),
        ("http://0x7f.0.0.1/", "not a valid hostname or IP"),
        ("http://exa_mple!.test/", "not a valid hostname"),
        ("", "required"),
    ],
)
def test_bad_urls_refused(url: str, fragment: str, dns: dict, no_connect: None) -> None:
    with pytest.raises(FetchError) as err:
        check_url(url, [HOST, "127.0.0.0/8"], field="image_url")
    assert fragment in str(err.value)
    assert str(err.value).startswith("image_url: ")
    assert "hunter2" not in str(err.value)


def test_unknown_host(dns: dict, no_connect: None) -> None:
    with pytest.raises(FetchError, match="^image_url: cannot resolve host nowhere.example.test$"):
        check_url("http://nowhere.example.test/", [], field="image_url")


def test_real_resolve_of_literal() -> None:
    assert netfetch.resolve("127.0.0.1", 80) == ["127.0.0.1"]


def test_parse_allowlist() -> None:
    entries = parse_allowlist(
        ["minio", "MinIO:9000", "127.0.0.1:9000", "[::1]:9000", "127.0.0.0/8", "::1/128"]
    )
    assert entries[0] == netfetch.AllowEntry("minio", None, None)
    assert entries[1] == netfetch.AllowEntry("minio", None, 9000)
    assert entries[2] == netfetch.AllowEntry(None, ipaddress.ip_network("127.0.0.1/32"), 9000)
    assert entries[3] == netfetch.AllowEntry(None, ipaddress.ip_network("::1/128"), 9000)
    assert entries[4].network == ipaddress.ip_network("127.0.0.0/8")
    assert entries[5].network == ipaddress.ip_network("::1/128")
    for bad in ["10.0.0.0/33", "minio:abc", "minio:70000", "bad host"]:
        with pytest.raises(ValueError, match="URL_ALLOWLIST"):
            parse_allowlist([bad])


def test_allowlist_by_name_allows_that_host_only(dns: dict, no_connect: None) -> None:
    dns["minio"] = ["172.18.0.5"]
    dns["other"] = ["172.18.0.5"]
    check_url("http://minio:9000/bucket/a.png", ["minio"], field="image_url")
    with pytest.raises(FetchError, match="private or loopback"):
        check_url("http://other:9000/bucket/a.png", ["minio"], field="image_url")
    with pytest.raises(FetchError, match="private or loopback"):
        check_url("http://172.18.0.5:9000/bucket/a.png", ["minio"], field="image_url")


def test_allowlist_host_port(dns: dict, no_connect: None) -> None:
    dns["minio"] = ["172.18.0.5"]
    check_url("http://minio:9000/a", ["minio:9000"])
    with pytest.raises(FetchError):
        check_url("http://minio:9001/a", ["minio:9000"])
    check_url("http://127.0.0.1:9000/a", ["127.0.0.1:9000"])
    with pytest.raises(FetchError):
        check_url("http://127.0.0.1:9001/a", ["127.0.0.1:9000"])


def test_allowlist_cidr(dns: dict, no_connect: None) -> None:
    dns["local.example.test"] = ["127.0.0.5"]
    check_url("http://local.example.test/a", ["127.0.0.0/8"])
    check_url("http://127.0.0.5/a", ["127.0.0.0/8"])
    check_url("http://[::ffff:127.0.0.5]/a", ["127.0.0.0/8"])
    check_url("http://[::1]:8080/a", ["::1/128"])
    with pytest.raises(FetchError):
        check_url("http://[::1]:8080/a", ["127.0.0.0/8"])
    with pytest.raises(FetchError):
        check_url("http://10.0.0.1/a", ["127.0.0.0/8"])


# --- real downloads from the loopback server ------------------------------------------------------


def test_download_allowed_host(media: str, rec: Recorder, tmp_path: Path, port: int, dns: dict) -> None:
    dest = tmp_path / "a.png"
    info = download(
        f"{media}/file?size=1234&sig=secret", dest, field="image_url", max_bytes=10_000, allowlist=ALLOW
    )
    assert info == netfetch.DownloadInfo(dest, 1234, "image/png", f"{media}/file?size=1234&sig=secret")
    assert dest.read_bytes() == b"x" * 1234
    method, path, headers, _ = rec.requests[0]
    assert (method, path) == ("GET", "/file?size=1234&sig=secret")
    assert headers["Host"] == f"{HOST}:{port}"
    assert dns[("calls", HOST)] == 1


def test_download_pins_the_checked_address(
    media: str, dns: dict, tmp_path: Path, loopback_only: list[object]
) -> None:
    answers = iter([["127.0.0.1"], ["10.0.0.1"], ["10.0.0.1"]])  # a rebinding DNS server
    dns[HOST] = lambda: next(answers)
    info = download(f"{media}/file", tmp_path / "a", field="image_url", max_bytes=10_000, allowlist=ALLOW)
    assert info.bytes == 1000
    assert dns[("calls", HOST)] == 1
    assert [a[0] for a in loopback_only] == ["127.0.0.1"]  # type: ignore[index]


def test_download_tries_next_address_when_connect_fails(
    media: str, dns: dict, tmp_path: Path, loopback_only: list[object]
) -> None:
    dns[HOST] = ["::1", "127.0.0.1"]  # nothing listens on ::1 at this port
    info = download(f"{media}/file", tmp_path / "a", field="image_url", max_bytes=10_000, allowlist=ALLOW)
    assert info.bytes == 1000
    assert [a[0] for a in loopback_only] == ["::1", "127.0.0.1"]  # type: ignore[index]


def test_download_ipv6_literal(rec: Recorder, tmp_path: Path) -> None:
    try:
        srv = V6Server(("::1", 0), make_handler(rec))
    except OSError:
        pytest.skip("no IPv6 loopback")
    for s in _serve(srv):
        port = s.server_address[1]
        url = f"http://[::1]:{port}/file?size=10"
        info = download(url, tmp_path / "a", field="image_url", max_bytes=100, allowlist=["::1/128"])
        assert info.bytes == 10
        assert rec.requests[0][2]["Host"] == f"[::1]:{port}"


def test_download_chunked_and_no_length(media: str, tmp_path: Path) -> None:
    a = download(f"{media}/chunked?size=5000", tmp_path / "a", field="f", max_bytes=5000, allowlist=ALLOW)
    b = download(f"{media}/nolength?size=3000", tmp_path / "b", field="f", max_bytes=5000, allowlist=ALLOW)
    assert (a.bytes, b.bytes) == (5000, 3000)
    assert (tmp_path / "a").read_bytes() == b"z" * 5000


def test_404_names_host_and_status(media: str, tmp_path: Path) -> None:
    dest = tmp_path / "a"
    with pytest.raises(FetchError) as err:
        download(f"{media}/nope?token=secret", dest, field="audio_url", max_bytes=100, allowlist=ALLOW)
    assert str(err.value) == f"audio_url: download failed: {HOST} answered HTTP 404"
    assert not dest.exists()


@pytest.mark.parametrize("path", ["/big", "/file?size=1001", "/nolength?size=5000", "/chunked?size=5000"])
def test_size_cap(path: str, media: str, tmp_path: Path) -> None:
    dest = tmp_path / "a"
    with pytest.raises(FetchError) as err:
        download(f"{media}{path}", dest, field="image_url", max_bytes=1000, allowlist=ALLOW)
    assert str(err.value) == "image_url: file too large (over 1000 bytes)"
    assert not dest.exists()


def test_size_cap_message_in_mib(media: str, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"^image_url: file too large \(over 200 MiB\)$"):
        download(f"{media}/big", tmp_path / "a", field="image_url", max_bytes=200 * 2**20, allowlist=ALLOW)


def test_exact_size_allowed(media: str, tmp_path: Path) -> None:
    info = download(f"{media}/nolength?size=1000", tmp_path / "a", field="f", max_bytes=1000, allowlist=ALLOW)
    assert info.bytes == 1000


def test_read_timeout(media: str, tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(FetchError, match=r"^audio_url: download failed: .*timed out"):
        download(
            f"{media}/slow?delay=3",
            tmp_path / "a",
            field="audio_url",
            max_bytes=100,
            allowlist=ALLOW,
            read_timeout=0.3,
        )
    assert time.monotonic() - start < 2


def test_total_deadline_with_dripping_server(media: str, tmp_path: Path) -> None:
    dest = tmp_path / "a"
    start = time.monotonic()
    with pytest.raises(FetchError) as err:
        download(
            f"{media}/drip",
            dest,
            field="audio_url",
            max_bytes=10**6,
            allowlist=ALLOW,
            read_timeout=5,
            total_timeout=0.5,
        )
    assert str(err.value) == "audio_url: timed out after 0.5 s"
    assert time.monotonic() - start < 1.5
    assert not dest.exists()


def test_total_deadline_while_waiting_for_headers(media: str, tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(FetchError, match=r"^audio_url: timed out after 0.4 s$"):
        download(
            f"{media}/slow?delay=3",
            tmp_path / "a",
            field="audio_url",
            max_bytes=100,
            allowlist=ALLOW,
            total_timeout=0.4,
        )
    assert time.monotonic() - start < 1.5


def test_connection_refused(dns: dict, tmp_path: Path) -> None:
    dns[HOST] = ["127.0.0.1"]
    with pytest.raises(FetchError, match=f"^image_url: download failed: could not connect to {HOST}$"):
        download(
            f"http://{HOST}:{free_port()}/a",
            tmp_path / "a",
            field="image_url",
            max_bytes=10,
            allowlist=ALLOW,
        )


# --- redirects ------------------------------------------------------------------------------------


def test_relative_redirects_followed(media: str, tmp_path: Path, rec: Recorder) -> None:
    info = download(f"{media}/chain?n=5", tmp_path / "a", field="f", max_bytes=100, allowlist=ALLOW)
    assert info.final_url == f"{media}/chain?n=0"
    assert (tmp_path / "a").read_bytes() == b"end"
    assert info.content_type == "text/plain"
    assert len(rec.requests) == 6


def test_redirect_limit(media: str, tmp_path: Path, rec: Recorder) -> None:
    dest = tmp_path / "a"
    with pytest.raises(FetchError, match="too many redirects"):
        download(f"{media}/chain?n=6", dest, field="f", max_bytes=100, allowlist=ALLOW)
    with pytest.raises(FetchError, match=r"^image_url: download failed: too many redirects"):
        download(f"{media}/loop", dest, field="image_url", max_bytes=100, allowlist=ALLOW, max_redirects=2)
    assert not dest.exists()


def test_redirect_to_loopback_ip_refused(media: str, port: int, tmp_path: Path, rec: Recorder) -> None:
    # HOST is allowed by name and resolves to 127.0.0.1; that does not allow 127.0.0.1 itself.
    target = f"http://127.0.0.1:{port}/file"
    with pytest.raises(FetchError) as err:
        download(
            f"{media}/redirect?to={target}",
            tmp_path / "a",
            field="image_url",
            max_bytes=10_000,
            allowlist=ALLOW,
        )
    assert str(err.value) == "image_url: host is a private or loopback address (refused; see URL_ALLOWLIST)"
    assert rec.paths() == [f"/redirect?to={target}"]


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_to_name_resolving_to_metadata_refused(
    status: int, media: str, dns: dict, tmp_path: Path, loopback_only: list[object]
) -> None:
    dns["metadata.example.test"] = ["169.254.169.254"]
    url = f"{media}/redirect?status={status}&to=http://metadata.example.test/latest/meta-data/"
    with pytest.raises(FetchError, match="^audio_url: host resolves to a link-local address"):
        download(url, tmp_path / "a", field="audio_url", max_bytes=10_000, allowlist=ALLOW)
    assert [a[0] for a in loopback_only] == ["127.0.0.1"]  # type: ignore[index]


def test_redirect_to_other_scheme_refused(media: str, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="only http and https"):
        download(
            f"{media}/redirect?to=file:///etc/passwd",
            tmp_path / "a",
            field="f",
            max_bytes=10,
            allowlist=ALLOW,
        )


def test_redirect_without_location(media: str, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=f"{HOST} answered HTTP 302 without a Location"):
        download(f"{media}/nolocation", tmp_path / "a", field="f", max_bytes=10, allowlist=ALLOW)


# --- webhooks -------------------------------------------------------------------------------------


def test_post_json(media: str, rec: Recorder, port: int) -> None:
    status = post_json(f"{media}/hook", b'{"ok": true}', {"X-Signature": "abc"}, allowlist=ALLOW)
    assert status == 204
    method, path, headers, body = rec.requests[0]
    assert (method, path, body) == ("POST", "/hook", b'{"ok": true}')
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Signature"] == "abc"
    assert headers["Host"] == f"{HOST}:{port}"


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_post_json_does_not_follow_redirects(status: int, media: str, rec: Recorder) -> None:
    assert post_json(f"{media}/hook-redirect?status={status}", b"{}", {}, allowlist=ALLOW) == status
    assert rec.paths() == [f"/hook-redirect?status={status}"]


def test_post_json_error_status_returned(media: str) -> None:
    assert post_json(f"{media}/other", b"{}", {}, allowlist=ALLOW) == 500


def test_post_json_timeout(media: str) -> None:
    with pytest.raises(FetchError, match=f"^notify_url: delivery failed: {HOST} timed out"):
        post_json(f"{media}/slow", b"{}", {}, allowlist=ALLOW, timeout=0.3)


def test_post_json_total_deadline_with_header_dripping_receiver(media: str) -> None:
    """A receiver that sends a header byte every 0.1 s never trips a per-read timeout; the total
    deadline still ends the attempt (the old code waited the full 6 s of dripping)."""
    start = time.monotonic()
    with pytest.raises(FetchError, match=f"^notify_url: delivery failed: {HOST} timed out"):
        post_json(f"{media}/drip-headers", b"{}", {}, allowlist=ALLOW, timeout=0.5)
    assert time.monotonic() - start < 1.5


def test_download_total_deadline_with_header_dripping_server(media: str, tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(FetchError, match=r"^audio_url: timed out after 0.5 s$"):
        download(f"{media}/drip-headers", tmp_path / "a", field="audio_url", max_bytes=100,
                 allowlist=ALLOW, read_timeout=5, total_timeout=0.5)
    assert time.monotonic() - start < 1.5


def test_post_json_refuses_name_resolving_to_ipv4_translated(dns: dict, no_connect: None) -> None:
    dns["hooks.example"] = ["::ffff:0:808:808"]  # stub resolver: nothing is ever sent there
    with pytest.raises(FetchError, match="notify_url: host resolves to a reserved address"):
        post_json("https://hooks.example/hook", b"{}", {}, allowlist=[])


def test_post_json_connection_refused(dns: dict) -> None:
    dns[HOST] = ["127.0.0.1"]
    with pytest.raises(FetchError, match=f"^notify_url: delivery failed: could not connect to {HOST}$"):
        post_json(f"http://{HOST}:{free_port()}/hook", b"{}", {}, allowlist=ALLOW)


# --- https pinning --------------------------------------------------------------------------------


def test_https_pool_connects_to_ip_with_hostname_for_sni_and_verification() -> None:
    adapter = netfetch.pinned_adapter("https", HOST)
    request = requests.Request("GET", "https://203.0.113.7:443/a.png", headers={"Host": HOST}).prepare()
    pool = adapter.get_connection_with_tls_context(request, verify=True)
    assert isinstance(pool, urllib3.HTTPSConnectionPool)
    assert (pool.host, pool.port) == ("203.0.113.7", 443)
    assert pool.conn_kw["server_hostname"] == HOST
    assert pool.cert_reqs == "CERT_REQUIRED"
    conn = pool._new_conn()  # not connected yet
    assert (conn.host, conn.server_hostname) == ("203.0.113.7", HOST)
    assert conn.assert_hostname is None  # so the ssl module itself checks the name in the handshake


def test_http_pool_has_no_tls_arguments() -> None:
    adapter = netfetch.pinned_adapter("http", HOST)
    request = requests.Request("GET", "http://203.0.113.7:80/a.png").prepare()
    pool = adapter.get_connection_with_tls_context(request, verify=True)
    assert isinstance(pool, urllib3.HTTPConnectionPool) and not isinstance(pool, urllib3.HTTPSConnectionPool)
    assert "server_hostname" not in pool.conn_kw


def _make_certs(tmp_path: Path, name: str) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for `name`: (ca.pem, cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "netfetch test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = (tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


@pytest.fixture
def tls_server(
    request: pytest.FixtureRequest, tmp_path: Path, rec: Recorder, monkeypatch: pytest.MonkeyPatch
):
    """An https server on 127.0.0.1 whose certificate names `request.param`; yields (port, SNI seen)."""
    pytest.importorskip("cryptography")
    ca, cert, key = _make_certs(tmp_path, request.param)
    monkeypatch.setattr(netfetch, "CA_BUNDLE", str(ca))
    sni: list[str | None] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda _sock, name, _ctx: sni.append(name)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(rec))
    srv.socket = context.wrap_socket(srv.socket, server_side=True)
    for s in _serve(srv):
        yield s.server_address[1], sni


@pytest.mark.parametrize("tls_server", [HOST], indirect=True)
def test_https_pinned_to_loopback_verifies_hostname(
    tls_server, dns: dict, tmp_path: Path, rec: Recorder
) -> None:
    port, sni = tls_server
    dns[HOST] = ["127.0.0.1"]
    info = download(
        f"https://{HOST}:{port}/file?size=50",
        tmp_path / "a",
        field="image_url",
        max_bytes=100,
        allowlist=ALLOW,
    )
    assert info.bytes == 50
    assert sni == [HOST]
    assert rec.requests[0][2]["Host"] == f"{HOST}:{port}"


@pytest.mark.parametrize("tls_server", ["other.example.test"], indirect=True)
def test_https_certificate_for_another_name_refused(
    tls_server, dns: dict, tmp_path: Path, rec: Recorder
) -> None:
    port, sni = tls_server
    dns[HOST] = ["127.0.0.1"]
    with pytest.raises(FetchError, match=f"^image_url: download failed: TLS with {HOST} failed"):
        download(
            f"https://{HOST}:{port}/file", tmp_path / "a", field="image_url", max_bytes=100, allowlist=ALLOW
        )
    assert rec.requests == []
