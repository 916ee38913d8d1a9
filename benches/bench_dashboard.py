"""The dashboard's answers while Python threads spin, against Python's ``http.server`` in the same
process, in one run.

A coordinator serves its dashboard (``OperationsCoordinator.serve``) and a ``ThreadingHTTPServer``
serves a small JSON reply; 4 Python threads spin; a client in another process (a client in this one
would itself wait for the GIL) times ``--n`` requests to ``/metrics``, ``/api/v1/snapshot`` and the
``http.server`` route, one connection each. Goal: the dashboard's p95 under 20 ms.

Run: ``python benches/bench_dashboard.py [--n 60] [--spinners 4] [--json out.json]``
"""

from __future__ import annotations

import argparse
import http.server
import json
import subprocess
import sys
import threading

from _common import dump, machine, percentile, table, verdict

from tokengate import OperationsCoordinator, task_token_guard

CLIENT = r"""
import http.client, json, sys, time
host, port, token, path, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
seen = []
for _ in range(n):
    t0 = time.perf_counter()
    c = http.client.HTTPConnection(host, port, timeout=10)
    c.request("GET", path, headers={"Authorization": "Bearer " + token})
    r = c.getresponse()
    r.read()
    c.close()
    seen.append((time.perf_counter() - t0) * 1e3)
print(json.dumps(seen))
"""


class Small(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"ok": 1}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@task_token_guard(operation_type="bench_dashboard")
def noop(x: int) -> int:
    return x


def spin(stop: threading.Event) -> None:
    while not stop.is_set():
        pass


def timed(port: int, token: str, path: str, n: int) -> list[float]:
    out = subprocess.run(
        [sys.executable, "-c", CLIENT, "127.0.0.1", str(port), token, path, str(n)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    samples: list[float] = json.loads(out)
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--spinners", type=int, default=4)
    ap.add_argument("--json")
    args = ap.parse_args()
    with OperationsCoordinator() as c:
        for i in range(1000):
            noop(i)
        server = c.serve()
        baseline = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Small)
        threading.Thread(target=baseline.serve_forever, daemon=True).start()
        stop = threading.Event()
        spinners = [threading.Thread(target=spin, args=(stop,)) for _ in range(args.spinners)]
        for t in spinners:
            t.start()
        try:
            results = {
                "tokengate /metrics": timed(server.port, str(server.token), "/metrics", args.n),
                "tokengate /api/v1/snapshot": timed(server.port, str(server.token), "/api/v1/snapshot", args.n),
                "http.server, same process": timed(baseline.server_address[1], "", "/", args.n),
            }
        finally:
            stop.set()
            for t in spinners:
                t.join()
            baseline.shutdown()
            server.stop()
    rows = []
    for name, seen in results.items():
        p50, p95 = percentile(seen, 50), percentile(seen, 95)
        goal = verdict(p95 < 20) if name.startswith("tokengate") else "baseline"
        rows.append((name, f"{p50:.2f}", f"{p95:.2f}", f"{max(seen):.2f}", goal))
    print(f"{args.spinners} Python threads spinning, {args.n} requests each, client in another process")
    print(table(rows, ("server", "p50 ms", "p95 ms", "max ms", "p95 < 20 ms")))
    dump(args.json, {"machine": machine(), "spinners": args.spinners, "ms": results})


if __name__ == "__main__":
    main()
