"""Outbound HTTP: every input download and every webhook delivery goes through this module.

It owns the rules for talking to URLs that strangers send (image_url, audio_url,
reference_audio_url, notify_url):

* only http and https, no userinfo, a plain hostname or IP literal;
* the host is resolved once (`resolve`), and every address it resolves to must be public
  (`classify_address`) unless URL_ALLOWLIST allows it (`parse_allowlist`);
* the connection then goes to the address that was checked ("pinning"): the request URL names
  the IP, the Host header names the host, and for https the TLS layer sends the hostname as SNI
  and verifies the certificate against it (urllib3's ``server_hostname`` pool argument), so a
  second DNS answer can never change where the bytes go;
* downloads follow redirects here, one hop at a time, each hop checked the same way, with a
  size cap, per-read timeouts and a total deadline; webhooks never follow redirects;
* the total deadline covers connect, TLS, headers and body together: every socket a request opens
  is watched by one reaper thread (`_watch_sockets`) that shuts it down when the deadline passes,
  so a server that drips one header byte at a time cannot outlast it (per-read timeouts alone
  restart on every byte).

Error messages (`FetchError`) name the field, the host and the HTTP status, never the resolved
address, credentials or query strings, so they can be shown to the client as they are.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import re
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from requests.adapters import DEFAULT_POOLBLOCK, DEFAULT_POOLSIZE, HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

import config

USER_AGENT = f"c3-render/{config.VERSION}"
CHUNK_BYTES = 64 * 1024
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# What to verify https certificates against: None = requests' default bundle (certifi),
# or the path of a CA bundle (tests point this at their own CA).
CA_BUNDLE: str | None = None

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_PRIVATE = "a private or loopback address"
_LINK_LOCAL = "a link-local address (such as cloud metadata)"
_SHARED = "a shared (carrier-grade NAT) address"
_MULTICAST = "a multicast address"
_RESERVED = "a reserved address"
_UNSPECIFIED = "an unspecified address"
_BROADCAST = "a broadcast address"
_NOT_PUBLIC = "a non-public address"

# Checked in order; the first match names the reason. Anything not listed that Python does not
# consider globally reachable is refused too (_NOT_PUBLIC).
_V4_RULES: tuple[tuple[ipaddress.IPv4Network, str], ...] = tuple(
    (ipaddress.IPv4Network(net), reason)
    for net, reason in (
        ("255.255.255.255/32", _BROADCAST),
        ("0.0.0.0/32", _UNSPECIFIED),
        ("0.0.0.0/8", _RESERVED),
        ("127.0.0.0/8", _PRIVATE),
        ("10.0.0.0/8", _PRIVATE),
        ("172.16.0.0/12", _PRIVATE),
        ("192.168.0.0/16", _PRIVATE),
        ("169.254.0.0/16", _LINK_LOCAL),
        ("100.64.0.0/10", _SHARED),
        ("224.0.0.0/4", _MULTICAST),
        ("240.0.0.0/4", _RESERVED),
        ("198.18.0.0/15", _RESERVED),
    )
)
_V6_RULES: tuple[tuple[ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.IPv6Network(net), reason)
    for net, reason in (
        ("::/128", _UNSPECIFIED),
        ("::1/128", _PRIVATE),
        ("fc00::/7", _PRIVATE),
        ("fe80::/10", _LINK_LOCAL),
        ("fec0::/10", _PRIVATE),  # deprecated site-local
        ("ff00::/8", _MULTICAST),
        ("::/96", _RESERVED),  # deprecated IPv4-compatible
        ("::ffff:0:0:0/96", _RESERVED),  # IPv4-translated (RFC 2765 SIIT); Python calls it global
        ("64:ff9b:1::/48", _PRIVATE),  # local-use NAT64
        ("2001::/32", _RESERVED),  # Teredo
        ("2001:db8::/32", _RESERVED),  # documentation
        ("100::/64", _RESERVED),  # discard-only
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_HOST_RE = re.compile(r"^(?=.{1,253}$)[a-z0-9_](?:[a-z0-9_-]{0,62})(?:\.[a-z0-9_](?:[a-z0-9_-]{0,62}))*$")
_NUMERIC_LABEL_RE = re.compile(r"^(?:[0-9]+|0x[0-9a-f]*)$")


class FetchError(Exception):
    """A URL was refused or could not be fetched; str() is a message fit for the client."""


@dataclass(frozen=True)
class DownloadInfo:
    path: Path
    bytes: int
    content_type: str
    final_url: str


@dataclass(frozen=True)
class AllowEntry:
    """One URL_ALLOWLIST entry: a hostname or a network, optionally limited to one port."""

    name: str | None
    network: IPNetwork | None
    port: int | None


@dataclass(frozen=True)
class _Target:
    """A URL that passed the checks, with the addresses it may be fetched from."""

    scheme: str
    host: str  # lowercase ASCII hostname, or IP literal without brackets
    port: int
    path: str  # path and query, as sent in the request line
    addresses: tuple[str, ...]
    is_ip_literal: bool

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    def url_for(self, address: str) -> str:
        netloc = f"[{address}]" if ":" in address else address
        return f"{self.scheme}://{netloc}:{self.port}{self.path}"


# --- addresses and the allowlist -------------------------------------------------------------


def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, in getaddrinfo's order (tests replace this function)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside an IPv4-mapped, 6to4 or NAT64 (64:ff9b::/96) address."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def classify_address(address: str | IPAddress) -> str | None:
    """Why `address` may not be fetched from (e.g. "a private or loopback address"), or None."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            ip = ipaddress.IPv6Address(str(ip).split("%", 1)[0])
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            return classify_address(embedded)
        for network, reason in _V6_RULES:
            if ip in network:
                return reason
    else:
        for network, reason in _V4_RULES:
            if ip in network:
                return reason
    if ip.is_multicast:
        return _MULTICAST
    if not ip.is_global:
        return _NOT_PUBLIC
    return None


def parse_allowlist(entries: Sequence[str]) -> tuple[AllowEntry, ...]:
    """Parse URL_ALLOWLIST entries: "minio", "minio:9000", "127.0.0.1:9000", "[::1]:9000",
    "127.0.0.0/8", "::1/128", "10.0.0.5". Raises ValueError for an entry that is none of these."""
    parsed: list[AllowEntry] = []
    for raw in entries:
        entry = raw.strip().lower()
        if not entry:
            continue
        try:
            parsed.append(_parse_allow_entry(entry))
        except ValueError:
            raise ValueError(f"URL_ALLOWLIST entry {raw!r} is not a hostname, host:port or CIDR") from None
    return tuple(parsed)


def _parse_allow_entry(entry: str) -> AllowEntry:
    if "/" in entry:
        return AllowEntry(None, ipaddress.ip_network(entry, strict=False), None)
    try:  # a bare IP literal (IPv6 literals contain colons, so test this before host:port)
        return AllowEntry(None, ipaddress.ip_network(entry.strip("[]")), None)
    except ValueError:
        pass
    host, port = entry, None
    if ":" in entry:
        host, _, port_text = entry.rpartition(":")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(entry)
        port = int(port_text)
        host = host.strip("[]") if host.startswith("[") else host
    try:
        return AllowEntry(None, ipaddress.ip_network(host), port)
    except ValueError:
        pass
    name = host.rstrip(".")
    if not _HOST_RE.match(name):
        raise ValueError(entry)
    return AllowEntry(name, None, port)


def _allowed(entries: Sequence[AllowEntry], host: str, port: int, address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    candidates: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        candidates.append(ip.ipv4_mapped)
    for entry in entries:
        if entry.port is not None and entry.port != port:
            continue
        if entry.name is not None and entry.name == host:
            return True
        if entry.network is not None and any(
            c.version == entry.network.version and c in entry.network for c in candidates
        ):
            return True
    return False


# --- URL checks -------------------------------------------------------------------------------


def _normalize_host(raw: str, field: str) -> tuple[str, bool]:
    """(host, is_ip_literal) for the hostname part of a URL, or FetchError."""
    try:
        return str(ipaddress.ip_address(raw)), True
    except ValueError:
        pass
    host = raw.rstrip(".").lower()
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise FetchError(f"{field}: the URL's host is not a valid hostname") from None
    if not _HOST_RE.match(host):
        raise FetchError(f"{field}: the URL's host is not a valid hostname")
    if _NUMERIC_LABEL_RE.match(host.rsplit(".", 1)[-1]):
        # "127.1", "2130706433", "0x7f.0.0.1": IP addresses in disguise; no real name ends so.
        raise FetchError(f"{field}: the URL's host is not a valid hostname or IP address")
    return host, False


def _check(url: str, entries: Sequence[AllowEntry], field: str) -> _Target:
    if not isinstance(url, str) or not url:
        raise FetchError(f"{field}: a URL is required")
    if len(url) > 8192:
        raise FetchError(f"{field}: the URL is too long")
    if any(ch.isspace() or ord(ch) < 0x20 or ch in "\\\x7f" for ch in url):
        raise FetchError(f"{field}: the URL contains spaces, control characters or backslashes")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise FetchError(f"{field}: the URL is not valid") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchError(f"{field}: only http and https URLs are accepted")
    if "@" in parts.netloc:
        raise FetchError(f"{field}: URLs with a user name or password are not accepted")
    if not parts.hostname:
        raise FetchError(f"{field}: the URL has no host")
    try:
        port = parts.port
    except ValueError:
        raise FetchError(f"{field}: the URL's port is not valid") from None
    if port == 0:
        raise FetchError(f"{field}: the URL's port is not valid")
    port = port or (443 if scheme == "https" else 80)
    host, is_literal = _normalize_host(parts.hostname, field)

    if is_literal:
        addresses = [host]
    else:
        try:
            addresses = resolve(host, port)
        except (OSError, UnicodeError):
            raise FetchError(f"{field}: cannot resolve host {host}") from None
        if not addresses:
            raise FetchError(f"{field}: cannot resolve host {host}")
    for address in addresses:
        try:
            reason = classify_address(address)
        except ValueError:
            raise FetchError(f"{field}: cannot resolve host {host}") from None
        if reason is not None and not _allowed(entries, host, port, address):
            subject = "host is" if is_literal else "host resolves to"
            raise FetchError(f"{field}: {subject} {reason} (refused; see URL_ALLOWLIST)")

    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    return _Target(scheme, host, port, path, tuple(addresses), is_literal)


def check_url(url: str, allowlist: Sequence[str], *, field: str = "url") -> None:
    """Refuse (FetchError) a URL this service must not fetch: see the module docstring."""
    _check(url, parse_allowlist(allowlist), field)


# --- the total deadline: a reaper shuts down sockets whose request ran out of time ----------------

_reaper = threading.Condition()
_reap_heap: list[tuple[float, int, list]] = []  # (deadline, tie-breaker, [socket or None])
_reap_order = itertools.count()
_reaper_started = False
_local = threading.local()  # .deadline and .watched of the request this thread is making


def _reap_loop() -> None:
    while True:
        with _reaper:
            while not _reap_heap:
                _reaper.wait()
            deadline, _n, holder = _reap_heap[0]
            wait_s = deadline - time.monotonic()
            if wait_s > 0:
                _reaper.wait(wait_s)
                continue
            heapq.heappop(_reap_heap)
            sock = holder[0]
            holder[0] = None
        if sock is not None:
            try:  # the base class's shutdown, so a TLS socket's state is left for its own thread
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass


def _watch(sock: socket.socket) -> None:
    """Called for every socket a pinned request opens: shut it down at the request's deadline."""
    global _reaper_started
    deadline = getattr(_local, "deadline", None)
    if deadline is None:
        return
    holder: list = [sock]
    _local.watched.append(holder)
    with _reaper:
        if not _reaper_started:
            threading.Thread(target=_reap_loop, name="netfetch-deadlines", daemon=True).start()
            _reaper_started = True
        heapq.heappush(_reap_heap, (deadline, next(_reap_order), holder))
        _reaper.notify()


@contextmanager
def _watch_sockets(deadline: float) -> Iterator[None]:
    """Every socket opened by this thread inside the block is shut down once `deadline` passes."""
    _local.deadline, _local.watched = deadline, []
    try:
        yield
    finally:
        with _reaper:
            for holder in _local.watched:
                holder[0] = None  # finished in time: the reaper drops the entry when it comes up
        _local.deadline, _local.watched = None, []


class _WatchedHTTPConnection(HTTPConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _watch(sock)
        return sock


class _WatchedHTTPSConnection(HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _watch(sock)
        return sock


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


# --- pinned requests --------------------------------------------------------------------------


def pinned_adapter(target_scheme: str, hostname: str | None) -> HTTPAdapter:
    """A requests adapter for one pinned request. For https with a hostname, its pools send
    `hostname` as SNI and verify the certificate against it while connecting to an IP."""
    adapter = HTTPAdapter(max_retries=0)
    if target_scheme == "https" and hostname is not None:
        adapter.init_poolmanager(
            DEFAULT_POOLSIZE, DEFAULT_POOLSIZE, DEFAULT_POOLBLOCK, server_hostname=hostname
        )
    # connections whose sockets the deadline reaper watches (see _watch_sockets)
    adapter.poolmanager.pool_classes_by_scheme = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}
    return adapter


def _prepare(
    target: _Target, address: str, method: str, headers: dict[str, str], body: bytes | None
) -> requests.PreparedRequest:
    all_headers = {"User-Agent": USER_AGENT, "Accept": "*/*", "Connection": "close", **headers}
    all_headers["Host"] = target.host_header
    return requests.Request(method, target.url_for(address), headers=all_headers, data=body).prepare()


def _connect_failed(exc: requests.RequestException) -> bool:
    """True when no connection was made (so trying the host's next address is safe)."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, urllib3.exceptions.NewConnectionError)


def _send(
    target: _Target,
    method: str,
    headers: dict[str, str],
    body: bytes | None,
    timeout: tuple[float, float],
) -> tuple[requests.Response, HTTPAdapter]:
    """Send one request to the target's checked addresses (the next one only if connecting failed)."""
    last: requests.RequestException | None = None
    for address in target.addresses:
        adapter = pinned_adapter(target.scheme, None if target.is_ip_literal else target.host)
        request = _prepare(target, address, method, headers, body)
        try:
            response = adapter.send(request, stream=True, timeout=timeout, verify=CA_BUNDLE or True)
        except requests.RequestException as exc:
            adapter.close()
            last = exc
            if _connect_failed(exc):
                continue
            raise
        return response, adapter
    assert last is not None
    raise last


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:g}"


def _fmt_size(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n // size} {unit}" if n % size == 0 else f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _request_error(exc: Exception, field: str, host: str, timeout: tuple[float, float]) -> FetchError:
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return FetchError(
            f"{field}: could not connect to {host} (timed out after {_fmt_seconds(timeout[0])} s)"
        )
    if isinstance(exc, requests.exceptions.ReadTimeout | urllib3.exceptions.ReadTimeoutError | TimeoutError):
        return FetchError(f"{field}: {host} timed out (no data for {_fmt_seconds(timeout[1])} s)")
    if isinstance(exc, requests.exceptions.SSLError):
        return FetchError(f"{field}: TLS with {host} failed (certificate not valid for this host?)")
    if isinstance(exc, requests.exceptions.ConnectionError) and _connect_failed(exc):
        return FetchError(f"{field}: could not connect to {host}")
    return FetchError(f"{field}: the connection to {host} failed")


def _set_read_timeout(response: requests.Response, seconds: float) -> None:
    """Bound the next socket read (keeps the total deadline even when a server drips bytes)."""
    connection = getattr(response.raw, "connection", None)
    sock = getattr(connection, "sock", None)
    if sock is not None:
        sock.settimeout(max(seconds, 0.001))


# --- downloads and webhooks ----------------------------------------------------------------


def download(
    url: str,
    dest: Path,
    *,
    field: str,
    max_bytes: int,
    allowlist: Sequence[str],
    connect_timeout: float = 10,
    read_timeout: float = 30,
    total_timeout: float = 120,
    max_redirects: int = 5,
) -> DownloadInfo:
    """Download `url` to `dest` (checked, pinned, size-capped, with a total deadline).

    Redirects are followed here (each hop checked like the first). On any failure `dest` is
    removed and FetchError is raised."""
    entries = parse_allowlist(allowlist)
    deadline = time.monotonic() + total_timeout
    dest = Path(dest)
    try:
        with _watch_sockets(deadline):
            return _download(
                url,
                dest,
                entries,
                field,
                max_bytes,
                deadline,
                total_timeout,
                connect_timeout,
                read_timeout,
                max_redirects,
            )
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


def _download(
    url: str,
    dest: Path,
    entries: Sequence[AllowEntry],
    field: str,
    max_bytes: int,
    deadline: float,
    total_timeout: float,
    connect_timeout: float,
    read_timeout: float,
    max_redirects: int,
) -> DownloadInfo:
    timed_out = FetchError(f"{field}: timed out after {_fmt_seconds(total_timeout)} s")
    too_large = FetchError(f"{field}: file too large (over {_fmt_size(max_bytes)})")
    current = url
    for hop in range(max_redirects + 1):
        target = _check(current, entries, field)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise timed_out
        timeout = (min(connect_timeout, remaining), min(read_timeout, remaining))
        try:
            response, adapter = _send(target, "GET", {"Accept-Encoding": "identity"}, None, timeout)
        except requests.RequestException as exc:
            if time.monotonic() >= deadline:
                raise timed_out from exc
            raise _request_error(exc, f"{field}: download failed", target.host, timeout) from exc
        try:
            if time.monotonic() >= deadline:  # the reaper cut the headers short: not an answer
                raise timed_out
            status = response.status_code
            if status in REDIRECT_STATUSES:
                current = _redirect_url(response, current, target.host, field, hop == max_redirects, max_redirects)
                continue
            if not 200 <= status < 300:
                raise FetchError(f"{field}: download failed: {target.host} answered HTTP {status}")
            declared = response.headers.get("Content-Length", "").strip()
            if declared.isdigit() and int(declared) > max_bytes:
                raise too_large
            size = _stream_to_file(response, dest, max_bytes, deadline, read_timeout, too_large, timed_out)
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            if time.monotonic() >= deadline:
                raise timed_out from exc
            raise _request_error(exc, f"{field}: download failed", target.host, timeout) from exc
        finally:
            response.close()
            adapter.close()
        content_type = response.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        return DownloadInfo(path=dest, bytes=size, content_type=content_type, final_url=current)
    raise AssertionError("unreachable")  # the loop always returns or raises


def _redirect_url(response: requests.Response, current: str, host: str, field: str, last_hop: bool,
                  max_redirects: int) -> str:
    """Where a redirect answer points (checked again by the caller's next hop), or the FetchError of a
    redirect without a Location or one hop too many."""
    location = response.headers.get("Location", "").strip()
    if not location:
        raise FetchError(
            f"{field}: download failed: {host} answered HTTP {response.status_code} without a Location"
        )
    if last_hop:
        raise FetchError(f"{field}: download failed: too many redirects (more than {max_redirects})")
    return urljoin(current, location)


def _stream_to_file(
    response: requests.Response,
    dest: Path,
    max_bytes: int,
    deadline: float,
    read_timeout: float,
    too_large: FetchError,
    timed_out: FetchError,
) -> int:
    size = 0
    with open(dest, "wb") as out:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise timed_out
            _set_read_timeout(response, min(read_timeout, remaining))
            data = response.raw.read1(CHUNK_BYTES, decode_content=True)
            if not data:
                return size
            size += len(data)
            if size > max_bytes:
                raise too_large
            out.write(data)


def post_json(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    field: str = "notify_url",
    allowlist: Sequence[str],
    timeout: float = 10,
) -> int:
    """POST `body` (JSON) to a webhook URL; return the HTTP status. `timeout` is the total deadline
    for connecting, sending, and reading the status line and headers (the answer's body is not
    read). Redirects are not followed (a 3xx comes back as a status the caller treats as failure).
    FetchError when the URL is refused or no answer arrives in time."""
    target = _check(url, parse_allowlist(allowlist), field)
    send_headers = {"Content-Type": "application/json", **headers}
    timeouts = (timeout, timeout)
    deadline = time.monotonic() + timeout
    with _watch_sockets(deadline):
        try:
            response, adapter = _send(target, "POST", send_headers, body, timeouts)
        except requests.RequestException as exc:
            if time.monotonic() >= deadline - 0.01:
                raise FetchError(f"{field}: delivery failed: {target.host} timed out (no complete "
                                 f"answer within {_fmt_seconds(timeout)} s)") from exc
            raise _request_error(exc, f"{field}: delivery failed", target.host, timeouts) from exc
        try:
            if time.monotonic() >= deadline:  # the reaper cut the headers short: not an answer
                raise FetchError(f"{field}: delivery failed: {target.host} timed out (no complete "
                                 f"answer within {_fmt_seconds(timeout)} s)")
            return response.status_code
        finally:
            response.close()
            adapter.close()
