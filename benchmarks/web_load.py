"""Load on the attention explorer (`qkv serve`) over loopback: C concurrent clients send N
requests in all (explain, steps and compare on a few sentences), then the script prints the
status counts and the latency percentiles, and writes them as JSON.

    python benchmarks/web_load.py                       # own server on 127.0.0.1, 8 clients, 400 requests
    python benchmarks/web_load.py --url http://127.0.0.1:8000 --clients 8 --requests 400 --json out.json

Only 127.0.0.1 / localhost / ::1 URLs are accepted. Every request has a timeout and the run has
a deadline, so the script always stops by itself. tests/web/test_load.py runs a smaller load
through `run_load`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Optional
from urllib.parse import urlparse

import httpx

SENTENCES = [
    "The cat sat on the mat.",
    "The dog chased the ball across the garden.",
    "Attention lets every word look at every other word.",
    "She gave him the book because he asked for it.",
]


def requests_for(i: int) -> tuple[str, dict]:
    """The i-th request of a run: mostly explain, some steps and compare."""
    text = SENTENCES[i % len(SENTENCES)]
    kind = i % 5
    if kind == 3:
        return "/api/steps", {"text": text, "word": 1, "layer": i % 6, "head": i % 12}
    if kind == 4:
        return "/api/compare", {"text": text, "other": SENTENCES[(i + 1) % len(SENTENCES)], "focus": 1}
    method = ("raw", "rollout", "value-norm")[kind]
    return "/api/explain", {"text": text, "method": method, "focus": 1}


@dataclass
class LoadResult:
    clients: int
    requests: int
    sent: int = 0
    status: dict = field(default_factory=dict)
    unclean: list = field(default_factory=list)  # answers that were neither 200 nor a JSON 503
    latencies_ms: list = field(default_factory=list)  # of the 200 answers
    health_ms: list = field(default_factory=list)  # /api/health answers during the run
    health_while_full: int = 0  # health answers that saw a full queue
    wall_s: float = 0.0

    def percentile(self, q: float) -> Optional[float]:
        if not self.latencies_ms:
            return None
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]

    def summary(self) -> dict:
        d = asdict(self)
        del d["latencies_ms"], d["health_ms"]
        d.update(p50_ms=self.percentile(50), p95_ms=self.percentile(95),
                 max_ms=max(self.latencies_ms) if self.latencies_ms else None,
                 mean_ms=statistics.fmean(self.latencies_ms) if self.latencies_ms else None,
                 health_max_ms=max(self.health_ms) if self.health_ms else None,
                 throughput_per_s=self.status.get("200", 0) / self.wall_s if self.wall_s else None)
        return d


def check_loopback(url: str) -> str:
    u = urlparse(url)
    if u.scheme != "http" or u.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"this load test only talks to this machine (http://127.0.0.1:PORT); got {url!r}")
    return url.rstrip("/")


def run_load(url: str, *, clients: int = 8, requests: int = 400, deadline_s: float = 120.0,
             request_timeout_s: float = 30.0, health_every_s: float = 0.05) -> LoadResult:
    """C client threads share a counter of N requests; a further thread polls /api/health."""
    url = check_loopback(url)
    result = LoadResult(clients=clients, requests=requests)
    lock = threading.Lock()
    counter = iter(range(requests))
    stop = threading.Event()
    t_end = time.monotonic() + deadline_s

    def client():
        with httpx.Client(timeout=request_timeout_s) as c:
            while time.monotonic() < t_end:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                path, body = requests_for(i)
                t0 = time.perf_counter()
                try:
                    r = c.post(url + path, json=body)
                    code = str(r.status_code)
                    ok_503 = r.status_code == 503 and r.headers.get("content-type", "").startswith("application/json") \
                        and r.json().get("error", {}).get("code") == "busy"
                except httpx.HTTPError as exc:
                    code, ok_503, r = type(exc).__name__, False, None
                ms = (time.perf_counter() - t0) * 1000
                with lock:
                    result.sent += 1
                    result.status[code] = result.status.get(code, 0) + 1
                    if code == "200":
                        result.latencies_ms.append(ms)
                    elif not ok_503:
                        result.unclean.append({"path": path, "status": code,
                                               "body": r.text[:200] if r is not None else None})

    def health():
        with httpx.Client(timeout=request_timeout_s) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    r = c.get(url + "/api/health")
                    q = r.json()["queue"]
                    full = q["waiting"] >= q["max_queue"] and q["running"] >= q["workers"]
                except (httpx.HTTPError, ValueError, KeyError):
                    r, full = None, False
                ms = (time.perf_counter() - t0) * 1000
                with lock:
                    result.health_ms.append(ms if r is not None and r.status_code == 200 else float("inf"))
                    result.health_while_full += int(full)
                stop.wait(health_every_s)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    poller = threading.Thread(target=health, daemon=True)
    poller.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, t_end - time.monotonic()) + request_timeout_s)
    stop.set()
    poller.join(request_timeout_s)
    result.wall_s = time.perf_counter() - t0
    return result


def _own_server(max_queue: int):
    """Start the explorer on 127.0.0.1:<free port> in this process; returns (url, stop)."""
    import uvicorn

    from qkv.web.app import create_app
    from qkv.web.server import bind, url_of

    app = create_app(max_queue=max_queue)
    app.state.service.registry.get("minilm")
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)

    def stop():
        server.should_exit = True
        thread.join(10)
        sock.close()

    return url_of(sock).rstrip("/"), stop


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server on this machine (default: start one in this process)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--max-queue", type=int, default=8, help="queue of the server this script starts (default 8)")
    p.add_argument("--deadline", type=float, default=300.0, help="seconds after which no request is sent")
    p.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    args = p.parse_args(argv)
    stop = None
    url = args.url
    if url is None:
        url, stop = _own_server(args.max_queue)
    try:
        res = run_load(url, clients=args.clients, requests=args.requests, deadline_s=args.deadline)
    finally:
        if stop:
            stop()
    s = res.summary()
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "server": "own" if args.url is None else "given",
           "max_queue": args.max_queue if args.url is None else None}
    print(f"web load: {args.clients} clients, {res.sent} of {args.requests} requests sent in {res.wall_s:.1f} s "
          f"(torch {env['torch']}, {env['threads']} threads)")
    print(f"{'status':>10} {'count':>6}")
    for code, count in sorted(res.status.items()):
        print(f"{code:>10} {count:>6}")
    fmt = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    print(f"latency of 200 answers (ms): p50 {fmt(s['p50_ms'])}  p95 {fmt(s['p95_ms'])}  max {fmt(s['max_ms'])}  "
          f"mean {fmt(s['mean_ms'])};  {fmt(s['throughput_per_s'])} requests/s")
    print(f"/api/health during the run: {len(res.health_ms)} answers, slowest {fmt(s['health_max_ms'])} ms, "
          f"{res.health_while_full} while the queue was full")
    if res.unclean:
        print(f"UNCLEAN answers: {res.unclean[:5]}")
    if args.json:
        from qkv._files import write_text

        write_text(args.json, json.dumps({"summary": s, "env": env}, indent=2))
        print(f"wrote {args.json}")
    return 0 if not res.unclean and res.sent == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
