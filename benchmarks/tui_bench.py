"""Start-up and responsiveness of the terminal workbench, with Textual's own import as the floor.

- first complete screen: ``python -m workbench`` runs in a pseudo-terminal of
  80x24 whose output goes through a small terminal emulator (``Screen`` below:
  cursor moves, erases, text; styles ignored), as a user's terminal would
  show it. The time runs from just before the process is started to the
  output that completes the first screen: the screen bar, the Run screen's
  "Ready to run" with its key, the worker line and the key bar, all on the
  emulated screen at once (Textual's first frames can be partial). Five
  launches, median and max; the app then gets ctrl+q (SIGTERM if it lingers).
  Its worker is the real one, importing torch beside the UI as it does for a
  user. Also the time of Textual's own first refresh (``WORKBENCH_FIRST_PAINT_FILE``,
  written by ``WorkbenchApp._painted``), for comparison. Baseline: launch to
  exit of ``python -c "import textual.app"``, what any Textual app pays before
  it can draw.
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

Targets: the first complete screen under 1.0 s; p99 key to paint under 50 ms at 1,000 events/s (both kinds of key).
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import fcntl
import json
import os
import re
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
# what the first complete screen of ``workbench`` shows: (row, text) with row -1 the last; "*" anywhere in the body
COMPLETE = ((0, "7 Presets"), ("*", "Ready to run"), ("*", "to run it."), (-2, "●"), (-1, "palette"))
KEYS = (("6", "history"), ("4", "run"))
CURSOR_ROWS = 5  # a cursor run moves down this many rows, then up, and again
HISTORY_RUNS = 40  # runs in the history the key runs start with


class Screen:
    """Enough of a terminal to tell what it shows: text at the cursor, cursor moves, erases; styles are ignored."""

    CONTROL = re.compile(r"\x1b\[([0-?]*)([ -/]*)([@-~])|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1bP[^\x1b]*\x1b\\"
                         r"|\x1b[()][0-9A-Za-z]|\x1b[=>78DEM]|[\r\n\b\x07]")

    def __init__(self, width: int = 80, height: int = 24):
        self.width, self.height = width, height
        self.rows = [[" "] * width for _ in range(height)]
        self.x = self.y = 0
        self._decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
        self._pending = ""  # an escape sequence cut at the end of a read

    def feed(self, data: bytes) -> None:
        text = self._pending + self._decode(data)
        self._pending = ""
        pos = 0
        while pos < len(text):
            match = self.CONTROL.search(text, pos)
            escape = text.find("\x1b", pos)
            if escape != -1 and (match is None or escape < match.start()):
                self._write(text[pos:escape])  # an escape sequence that is not complete yet
                self._pending = text[escape:]
                return
            end = match.start() if match else len(text)
            self._write(text[pos:end])
            if match is None:
                return
            self._control(match)
            pos = match.end()

    def _write(self, text: str) -> None:
        for ch in text:
            if self.x >= self.width:
                self.x, self.y = 0, min(self.height - 1, self.y + 1)
            self.rows[self.y][self.x] = ch
            self.x += 1

    def _control(self, match) -> None:
        token = match.group(0)
        if token == "\r":
            self.x = 0
        elif token == "\n":
            self.y = min(self.height - 1, self.y + 1)
        elif token == "\b":
            self.x = max(0, self.x - 1)
        elif match.group(3):
            args = [int(a) if a.isdigit() else 0 for a in match.group(1).lstrip("?<=>").split(";")] if match.group(1) else []
            final = match.group(3)
            if final in "Hf":
                self.y = min(self.height, max(1, args[0] if args else 1)) - 1
                self.x = min(self.width, max(1, args[1] if len(args) > 1 else 1)) - 1
            elif final == "J" and (args[:1] or [0])[0] == 2:
                self.rows = [[" "] * self.width for _ in range(self.height)]
            elif final == "K":
                mode = (args[:1] or [0])[0]
                row = self.rows[self.y]
                start, stop = {0: (self.x, self.width), 1: (0, self.x + 1), 2: (0, self.width)}.get(mode, (0, 0))
                row[start:stop] = [" "] * (stop - start)
            elif final == "G":
                self.x = min(self.width, max(1, args[0] if args else 1)) - 1
            elif final == "C":
                self.x = min(self.width - 1, self.x + (args[0] if args else 1))
            elif final == "h" and match.group(1) in ("?1049", "?47"):
                self.rows = [[" "] * self.width for _ in range(self.height)]

    def lines(self) -> list[str]:
        return ["".join(row) for row in self.rows]

    def shows(self, wanted=COMPLETE) -> bool:
        lines = self.lines()
        body = "\n".join(lines[1:-2])
        return all((text in body) if row == "*" else (text in lines[row]) for row, text in wanted)


def _pty_child(argv: list[str], env: dict[str, str], screen: "Screen | None" = None,
               on_complete=None) -> tuple[subprocess.Popen, int]:
    """Start ``argv`` on a fresh 80x24 pseudo-terminal whose output is read (into ``screen``, with ``on_complete``
    called with the time of the output that completed the first screen) and otherwise dropped."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)

    def drain() -> None:  # a full terminal buffer would stall the child's writes
        done = False
        try:
            while True:
                data = os.read(master, 65536)
                if not data:
                    break
                if screen is not None and not done:
                    now = time.time()
                    screen.feed(data)
                    if screen.shows():
                        done = True
                        on_complete(now)
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
    """Seconds from launch of ``python -m workbench`` to its first complete screen on the (emulated) terminal."""
    mark = os.path.join(home, "first-paint")
    if os.path.exists(mark):
        os.remove(mark)
    env = {**os.environ, "WORKBENCH_HOME": os.path.join(home, "data"), "XDG_CONFIG_HOME": os.path.join(home, "config"),
           "WORKBENCH_FIRST_PAINT_FILE": mark, "TERM": "xterm-256color", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    screen, complete = Screen(), {}
    t0 = time.time()
    proc, master = _pty_child([sys.executable, "-m", "workbench"], env, screen, lambda t: complete.setdefault("t", t))
    try:
        deadline = time.monotonic() + 60
        while "t" not in complete or not (os.path.exists(mark) and open(mark).read().strip()):
            if time.monotonic() > deadline:
                raise SystemExit("the workbench did not show its first screen within 60 s:\n" + "\n".join(screen.lines()))
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
    return {"seconds": complete["t"] - t0, "first_refresh_s": painted - t0, "rss_mib": rss, "quit_cleanly": ended is not None}


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
            launches("launch to first complete screen: workbench", paint, base),
            launches("launch to Textual's first refresh: workbench", [{**r, "seconds": r["first_refresh_s"]} for r in paint], base)]
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
    print(f"target first complete screen < {TARGET_FIRST_PAINT_S:g} s: {first:.2f} s {verdict(first < TARGET_FIRST_PAINT_S)}")
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
