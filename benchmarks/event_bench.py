"""Event throughput and latency from a worker to the client, with a raw pipe reader as the baseline.

A fake worker (``workbench worker --fake --fake-stream N --fake-rate R``)
emits N progress events, flat out or R per second. Each is read two ways:

- baseline: a plain blocking loop reading the worker's stdout line by line
  and parsing the JSON (the least any client must do);
- client: ``workbench.backends.client.WorkerClient``, the asyncio client the
  TUI and headless runs use (protocol validation, event objects, per-job
  queues), with the events consumed from ``events(job)``.

Latency is receipt time minus the worker's send time (the ``t`` of each
message; same machine, same clock). Every measurement runs in its own
process so its peak memory is its own.

    python benchmarks/event_bench.py                      # 100,000 events flat out, 5,000 at 1,000/s
    python benchmarks/event_bench.py --events 200000 --paced 10000 --rate 1000 --json out.json

Targets: at least 20,000 events/s sustained; p99 under 20 ms at 1,000 events/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import time

TARGET_RATE, TARGET_P99_MS = 20_000, 20.0


def _worker_argv(events: int, rate: float) -> list[str]:
    return [sys.executable, "-m", "workbench", "worker", "--fake", "--fake-stream", str(events), "--fake-rate", str(rate)]


def _stats(receipts: list[float], sent: list[float], seconds: float) -> dict:
    delays = sorted((r - s) * 1000 for r, s in zip(receipts, sent))
    pick = lambda q: delays[min(len(delays) - 1, int(q * len(delays)))]  # noqa: E731
    return {"events": len(delays), "seconds": seconds, "rate": len(delays) / seconds if seconds else 0.0,
            "p50_ms": pick(0.50), "p99_ms": pick(0.99), "max_ms": delays[-1],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure_raw(events: int, rate: float) -> dict:
    """Baseline: blocking readline + json.loads on the worker's stdout."""
    proc = subprocess.Popen(_worker_argv(events, rate), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    job = {"v": 1, "seq": 1, "t": time.time(), "type": "run", "job": "bench", "spec": {}}
    proc.stdin.write(json.dumps(job).encode() + b"\n")
    proc.stdin.flush()
    receipts, sent = [], []
    for line in proc.stdout:
        now = time.time()
        message = json.loads(line)
        if message["type"] == "event":
            receipts.append(now)
            sent.append(message["t"])
        elif message["type"] in ("result", "error"):
            break
    proc.stdin.close()
    proc.wait()
    return _stats(receipts, sent, receipts[-1] - receipts[0])


async def _measure_client(events: int, rate: float) -> dict:
    from workbench.backends.client import WorkerClient
    from workbench.backends.transports import LocalTransport

    client = WorkerClient(LocalTransport(command=_worker_argv(events, rate)))
    await client.start()
    receipts, sent = [], []
    try:
        job = await client.submit("run", spec={})
        async for update in client.events(job):
            if update.kind == "event":
                receipts.append(time.time())
                sent.append(update.sent)
        if update.kind != "result":
            raise SystemExit(f"the fake worker failed: {update.data}")
    finally:
        await client.close()
    return _stats(receipts, sent, receipts[-1] - receipts[0])


def measure_client(events: int, rate: float) -> dict:
    return asyncio.run(_measure_client(events, rate))


def _in_own_process(how: str, events: int, rate: float) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", how, "--events", str(events), "--rate", str(rate)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000, help="events for the flat-out throughput runs")
    parser.add_argument("--paced", type=int, default=5_000, help="events for the paced latency runs")
    parser.add_argument("--rate", type=float, default=1_000, help="events per second of the paced runs")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--one", choices=("raw", "client"), help=argparse.SUPPRESS)  # one measurement, in this process
    args = parser.parse_args()
    if args.one:
        measure = measure_raw if args.one == "raw" else measure_client
        print(json.dumps(measure(args.events, args.rate)))
        return

    from rich.console import Console
    from rich.table import Table

    rows = []
    for label, events, rate in (("flat out", args.events, 0.0), (f"{args.rate:g} events/s", args.paced, args.rate)):
        raw = _in_own_process("raw", events, rate)
        client = _in_own_process("client", events, rate)
        rows.append((label, raw, client))
    table = Table(title="worker -> client events (fake worker; the raw pipe reader is the baseline)")
    for col in ("load", "reader", "events", "events/s", "p50 ms", "p99 ms", "max ms", "peak RSS MiB", "client / raw"):
        table.add_column(col, justify="right" if col not in ("load", "reader") else "left")
    for label, raw, client in rows:
        for name, r in (("raw pipe", raw), ("WorkerClient", client)):
            ratio = "" if r is raw else (f"{r['rate'] / raw['rate']:.2f}x rate" if label == "flat out"
                                          else f"{r['p99_ms'] / raw['p99_ms']:.2f}x p99")
            table.add_row(label, name, f"{r['events']:,}", f"{r['rate']:,.0f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
                          f"{r['max_ms']:.2f}", f"{r['peak_rss_mib']:.1f}", ratio)
    console = Console(width=max(Console().width, 120))
    console.print(table)
    flat, paced = rows[0][2], rows[1][2]
    verdict = lambda ok: "[green]met[/]" if ok else "[red]missed[/]"  # noqa: E731
    console.print(f"target >= {TARGET_RATE:,} events/s: {flat['rate']:,.0f} {verdict(flat['rate'] >= TARGET_RATE)}; "
                  f"target p99 < {TARGET_P99_MS:g} ms at {args.rate:g}/s: {paced['p99_ms']:.2f} ms "
                  f"{verdict(paced['p99_ms'] < TARGET_P99_MS)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({label: {"raw": raw, "client": client} for label, raw, client in rows}, f, indent=2)


if __name__ == "__main__":
    main()
