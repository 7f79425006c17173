"""A hostile client against both HTTP servers: the Serve app and the page (gunicorn).

Seeded and reproducible (``MEDGPT_FUZZ_SEED``, ``MEDGPT_FUZZ_REQUESTS``): at least 1,000
requests per server per run, from deep nesting, huge and non-finite numbers, wrong types,
unparsable, chunked and oversized bodies, bad methods and paths, to header and framing abuse.
Every answer must be below 500, and every error a JSON error body (``{"error": {"message",
"type", ...}}``). Requests are written on raw sockets, so nothing between the test and the
server tidies them up.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from medgpt.api import MAX_BODY_BYTES, PAGE_MAX_BODY_BYTES
from medgpt.testing.serving import serve_app, tiny_checkpoint, web_server

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("MEDGPT_FUZZ_SEED", "20261203"))
REQUESTS = int(os.environ.get("MEDGPT_FUZZ_REQUESTS", "1200"))

# Values that break naive validators: huge and non-finite numbers, wrong types, odd strings.
NASTY: list[object] = [
    None, True, False, 0, -1, 1, 2, 2**31, 2**63, -(2**63), 10**400, -(10**400), 1e308,
    -1e308, 5e-324, -0.0, 0.5, 1.5, 2.0000001, "", " ", "1", "0.5", "NaN", "x" * 300,
    "\u0000", "\ud7ff\ue000", "😀" * 20, "<script>alert(1)</script>", [], [1], [[]], ["a"] * 9,
    {}, {"a": {"b": [1]}}, {"include_usage": "yes"}, {"include_usage": True},
]  # fmt: skip
# JSON texts Python's json module reads as numbers no client means.
NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1" * 400, "-" + "9" * 4000]


@dataclass
class Target:
    url_host: str
    port: int
    prefix: str  # the app's path prefix on that port
    routes: dict[str, dict]  # POST route -> a small valid body
    gets: list[str]
    limit: int  # body bytes the server reads at most


def _request(method: str, path: str, headers: list[tuple[str, str]], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body


def _chunked(body: bytes, size: int) -> bytes:
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


class Cases:
    """Raw requests, drawn from ``rng``: each a (label, bytes, method) triple."""

    def __init__(self, rng: random.Random, target: Target) -> None:
        self.rng, self.t = rng, target

    def _headers(self, body: bytes, ctype: str | None = "application/json") -> list:
        h = [("Host", "127.0.0.1"), ("Connection", "close")]
        if ctype is not None:
            h.append(("Content-Type", ctype))
        h.append(("Content-Length", str(len(body))))
        return h

    def _post(self, route: str, body: bytes, ctype: str | None = "application/json") -> bytes:
        return _request("POST", self.t.prefix + route, self._headers(body, ctype), body)

    def _route(self) -> tuple[str, dict]:
        route = self.rng.choice(sorted(self.t.routes))
        return route, dict(self.t.routes[route])

    def mutated_field(self) -> tuple[str, bytes]:
        route, body = self._route()
        fields = [*body, "temperature", "top_k", "top_p", "seed", "stop", "n", "stream",
                  "stream_options", "max_tokens", "max_new_tokens", "prompt", "model", "zzz",
                  "logprobs", "echo", "best_of", "frequency_penalty", "logit_bias", "suffix"]  # fmt: skip
        for _ in range(self.rng.randint(1, 3)):
            body[self.rng.choice(fields)] = self.rng.choice(NASTY)
        return "field", self._post(route, json.dumps(body).encode())

    def non_finite(self) -> tuple[str, bytes]:
        route, body = self._route()
        key = self.rng.choice(["temperature", "top_p", "top_k", "seed", "max_tokens",
                               "max_new_tokens", "n"])  # fmt: skip
        text = json.dumps(body)[:-1] + f', "{key}": {self.rng.choice(NON_FINITE)}}}'
        return "non-finite", self._post(route, text.encode())

    def deep(self) -> tuple[str, bytes]:
        route, _ = self._route()
        depth = self.rng.choice([30, 33, 100, 1000, 5000, 20_000])
        opener, closer = self.rng.choice([("[", "]"), ('{"a":', "}")])
        inner = opener * depth + "1" + closer * depth
        text = self.rng.choice([inner, f'{{"prompt": "x", "stop": {inner}}}'])
        return "deep", self._post(route, text.encode())

    def unparsable(self) -> tuple[str, bytes]:
        route, body = self._route()
        good = json.dumps(body).encode()
        raw = self.rng.choice([
            good[: self.rng.randint(0, len(good) - 1)], b"\xff\xfe" + good, b"\xef\xbb\xbf" + good,
            bytes(self.rng.randrange(256) for _ in range(self.rng.randint(1, 200))), b"[1, 2]",
            b'"prompt"', b"42", b"null", b"true", b"{}", b" ", b"", good + b"garbage",
            good.replace(b'"prompt"', b"prompt"), b'{"prompt": "x", "prompt": 1}',
        ])  # fmt: skip
        return "unparsable", self._post(route, raw)

    def content_type(self) -> tuple[str, bytes]:
        route, body = self._route()
        ctype = self.rng.choice([None, "text/plain", "application/x-www-form-urlencoded",
                                 "multipart/form-data; boundary=x", "application/json; charset=latin-1",
                                 "application/JSON", "*/*", "application/json\x7f"])  # fmt: skip
        return "content-type", self._post(route, json.dumps(body).encode(), ctype)

    def oversized(self) -> tuple[str, bytes]:
        route, body = self._route()
        body["prompt"] = "x" * (self.t.limit + self.rng.randint(1, 8000))
        data = json.dumps(body).encode()
        if self.rng.random() < 0.5:
            return "oversized", self._post(route, data)
        headers = [("Host", "127.0.0.1"), ("Connection", "close"),
                   ("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")]  # fmt: skip
        chunked = _chunked(data, self.rng.choice([100, 4096, 65536]))
        return "oversized-chunked", _request("POST", self.t.prefix + route, headers, chunked)

    def chunked_ok(self) -> tuple[str, bytes]:
        route, body = self._route()
        headers = [("Host", "127.0.0.1"), ("Connection", "close"),
                   ("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")]  # fmt: skip
        chunked = _chunked(json.dumps(body).encode(), self.rng.choice([1, 7, 1000]))
        return "chunked", _request("POST", self.t.prefix + route, headers, chunked)

    def method_path(self) -> tuple[str, bytes]:
        method = self.rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD",
                                  "TRACE", "FOO", "get"])  # fmt: skip
        path = self.rng.choice([
            *self.t.routes, *self.t.gets, "/", "/v1", "/v1/models/x/y", "/v1/models/%00",
            "/%2e%2e/%2e%2e/etc/passwd", "/static/../app.py", "//", "/a?b=c&&d", "/" + "a" * 3000,
            "/v1/models/" + "%C3%A9" * 5, "/api/generate?prompt=x", "/healthz?x=" + "1" * 500,
        ])  # fmt: skip
        path = path if path.startswith("/") else "/" + path
        return "method-path", _request(method, self.t.prefix + path, self._headers(b"", None))

    def header_abuse(self) -> tuple[str, bytes]:
        route, body = self._route()
        data = json.dumps(body).encode()
        path = self.t.prefix + route
        base = [("Host", "127.0.0.1"), ("Connection", "close"), ("Content-Type", "application/json")]
        kind = self.rng.randrange(9)
        if kind == 0:  # both framings (request smuggling's classic)
            h = [*base, ("Content-Length", str(len(data))), ("Transfer-Encoding", "chunked")]
            return "cl+te", _request("POST", path, h, _chunked(data, 50))
        if kind == 1:
            value = self.rng.choice(["abc", "-1", "1,2", " 5", "99999999999999999999", "0x10"])
            return "bad-length", _request("POST", path, [*base, ("Content-Length", value)], data)
        if kind == 2:
            h = [*base, ("Content-Length", str(len(data))), ("Content-Length", str(len(data) + 1))]
            return "two-lengths", _request("POST", path, h, data)
        if kind == 3:
            te = self.rng.choice(["gzip", "chunked, gzip", "identity", "xchunked", "chunked\x00"])
            return "transfer-coding", _request("POST", path, [*base, ("Transfer-Encoding", te)], data)
        if kind == 4:
            h = [*base, ("X-Big", "y" * self.rng.choice([9000, 20_000])), ("Content-Length", "0")]
            return "huge-header", _request("GET", self.t.prefix + "/healthz", h)
        if kind == 5:
            h = [*base, *((f"X-{i}", "1") for i in range(200)), ("Content-Length", "0")]
            return "many-headers", _request("GET", self.t.prefix + "/healthz", h)
        if kind == 6:
            h = [*base, ("Content-Length", str(len(data))), ("Bad Header", "x"), ("\x00", "y")]
            return "bad-header-name", _request("POST", path, h, data)
        if kind == 7:
            line = self.rng.choice([b"GARBAGE\r\n\r\n", b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
                                    b"GET\r\n\r\n", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
                                    b"GET / HTTP/1.1\r\nHost: x\r\n folded: y\r\n\r\n"])  # fmt: skip
            return "request-line", line
        h = [("Connection", "close"), ("Content-Type", "application/json"),
             ("Content-Length", str(len(data)))]  # fmt: skip
        return "no-host", _request("POST", path, h, data)

    def valid(self) -> tuple[str, bytes]:
        route, body = self._route()
        return "valid", self._post(route, json.dumps(body).encode())

    def draw(self) -> tuple[str, bytes]:
        makers: list[tuple[float, Callable[[], tuple[str, bytes]]]] = [
            (0.30, self.mutated_field), (0.08, self.non_finite), (0.08, self.deep),
            (0.12, self.unparsable), (0.06, self.content_type), (0.06, self.oversized),
            (0.04, self.chunked_ok), (0.12, self.method_path), (0.12, self.header_abuse),
            (0.02, self.valid),
        ]  # fmt: skip
        x, acc = self.rng.random(), 0.0
        for weight, make in makers:
            acc += weight
            if x < acc:
                return make()
        return self.valid()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def _exchange(port: int, raw: bytes, patience: float = 10.0) -> Answer:
    """Send ``raw`` and read the answer until the server closes (every request says
    ``Connection: close``). A request left incomplete on purpose (a Content-Length larger
    than its body) gets ``patience`` seconds; then the write side is closed, and a server that
    closes without answering it is recorded as status 0."""
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=patience) as s:
        # The server may answer (and close) before reading it all: its answer is read below.
        with contextlib.suppress(OSError):
            s.sendall(raw)
        half_closed = False
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                if half_closed or data:
                    break
                s.shutdown(socket.SHUT_WR)
                half_closed = True
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    if not data:
        return Answer(0, {}, b"")
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines[0].startswith("HTTP/") else -1
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2 :]
        body = out
    return Answer(status, headers, body)


# Requests incomplete by construction: a server may wait for the rest, then close unanswered.
INCOMPLETE = {"bad-length", "two-lengths", "transfer-coding", "cl+te", "request-line"}


def _problems(label: str, raw: bytes, a: Answer) -> str | None:
    if a.status == 0 and label in INCOMPLETE:
        return None
    if a.status <= 0:
        return "no HTTP answer"
    if a.status >= 500:
        return f"{a.status}"
    if a.status < 400:
        return None
    if raw.startswith(b"HEAD "):
        return None  # no body by definition
    try:
        err = json.loads(a.body)["error"]
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    except (ValueError, KeyError, TypeError, AssertionError):
        return f"{a.status} without a JSON error body: {a.body[:120]!r}"
    return None


def _fuzz(target: Target, seed: int, n: int) -> tuple[Counter, Counter, list[str]]:
    rng = random.Random(seed)
    cases = Cases(rng, target)
    kinds: Counter = Counter()
    statuses: Counter = Counter()
    failures: list[str] = []
    for i in range(n):
        label, raw = cases.draw()
        kinds[label] += 1
        # Incomplete ones are allowed no answer: 2 s is enough to see whether one comes (a
        # server waiting for the rest of a body held each of them for the full 10 s).
        answer = _exchange(target.port, raw, 2.0 if label in INCOMPLETE else 10.0)
        statuses[answer.status] += 1
        problem = _problems(label, raw, answer)
        if problem:
            failures.append(f"#{i} {label}: {problem} <- {raw[:160]!r}")
    return kinds, statuses, failures


@pytest.fixture(scope="module")
def servers(ray_cluster, tmp_path_factory) -> Iterator[dict[str, Target]]:
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("fuzz-ckpt"))
    storage = tmp_path_factory.mktemp("fuzz-store")
    tiny = {"prompt": "Asthma", "temperature": 0}
    with (
        serve_app(ray_cluster["address"], ckpt, storage, "fuzz") as serve_url,
        web_server({"SERVE_URL": serve_url, "READ_TIMEOUT": 30}) as web_url,
    ):
        serve = Target(
            "127.0.0.1",
            int(serve_url.rsplit(":", 1)[1].split("/")[0]),
            "/fuzz",
            {
                "/v1/completions": {**tiny, "max_tokens": 1},
                "/generate": {**tiny, "max_new_tokens": 1},
                "/generate/stream": {**tiny, "max_new_tokens": 1},
            },
            ["/healthz", "/v1/models", "/v1/models/step-000007"],
            MAX_BODY_BYTES,
        )
        web = Target(
            "127.0.0.1",
            int(web_url.rsplit(":", 1)[1]),
            "",
            {
                "/api/generate": {**tiny, "max_new_tokens": 1},
                "/api/generate/stream": {**tiny, "max_new_tokens": 1},
            },
            ["/", "/healthz", "/api/model", "/static/app.js"],
            PAGE_MAX_BODY_BYTES,
        )
        yield {"serve": serve, "web": web}


# What Serve's HTTP proxy (uvicorn, inside Ray) answers itself, before any application sees
# the request, when it cannot parse HTTP (an unknown or lower-case method, control characters
# in a header): a 4xx, but plain text, and no hook reaches it. Counted apart, exactly this
# answer and nothing else; the page's server (gunicorn) answers the same requests in JSON.
UVICORN_REFUSAL = (400, b"Invalid HTTP request received.")


@pytest.mark.parametrize("name", ["serve", "web"])
def test_a_hostile_client_gets_no_5xx_and_only_json_errors(servers, name) -> None:
    kinds, statuses, failures = _fuzz(servers[name], SEED + (name == "web"), REQUESTS)
    if name == "serve":
        proxy = [f for f in failures if f.split(": ", 1)[1].startswith(
            f"{UVICORN_REFUSAL[0]} without a JSON error body: {UVICORN_REFUSAL[1]!r}")]  # fmt: skip
        failures = [f for f in failures if f not in proxy]
        print(f"serve: {len(proxy)} refused by the proxy's HTTP parser (plain text)")
    print(f"{name}: {sum(kinds.values())} requests {dict(kinds)}; statuses {dict(statuses)}")
    assert sum(kinds.values()) >= 1000
    assert not any(s >= 500 for s in statuses), statuses
    assert not failures, "\n".join(failures[:20])
    # The run exercised what it claims to: errors of every family and some successes.
    assert statuses[400] > 100 and statuses[413] > 10 and statuses[404] + statuses[405] > 20
    assert any(200 <= s < 300 for s in statuses), statuses
