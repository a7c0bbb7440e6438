"""
A real HTTP server on 127.0.0.1 for the download tests (tests/test_download.py, test_dataset.py,
test_core_eval.py, test_tasks.py). It serves the files of a folder and misbehaves on purpose.

`plan[name]` is a list of behaviours, one used per request for that file; when the list is empty
the file is served normally ('ok'):
- '500': an HTTP 500; '404': an HTTP 404;
- 'truncate': the right Content-Length, then a third of the body and the connection drops;
- 'garbage': an HTML page instead of the file;
- 'corrupt_middle': the file with 4 KB of garbage written over its middle, same length, so the
  parquet footer (or the zip directory) at the end is intact;
- 'endless': no Content-Length and an endless body (64 KB writes until the client goes away);
- 'huge': announces a 1 TB Content-Length, then sends the file;
- 'trickle': the right Content-Length, then one byte every `trickle_s` seconds;
- 'redirect': a 302 to /files/<name>, which serves the file (with `sha256[name]`, when set, in an
  X-Linked-Etag header on the redirect, as the Hugging Face Hub does).

`interrupt_mid_download` runs a real subprocess and sends it SIGINT (Ctrl-C) mid-download.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from conftest import default_sigint


class MisbehavingServer:
    def __init__(self, root, trickle_s: float = 2.0):
        self.root, self.trickle_s = str(root), trickle_s
        self.plan, self.sha256, self.requests = {}, {}, []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                # a proxy is sent the whole URL ("GET http://host/name"): it is served the same
                name = urlsplit(self.path).path.lstrip("/")
                redirected = name.startswith("files/")
                name = name.removeprefix("files/")
                with server.lock:
                    server.requests.append(name)
                    todo = server.plan.get(name)
                    behaviour = "ok" if redirected or not todo else todo.pop(0)
                path = os.path.join(server.root, name)
                if behaviour in ("500", "404") or not os.path.isfile(path):
                    return self.send_error(500 if behaviour == "500" else 404)
                if behaviour == "redirect":
                    self.send_response(302)
                    self.send_header("Location", f"/files/{name}")
                    if name in server.sha256:
                        self.send_header("X-Linked-Etag", f'"{server.sha256[name]}"')
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                body = open(path, "rb").read()
                if behaviour == "garbage":
                    body = b"<html>not the file you asked for</html>" * 100
                if behaviour == "corrupt_middle":
                    middle = len(body) // 2
                    body = body[:middle] + os.urandom(4096) + body[middle + 4096:]
                self.send_response(200)
                if behaviour == "endless":
                    self.send_header("Connection", "close")
                    self.end_headers()
                    chunk = os.urandom(1 << 16)
                    while not server.stopping.is_set():
                        self.wfile.write(chunk)  # raises once the client has gone away
                    return
                self.send_header("Content-Length", str(1 << 40 if behaviour == "huge" else len(body)))
                self.end_headers()
                if behaviour == "truncate":
                    self.wfile.write(body[: len(body) // 3])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if behaviour == "trickle":
                    for byte in body:
                        if server.stopping.wait(server.trickle_s):
                            return
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                    return
                self.wfile.write(body)

            def handle(self):
                try:
                    super().handle()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading: that is what the test wanted

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll `predicate` every 20 ms until it is true; fail the test after `timeout` seconds."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def interrupt_mid_download(args: list[str], cwd, started, stopped=None) -> tuple[float, int, str]:
    """Run `python *args` in `cwd`, wait until `started()` (e.g. its temp files exist), send it
    SIGINT, and return (seconds until `stopped()` is true, by default until the process has exited;
    its exit status; its stderr). The child gets SIGINT's default action back (conftest.default_sigint)."""
    proc = subprocess.Popen([sys.executable, *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, preexec_fn=default_sigint)
    try:
        wait_for(started, timeout=60, what="the download to start")
        time.sleep(0.3)  # well inside the blocked read
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        if stopped is None:
            proc.wait(10)
        else:
            wait_for(stopped, timeout=10, what="the download to stop")
        elapsed = time.monotonic() - t0
        proc.wait(60)  # a process that has loaded torch takes a while to exit on a busy machine
    finally:
        proc.kill()
    return elapsed, proc.returncode, proc.stderr.read()
