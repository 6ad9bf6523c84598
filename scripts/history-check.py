#!/usr/bin/env python3
"""Audit history read cold on the Kafka store, over HTTP.

Usage: scripts/history-check.py PROJECTS_BINARY BROKERS PORT [SECONDS]

Starts the projects service on the Kafka store (a fresh topic prefix, SQLite
views in a temp dir), creates 20 projects, lets 16 clients PATCH them for
SECONDS (default 4), restarts the service and times GET /projects/{id}/events
for five of them. Loopback only; every loop is bounded."""
import atexit, json, os, subprocess, sys, threading, time, urllib.request, random, tempfile
BIN, BROKERS, PORT = sys.argv[1], sys.argv[2], int(sys.argv[3])
SECONDS = float(sys.argv[4]) if len(sys.argv) > 4 else 4
work = tempfile.mkdtemp()
env = dict(os.environ, KES_LISTEN=f"127.0.0.1:{PORT}", KES_STORE=f"kafka://{BROKERS}?prefix=repro{int(time.time())}",
           KES_VIEW=f"sqlite://{work}/views.db", RUST_LOG="warn")
base = f"http://127.0.0.1:{PORT}"
running = []
# Whatever happens, no service is left running.
atexit.register(lambda: [p.kill() for p in running if p.poll() is None])
def start():
    p = subprocess.Popen([BIN], cwd=work, env=env, stdin=subprocess.DEVNULL)
    running.append(p)
    for _ in range(600):
        try:
            if urllib.request.urlopen(base + "/health", timeout=2).status == 200: return p
        except Exception: time.sleep(0.1)
    raise SystemExit("not ready")
def req(method, path, body=None, headers=None, timeout=30):
    data = json.dumps(body).encode() if body is not None else None
    r = urllib.request.Request(base + path, data=data, method=method, headers={"content-type": "application/json", **(headers or {})})
    with urllib.request.urlopen(r, timeout=timeout) as resp:
        return resp.status, dict(resp.headers), resp.read()
p = start()
ids = []
for i in range(20):
    s, h, _ = req("POST", "/projects", {"name": f"p{i}"})
    ids.append({k.lower(): v for k, v in h.items()}["location"].split("/")[-1])
stop = time.time() + SECONDS
count = [0]
failed = [0]
def client():
    while time.time() < stop:
        try:
            req("PATCH", f"/projects/{random.choice(ids)}", {"name": f"n{random.random()}"}); count[0] += 1
        except Exception:
            failed[0] += 1
ts = [threading.Thread(target=client) for _ in range(16)]
[t.start() for t in ts]; [t.join() for t in ts]
print(f"{count[0]} PATCHes acknowledged, {failed[0]} failed")
p.terminate(); p.wait()
p = start()
for path in ["/health", f"/projects/{ids[0]}", "/projects?page[size]=5"]:
    t = time.time()
    try:
        s, h, body = req("GET", path)
        print(f"GET {path}: {s} in {time.time()-t:.3f} s")
    except Exception as e:
        print(f"GET {path} failed after {time.time()-t:.1f} s: {e}")
for pid in ids[:5]:
    t = time.time()
    try:
        s, h, body = req("GET", f"/projects/{pid}/events")
        n = len(json.loads(body)["items"])
        print(f"GET /projects/{pid}/events: {n} events in {time.time()-t:.3f} s ({h.get('kes-consistency')})")
    except Exception as e:
        print(f"GET /projects/{pid}/events failed after {time.time()-t:.1f} s: {e}")
p.terminate(); p.wait()
