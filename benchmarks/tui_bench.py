"""Start-up and responsiveness of the terminal workbench, with Textual's own import as the floor.

- first paint: ``python -m workbench`` runs in a pseudo-terminal of 80x24 with
  ``WORKBENCH_FIRST_PAINT_FILE`` set; the app writes ``time.time()`` there after
  its first screen's first refresh (``WorkbenchApp._painted``). Launch to that
  time, five launches, median and max; the app then gets ctrl+q (SIGTERM if it
  lingers). Its worker is the real one, importing torch beside the UI as it
  does for a user. Baseline: launch to exit of ``python -c "import textual.app"``,
  what any Textual app pays before it can draw.
- key to paint: the app in ``run_test`` (headless, 80x24) on a fake worker,
  with its own history of 40 finished runs (never the user's). A key's latency
  runs from just before the key event is handed to the app (as the terminal
  driver would) to the end of the compositor update (``App._display``: the
  frame is rendered and handed to the driver; headless, nothing is written)
  that completes what the key must change on the terminal:
  - switch screen (6/4): keys 6 and 4 switch between History and Run, 200
    presses 50 ms apart, after two visits to each (a screen's first visit
    mounts it, its second refreshes Textual's stylesheet once). Done when every
    cell of the new screen has been drawn since the key: Textual first sends
    what its layout changed (a footer line, say), the rest in later frames.
  - table cursor (down/up): the History table focused, down 5 rows then up 5,
    200 presses 50 ms apart. Done when the two table lines the move changes
    have been drawn.
  Each once with the worker idle (the baseline) and once while it streams
  progress events at 1,000 per second into the UI (which records them in the
  history, as it does for a run). Also: the events per second the UI applied
  while the keys were pressed.

The RSS column is the UI process's own peak: at its first paint for the
launches (its worker's memory is not counted), over the whole run for the keys.

Every measurement runs in its own process.

    python benchmarks/tui_bench.py                  # about a minute and a half on two cores
    python benchmarks/tui_bench.py --launches 10 --presses 400 --json out.json

Targets: first paint under 1.0 s; p99 key to paint under 50 ms at 1,000 events/s (both kinds of key).
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import resource
import shlex
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time

TARGET_FIRST_PAINT_S, TARGET_P99_MS = 1.0, 50.0
KEYS = (("6", "history"), ("4", "run"))
CURSOR_ROWS = 5  # a cursor run moves down this many rows, then up, and again
HISTORY_RUNS = 40  # runs in the history the key runs start with


def _pty_child(argv: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    """Start ``argv`` on a fresh 80x24 pseudo-terminal whose output is read and dropped."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)

    def drain() -> None:  # a full terminal buffer would stall the child's writes
        try:
            while os.read(master, 65536):
                pass
        except OSError:
            pass

    threading.Thread(target=drain, daemon=True).start()
    return proc, master


def _reap(proc: subprocess.Popen, timeout: float | None = None) -> float | None:
    """Wait up to ``timeout`` seconds (None: for ever) for the child; its peak RSS in MiB, None if it still runs."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, 0 if deadline is None else os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_maxrss / 1024
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def launch_floor() -> dict:
    """Seconds from launch to exit of ``python -c "import textual.app"`` in a terminal."""
    t0 = time.time()
    proc, master = _pty_child([sys.executable, "-c", "import textual.app"], dict(os.environ))
    rss = _reap(proc)
    seconds = time.time() - t0
    os.close(master)
    return {"seconds": seconds, "rss_mib": rss}


def launch_first_paint(home: str) -> dict:
    """Seconds from launch of ``python -m workbench`` to its first painted screen."""
    mark = os.path.join(home, "first-paint")
    if os.path.exists(mark):
        os.remove(mark)
    env = {**os.environ, "WORKBENCH_HOME": os.path.join(home, "data"), "XDG_CONFIG_HOME": os.path.join(home, "config"),
           "WORKBENCH_FIRST_PAINT_FILE": mark, "TERM": "xterm-256color", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    proc, master = _pty_child([sys.executable, "-m", "workbench"], env)
    try:
        deadline = time.monotonic() + 60
        while not (os.path.exists(mark) and open(mark).read().strip()):
            if time.monotonic() > deadline:
                raise SystemExit("the workbench did not paint within 60 s")
            time.sleep(0.005)
        painted = float(open(mark).read())
        # the UI process's own peak so far (wait4 would add its worker's, which imports torch)
        with open(f"/proc/{proc.pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
        os.write(master, b"\x11")  # ctrl+q
        ended = _reap(proc, timeout=15)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGTERM)
            _reap(proc)
        os.close(master)
    return {"seconds": painted - t0, "rss_mib": rss, "quit_cleanly": ended is not None}


class Drawn:
    """The terminal cells the compositor has drawn since a key, against the cells the key must change."""

    def __init__(self):
        self.screen, self.lines = None, {}  # the screen expected, and per line y: 1 for each cell still to draw

    def expect(self, screen_id: str, lines: dict[int, tuple[int, int]]) -> None:
        """Wait for the cells ``lines`` ({y: (x1, x2)}, x2 exclusive) of the screen ``screen_id``."""
        self.screen = screen_id
        self.lines = {y: bytearray(x1) + bytearray(b"\1" * (x2 - x1)) for y, (x1, x2) in lines.items()}

    def drawn(self, screen_id: str, update) -> bool:
        """Record one compositor update; True when it completes what is expected."""
        if self.screen is None or screen_id != self.screen or update is None:
            return False
        region = getattr(update, "region", None)  # LayoutUpdate: a whole region; ChopsUpdate: spans of lines
        spans = [(y, region.x, region.right) for y in range(region.y, region.bottom)] if region else update.spans
        for y, x1, x2 in spans:
            line = self.lines.get(y)
            if line is not None:
                line[x1:x2] = bytes(len(line[x1:x2]))
        if any(any(line) for line in self.lines.values()):
            return False
        self.screen = None
        return True


def _seed_history(runs: int) -> None:
    """``runs`` finished runs in the history at WORKBENCH_HOME, so History lists a screenful and more."""
    from workbench.history import History
    from workbench.spec import load_preset

    spec = load_preset("quickstart").to_dict()
    with History() as history:
        for i in range(runs):
            run_id, sparsity = f"bench-{i:03d}", 0.1 + 0.8 * i / runs
            history.create_run(run_id, spec, name=f"bench {i}", model="demo")
            for phase, ppl in (("before", 30.0), ("after", 30.0 * (1 + 4 * sparsity ** 2))):
                history.add_event(run_id, {"type": "metric", "name": "perplexity", "dataset": "wikitext2",
                                           "phase": phase, "value": ppl, "seqlen": 256, "windows": 40})
            history.finish_run(run_id, {"steps": [{"label": f"wanda {sparsity:.0%}", "sparsity": sparsity}]})


async def _key_latency(what: str, stream: int, rate: float, presses: int, interval: float) -> dict:
    from textual import events
    from textual.widgets import DataTable

    from workbench.screens.app import WorkbenchApp
    from workbench.screens.config import Config
    from workbench.screens.session import Backend, Session

    worker = [sys.executable, "-m", "workbench", "worker", "--fake", "--fake-delay", "0"]
    if stream:
        worker += ["--fake-stream", str(stream), "--fake-rate", str(rate)]
    app = WorkbenchApp(Session("quickstart", Backend(worker_command=shlex.join(worker))), config=Config())
    drawn, done = Drawn(), asyncio.Event()
    painted = {"time": 0.0}
    display = app._display

    def recorded(screen, renderable) -> None:
        display(screen, renderable)
        if drawn.drawn(screen.id, renderable):
            painted["time"] = time.perf_counter()
            done.set()

    app._display = recorded
    latencies, job, by = [], None, []
    async with app.run_test(size=(80, 24)) as pilot:
        async def until(condition, label: str, timeout: float = 60.0) -> None:
            deadline = time.monotonic() + timeout
            while not condition():
                if time.monotonic() > deadline:
                    raise SystemExit(f"timed out waiting for {label}")
                await asyncio.sleep(0.01)

        await until(lambda: any(w.status == "ready" for w in app.state.workers.values()), "the worker")
        if stream:
            job = await app.submit("run", app.session.spec().to_dict(), "stream")
            await until(lambda: job.events > 0, "the first event")

        def press(key: str) -> None:
            """Hand the key to the app the way the terminal driver does (and nothing more)."""
            event = events.Key(key, key if len(key) == 1 else None)
            event.set_sender(app)
            app._driver.send_message(event)

        # warm-up: the first two visits of a screen do once what is not a key's cost: mounting it, and
        # Textual's refresh of the stylesheet (a screen mounted by a mode switch is marked as needing one)
        for key, mode in KEYS * 2:
            await pilot.press(key)
            await until(lambda: app.screen.id == f"screen-{mode}", f"key {key} to show {mode}")
            await pilot.pause(0.5)  # and the screen's own first repaints
        if what == "cursor":
            await pilot.press("6")
            await until(lambda: app.screen.id == "screen-history", "History")
            table = app.screen.query_one("#history-table", DataTable)
            await until(lambda: table.row_count >= CURSOR_ROWS + 1, "the history's runs")
            table.focus()
            table.move_cursor(row=0)
            await pilot.pause()
        width, height = app.size
        start = time.perf_counter()
        for i in range(presses):
            if what == "cursor":  # down CURSOR_ROWS times, then up as many, within the rows on screen
                key = "down" if (i // CURSOR_ROWS) % 2 == 0 else "up"
                row = table.cursor_row
                top = table.content_region.y + table.header_height - round(table.scroll_y)
                new = row + (1 if key == "down" else -1)
                x1, x2 = table.content_region.x, table.content_region.right
                drawn.expect("screen-history", {top + row: (x1, x2), top + new: (x1, x2)})
                by.append(key)
            else:
                key, mode = KEYS[i % 2]
                drawn.expect(f"screen-{mode}", {y: (0, width) for y in range(height)})
                by.append(mode)
            done.clear()
            t0 = time.perf_counter()
            press(key)
            try:
                await asyncio.wait_for(done.wait(), 10.0)
            except asyncio.TimeoutError:
                raise SystemExit(f"key {key} was not painted within 10 s") from None
            latencies.append(painted["time"] - t0)
            wait = start + (i + 1) * interval - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
        loop_s = time.perf_counter() - start
        during = job is not None and job.active
        # the UI's intake while the keys were pressed; the app's exit then stops the worker mid-stream
        applied = job.events / (time.time() - job.started) if job is not None and job.started else None
    per_key = {k: statistics.median(x * 1000 for x, b in zip(latencies, by) if b == k) for k in dict.fromkeys(by)}
    ms = sorted(x * 1000 for x in latencies)
    pick = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]  # noqa: E731
    return {"presses": len(ms), "p50_ms": pick(0.50), "p99_ms": pick(0.99), "max_ms": ms[-1], "events_per_s": applied,
            "stream_outlasted_presses": during, "loop_s": loop_s, "p50_ms_by_key": per_key,
            "latencies_ms": [round(x * 1000, 2) for x in latencies],
            "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _in_own_process(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"measurement {args} failed:\n{out.stdout}{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=5, help="launches for the first-paint median")
    parser.add_argument("--presses", type=int, default=200, help="key presses per latency run")
    parser.add_argument("--rate", type=float, default=1000, help="progress events per second during the key presses")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--one", nargs="+", help=argparse.SUPPRESS)  # one measurement, in this process
    args = parser.parse_args()
    interval = 0.05
    if args.one:
        how, *rest = args.one
        if how == "keys":
            what, stream = rest[0], int(rest[1])
            with tempfile.TemporaryDirectory() as home:  # the keys' own history, not the user's
                os.environ["WORKBENCH_HOME"] = home
                _seed_history(HISTORY_RUNS)
                print(json.dumps(asyncio.run(_key_latency(what, stream, args.rate, args.presses, interval))))
        return

    with tempfile.TemporaryDirectory() as home:
        floor = [launch_floor() for _ in range(args.launches)]
        paint = [launch_first_paint(home) for _ in range(args.launches)]
    # a stream that outlasts the presses even when keys are slow; it is stopped after the last one
    stream = int(args.rate * (args.presses * interval * 3 + 10))
    keys = {(what, busy): _in_own_process("keys", what, str(stream if busy else 0), "--presses", str(args.presses),
                                          "--rate", str(args.rate))
            for what in ("switch", "cursor") for busy in (False, True)}

    def launches(label: str, runs: list[dict], base: float) -> dict:
        secs = [r["seconds"] * 1000 for r in runs]
        median = statistics.median(secs)
        return {"label": label, "n": len(runs), "p50_ms": median, "p99_ms": None, "max_ms": max(secs),
                "events_per_s": None, "ratio": median / base, "cpu_rss_gib": max(r["rss_mib"] for r in runs) / 1024}

    base = statistics.median(r["seconds"] * 1000 for r in floor)
    rows = [launches("launch to exit: import textual.app (baseline)", floor, base),
            launches("launch to first paint: workbench", paint, base)]
    for what, name in (("switch", "switch screen (6/4)"), ("cursor", "table cursor (down/up)")):
        idle = keys[what, False]
        for busy, label in ((False, f"{name}, worker idle (baseline)"), (True, f"{name}, {args.rate:g} events/s")):
            r = keys[what, busy]
            rows.append({"label": label, "n": r["presses"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
                         "max_ms": r["max_ms"], "events_per_s": r["events_per_s"],
                         "ratio": r["p99_ms"] / idle["p99_ms"], "cpu_rss_gib": r["rss_mib"] / 1024})

    from common import RATIO_AND_MEMORY, print_table

    opt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    print_table(rows, [
        ("measurement", "<46", lambda r: r["label"]),
        ("n", ">4", lambda r: str(r["n"])),
        ("p50 ms", ">8", lambda r: f"{r['p50_ms']:.1f}"),
        ("p99 ms", ">8", lambda r: opt(r["p99_ms"], ".1f")),
        ("max ms", ">8", lambda r: f"{r['max_ms']:.1f}"),
        ("events/s", ">9", lambda r: opt(r["events_per_s"], ",.0f")),
        *RATIO_AND_MEMORY,
    ])
    print("(launch rows: the median and the ratio of medians; key rows: the ratio of p99s to the idle row above)")
    for (what, busy), r in keys.items():
        print(f"p50 ms by key, {what}, {'streaming' if busy else 'idle'}: "
              + ", ".join(f"{k} {v:.1f}" for k, v in r["p50_ms_by_key"].items()))
    if not all(r["quit_cleanly"] for r in paint):
        print("note: a launch did not quit on ctrl+q within 15 s and was sent SIGTERM")
    if not all(r["stream_outlasted_presses"] for (_, busy), r in keys.items() if busy):
        print("note: an event stream ended before the last key press")
    first = rows[1]["p50_ms"] / 1000
    verdict = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    print(f"target first paint < {TARGET_FIRST_PAINT_S:g} s: {first:.2f} s {verdict(first < TARGET_FIRST_PAINT_S)}")
    for what in ("switch", "cursor"):
        p99 = keys[what, True]["p99_ms"]
        print(f"target p99 < {TARGET_P99_MS:g} ms at {args.rate:g} events/s, {what}: {p99:.1f} ms "
              f"{verdict(p99 < TARGET_P99_MS)}")
    if args.json:
        runs = {f"keys_{what}_{'streaming' if busy else 'idle'}": r for (what, busy), r in keys.items()}
        with open(args.json, "w") as f:
            json.dump({"launch_floor": floor, "first_paint": paint, **runs}, f, indent=2)


if __name__ == "__main__":
    main()
