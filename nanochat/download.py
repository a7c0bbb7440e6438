"""
Downloads that never keep a damaged file. One helper serves the pretraining shards
(nanochat/dataset.py), the CORE eval bundle (nanochat/core_bundle.py) and the task data
(tasks/common.py).

A file is streamed into `<path>.tmp<pid>_<thread>` and renamed into place only when
- the body is complete: as long as its Content-Length, when the server sends one;
- it matches the sha256 that the server publishes for it, when it publishes one (the Hugging Face
  Hub sends `X-Linked-Etag: "<sha256>"` with the redirect for files kept in LFS/Xet);
- `validate(tmp_path)` passes. Callers decode the whole file (every parquet row group, the CRC of
  every zip member), so garbage in the middle of a file whose footer is intact is caught.

Limits, each ending the download with one line that says what to change:
- a size cap per file (`max_bytes`, or $NANOCHAT_DOWNLOAD_MAX_MB for every download), checked
  against Content-Length before the body and against the bytes received while streaming, so an
  endless body stops at the cap;
- a deadline per file, all attempts together (`deadline` seconds, or $NANOCHAT_DOWNLOAD_DEADLINE),
  so a server that trickles a byte at a time cannot hold a run forever;
- a read timeout (`timeout`) for a connection that goes silent.
Failures that may pass (connection errors, 5xx, a short body, a file that does not validate) are
retried with exponential backoff ($NANOCHAT_DOWNLOAD_BACKOFF: the first wait); the cap, the
deadline and a 4xx are not.

Stopping: Ctrl-C in the thread that downloads raises KeyboardInterrupt out of the blocking read at
once. A download in a worker thread takes a `cancel` event. A read blocked in another thread
cannot be interrupted, so a watchdog thread per download shuts the socket down when the event is
set or the deadline passes, and the read returns at once. The temp file is removed before any
exception leaves download_file.

HTTP is plain http.client (redirects followed here, proxies from the usual environment variables)
because the watchdog needs the socket, which requests does not expose.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import io
import logging
import os
import re
import socket
import ssl
import threading
import time
import urllib.request
from urllib.parse import unquote, urljoin, urlsplit

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 2_000_000_000  # 2 GB: callers pass a tighter cap when they know the file
DEFAULT_DEADLINE = 3600.0  # seconds per file, all attempts together (100 MB at 28 KB/s)
MAX_REDIRECTS = 5
SHA256 = re.compile(r'^(?:W/)?"?([0-9a-f]{64})"?$')


class DownloadError(RuntimeError):
    """A download that failed for good; the message is one line naming the file and what to do."""


class DownloadCancelled(DownloadError):
    """The caller's cancel event was set (e.g. Ctrl-C in the main thread of a pool of downloads)."""


class _Retry(Exception):
    """A failure worth another attempt (5xx, connection error, short body, wrong checksum)."""


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return float(value)
    except ValueError:
        raise DownloadError(f"${name}={value!r} is not a number") from None


class _Watchdog:
    """Shuts down the current socket when `cancel` is set or the deadline passes, so that a read
    blocked in any thread returns at once, and keeps shutting down any socket registered later.
    `reason` says which one fired."""

    def __init__(self, ends_at: float, cancel: threading.Event | None):
        self.ends_at, self.cancel = ends_at, cancel
        self.sock: socket.socket | None = None
        self.reason: str | None = None
        self.received = 0  # bytes of the current attempt, for the deadline's message
        self._done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self._done.wait(0.05):
            if self.reason is None and self.cancel is not None and self.cancel.is_set():
                self.reason = "cancelled"
            elif self.reason is None and time.monotonic() > self.ends_at:
                self.reason = "deadline"
            sock = self.sock
            if self.reason is not None and sock is not None:
                with contextlib.suppress(OSError):  # the plain socket's shutdown, also under TLS
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def stop(self):
        self._done.set()


def _tls_context() -> ssl.SSLContext:
    """Certificates from certifi (installed with requests) when present, as requests does: some
    Python builds (python.org's on macOS) come without a usable system store."""
    try:
        import certifi
        return ssl.create_default_context(cafile=certifi.where())
    except ImportError:
        return ssl.create_default_context()


def _connect(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str, dict]:
    """A connection for `url` (through $https_proxy / $http_proxy unless $no_proxy excludes the
    host), the request target to send on it and the proxy's headers for the request."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DownloadError(f"cannot download {url!r}: only http:// and https:// URLs are supported")
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(parts.hostname):
        if https:
            return http.client.HTTPSConnection(parts.hostname, port, timeout=timeout, context=_tls_context()), target, {}
        return http.client.HTTPConnection(parts.hostname, port, timeout=timeout), target, {}
    p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    headers = {}
    if p.username:
        credentials = f"{unquote(p.username)}:{unquote(p.password or '')}".encode()
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(credentials).decode()
    if https:  # a CONNECT tunnel through the proxy, TLS to the real host inside it
        conn = http.client.HTTPSConnection(p.hostname, p.port or 8080, timeout=timeout, context=_tls_context())
        conn.set_tunnel(parts.hostname, port, headers=headers)
        return conn, target, {}
    return http.client.HTTPConnection(p.hostname, p.port or 8080, timeout=timeout), url, headers


def _fetch_once(url: str, sink, name: str, max_bytes: int, timeout: float, chunk_size: int,
                watchdog: _Watchdog) -> None:
    """One attempt: GET `url` (following redirects) into the binary file `sink`. Raises _Retry
    for failures that may pass, DownloadError otherwise."""
    published_sha256 = None
    for _ in range(MAX_REDIRECTS + 1):
        conn, target, proxy_headers = _connect(url, timeout)
        response = None
        try:
            conn.connect()
            # Kept here: http.client drops conn.sock once the response owns the connection.
            watchdog.sock = conn.sock
            if watchdog.reason is not None:
                raise _Retry("stopped by the watchdog")
            conn.request("GET", target, headers={"User-Agent": "nanochat", "Accept-Encoding": "identity",
                                                 **proxy_headers})
            response = conn.getresponse()
            etag = SHA256.match((response.getheader("X-Linked-Etag") or "").strip().lower())
            published_sha256 = etag.group(1) if etag else published_sha256
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                url = urljoin(url, response.getheader("Location"))
                continue
            if response.status >= 400:
                message = f"HTTP {response.status} {response.reason} for {url}"
                if response.status >= 500 or response.status in (408, 429):
                    raise _Retry(message)
                raise DownloadError(f"{name}: {message}; check the URL (or the mirror set in the environment)")
            length = response.getheader("Content-Length")
            length = int(length) if length and length.isdigit() else None
            cap_message = (f"{name}: {url} sends more than the {max_bytes / 1e6:,.6g} MB cap for one file, so it "
                           f"is not the expected file; check the URL, or raise the cap with "
                           f"NANOCHAT_DOWNLOAD_MAX_MB=<MB>")
            if length is not None and length > max_bytes:
                raise DownloadError(cap_message.replace("sends more", f"announces {length:,} bytes, more"))
            digest = hashlib.sha256() if published_sha256 else None
            written = watchdog.received = 0
            while chunk := response.read1(chunk_size):
                written += len(chunk)
                watchdog.received = written
                if written > max_bytes:
                    raise DownloadError(cap_message)
                if digest is not None:
                    digest.update(chunk)
                sink.write(chunk)
                if time.monotonic() > watchdog.ends_at:
                    break  # reported below as the deadline
            if watchdog.reason is not None or time.monotonic() > watchdog.ends_at:
                raise _Retry("stopped by the watchdog")  # download_file turns it into the right error
            if length is not None and written != length:
                raise _Retry(f"the connection closed after {written:,} of {length:,} bytes")
            if digest is not None and digest.hexdigest() != published_sha256:
                raise _Retry(f"sha256 {digest.hexdigest()} differs from the published {published_sha256}")
            return
        except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, shut down
            raise _Retry(f"{type(e).__name__}: {e}") from e
        finally:
            watchdog.sock = None
            if response is not None:
                response.close()  # it owns the socket when the server closes after the body
            conn.close()
    raise DownloadError(f"{name}: more than {MAX_REDIRECTS} redirects from {url}")


def _download(url: str, open_sink, name: str, *, validate=None, attempts: int = 5, timeout: float = 30.0,
              backoff: float | None = None, max_bytes: int | None = None, deadline: float | None = None,
              cancel: threading.Event | None = None, chunk_size: int = 1 << 20):
    """The retry loop shared by download_file and fetch_bytes. For each attempt `open_sink()` is a
    context manager giving (binary file to write, finish) where finish() returns the result once the
    body is complete and `validate(file)` passed; leaving the context discards what was written."""
    max_bytes = int(_env_float("NANOCHAT_DOWNLOAD_MAX_MB", 0) * 1e6) or max_bytes or DEFAULT_MAX_BYTES
    deadline = _env_float("NANOCHAT_DOWNLOAD_DEADLINE", 0) or deadline or DEFAULT_DEADLINE
    backoff = _env_float("NANOCHAT_DOWNLOAD_BACKOFF", 1.0) if backoff is None else backoff
    watchdog = _Watchdog(time.monotonic() + deadline, cancel)
    last_error = None
    try:
        for attempt in range(1, attempts + 1):
            try:
                with open_sink() as (sink, finish):
                    _fetch_once(url, sink, name, max_bytes, timeout, chunk_size, watchdog)
                    if validate is not None:
                        validate(sink)
                    return finish()
            except _Retry as e:
                last_error = e
            except DownloadError:
                raise
            except Exception as e:  # the validator rejected the file
                last_error = e
            if watchdog.reason == "cancelled" or (cancel is not None and cancel.is_set()):
                raise DownloadCancelled(f"{name}: download cancelled")
            remaining = watchdog.ends_at - time.monotonic()
            wait = backoff * 2 ** (attempt - 1)
            if watchdog.reason == "deadline" or remaining <= 0 or (attempt < attempts and wait >= remaining):
                raise DownloadError(f"{name}: the download from {url} did not finish within its deadline of "
                                    f"{deadline:g} s ({watchdog.received:,} bytes in the last attempt); on a slow "
                                    f"link allow more with NANOCHAT_DOWNLOAD_DEADLINE=<seconds>")
            if attempt < attempts:
                logger.warning(f"download of {url} failed (attempt {attempt}/{attempts}): {last_error}; "
                               f"retrying in {wait:g}s")
                if cancel is not None and cancel.wait(wait):
                    raise DownloadCancelled(f"{name}: download cancelled")
                elif cancel is None:
                    time.sleep(wait)
        raise DownloadError(f"{name}: could not download {url} after {attempts} attempts: {last_error}")
    finally:
        watchdog.stop()


def download_file(url: str, path: str, *, validate=None, attempts: int = 5, timeout: float = 30.0,
                  backoff: float | None = None, max_bytes: int | None = None, deadline: float | None = None,
                  cancel: threading.Event | None = None, chunk_size: int = 1 << 20) -> str:
    """Download `url` to `path` (see the module docstring for the rules). `validate(tmp_path)`
    raises if the file is damaged. Returns `path`; `path` exists afterwards only if complete.
    Raises DownloadError (DownloadCancelled when `cancel` was set) or KeyboardInterrupt."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp_path = f"{path}.tmp{os.getpid()}_{threading.get_ident()}"

    def finish() -> str:
        os.replace(tmp_path, path)
        return path

    @contextlib.contextmanager
    def open_sink():
        try:
            with open(tmp_path, "wb") as f:
                yield f, finish
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp_path)

    check = None if validate is None else (lambda f: (f.close(), validate(tmp_path)))
    return _download(url, open_sink, os.path.basename(path), validate=check, attempts=attempts, timeout=timeout,
                     backoff=backoff, max_bytes=max_bytes, deadline=deadline, cancel=cancel, chunk_size=chunk_size)


def fetch_bytes(url: str, *, max_bytes: int = 1_000_000, **kwargs) -> bytes:
    """A small body (a JSON listing, say) in memory, under the same rules as download_file."""

    @contextlib.contextmanager
    def open_sink():
        buffer = io.BytesIO()
        yield buffer, buffer.getvalue

    return _download(url, open_sink, url.rsplit("/", 1)[-1] or url, max_bytes=max_bytes, **kwargs)


def check_parquet(path: str, required_column: str | None = None, cancel: threading.Event | None = None) -> None:
    """Raise unless every row group of the parquet file at `path` decodes (and, if given, it has
    `required_column`). Reading only the footer would accept a file with garbage in the middle."""
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(path, page_checksum_verification=True)  # checks page CRCs where written
    if required_column is not None and required_column not in pf.schema_arrow.names:
        raise ValueError(f"{os.path.basename(path)} has no {required_column!r} column "
                         f"(columns: {pf.schema_arrow.names})")
    columns = [required_column] if required_column is not None else None
    for i in range(pf.num_row_groups):
        if cancel is not None and cancel.is_set():
            raise DownloadCancelled(f"{os.path.basename(path)}: download cancelled")
        pf.read_row_group(i, columns=columns)
