"""/healthz latency while clients flood `ldmkit serve` with a known key id and wrong secrets.

    .venv/bin/python benchmarks/auth_flood.py                      # 200 wrong-secret requests from 10 clients
    .venv/bin/python benchmarks/auth_flood.py --requests 100 --clients 4

Starts its own `ldmkit serve` (the shipped fashion-mnist model, the smallest; a fresh database; one viewer key) on
127.0.0.1. First it measures /healthz alone and a valid key's GET /v1/models; then a separate process sends
`--requests` requests of `Bearer ldk_<the real key id>_<a wrong secret>` from `--clients` threads while this
process keeps probing /healthz, and the valid key is timed again during the flood. Each wrong secret costs the
server a scrypt verification (about 50 ms of one core) until the failed-attempt limit answers 429 without checking.
Everything is bounded: a fixed number of requests, each with a 30 s timeout, the whole run within --deadline s.
Prints a table and writes benchmarks/out/auth_flood.json.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from common import cpu_name, default_out, write_json  # noqa: E402
from serve_helpers import free_port, start_process  # noqa: E402

from ldmkit.serve.auth import Keys  # noqa: E402
from ldmkit.serve.store import open_store  # noqa: E402


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))] if xs else float("nan")


def summary(seconds: list[float]) -> dict:
    ms = [1000 * s for s in seconds]
    return {"n": len(ms), "p50_ms": percentile(ms, 0.5), "p99_ms": percentile(ms, 0.99), "max_ms": max(ms, default=0)}


def probe(url: str, path: str, until, key: str | None = None, gap: float = 0.01, limit: int = 5000) -> list[float]:
    """Latencies of GET `path`, one request at a time, until `until()` holds (at most `limit` requests)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    out = []
    with httpx.Client(base_url=url, headers=headers, timeout=30) as c:
        while not until() and len(out) < limit:
            started = time.perf_counter()
            r = c.get(path)
            out.append(time.perf_counter() - started)
            assert r.status_code == 200, (path, r.status_code, r.text[:200])
            time.sleep(gap)
    return out


def flood(url: str, header: str, requests: int, clients: int, results) -> None:
    """`requests` GET /v1/models with `header`, shared by `clients` threads; puts the status counts in `results`."""
    counts: dict[int, int] = {}
    lock = threading.Lock()
    left = [requests]

    def client():
        with httpx.Client(base_url=url, headers={"Authorization": header}, timeout=30) as c:
            while True:
                with lock:
                    if left[0] == 0:
                        return
                    left[0] -= 1
                try:
                    status = c.get("/v1/models").status_code
                except httpx.TransportError:
                    status = 0
                with lock:
                    counts[status] = counts.get(status, 0) + 1

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put({"statuses": counts, "seconds": time.perf_counter() - started})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200, help="wrong-secret requests in the flood")
    ap.add_argument("--clients", type=int, default=10, help="threads sending them")
    ap.add_argument("--deadline", type=float, default=300, help="seconds the whole run may take")
    ap.add_argument("--out", default=default_out("auth_flood"))
    args = ap.parse_args()
    deadline = time.monotonic() + args.deadline

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "ldmkit.db"
        secret, who = Keys(open_store(str(db))).create("bench", "viewer")
        wrong = secret[:-1] + ("A" if secret[-1] != "A" else "B")
        port = free_port()
        proc = start_process(db, port, "--model", "fashion-mnist", threads=1)
        url = f"http://127.0.0.1:{port}"
        try:
            # --- alone ---
            t_end = time.monotonic() + 2
            idle = probe(url, "/healthz", lambda: time.monotonic() > t_end)
            t_end = time.monotonic() + 2
            valid_idle = probe(url, "/v1/models", lambda: time.monotonic() > t_end, key=secret)
            # --- during the flood (from another process, so the probes here measure the server alone) ---
            results = multiprocessing.Queue()
            attacker = multiprocessing.Process(
                target=flood, args=(url, f"Bearer {wrong}", args.requests, args.clients, results)
            )
            attacker.start()
            done = lambda: not attacker.is_alive() or time.monotonic() > deadline  # noqa: E731
            during: list[float] = []
            prober = threading.Thread(target=lambda: during.extend(probe(url, "/healthz", done)))
            prober.start()
            valid_during = probe(url, "/v1/models", done, key=secret, gap=0.05)
            prober.join()
            attacker.join(max(1.0, deadline - time.monotonic()))
            if attacker.is_alive():
                attacker.terminate()
                raise SystemExit(f"the flood did not end within --deadline {args.deadline:g} s")
            flooded = results.get(timeout=10)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    rows = [
        ("GET /healthz, alone", summary(idle)),
        ("GET /v1/models, valid key, alone", summary(valid_idle)),
        ("GET /healthz, during the flood", summary(during)),
        ("GET /v1/models, valid key, during the flood", summary(valid_during)),
    ]
    print(f"\n{'what':<46} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for what, s in rows:
        print(f"{what:<46} {s['n']:>5} {s['p50_ms']:>8.1f} {s['p99_ms']:>8.1f} {s['max_ms']:>8.1f}")
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted(flooded["statuses"].items()))
    print(
        f"\nflood: {args.requests} wrong-secret requests for key id {who.key_id} from {args.clients} clients in "
        f"{flooded['seconds']:.1f} s; answers {statuses}"
    )
    ok = summary(during)["p99_ms"] < 50
    print(f"/healthz p99 during the flood under 50 ms: {ok}  (load average {os.getloadavg()[0]:.1f})")
    result = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
        "load_average": os.getloadavg(),  # other work on the machine during the run
        "requests": args.requests,
        "clients": args.clients,
        "flood_seconds": flooded["seconds"],
        "flood_statuses": {str(k): v for k, v in flooded["statuses"].items()},
        "rows": [{"what": what, **s} for what, s in rows],
        "healthz_p99_under_50ms": ok,
    }
    write_json(args.out, result)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
