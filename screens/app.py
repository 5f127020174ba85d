"""The Textual app: ``workbench`` with no arguments opens it.

A thin shell: it holds the setup being edited (``Session``), the workers'
link (``WorkerBridge``) and what they reported (``UIState``); screens, one
module each, render that state. Worker updates change plain data as they
arrive; a repaint is scheduled at most every ``REPAINT`` seconds and
published on ``changed`` to the shown screen, which is how a flood of
progress events stays cheap. The UI process never imports torch.
"""

from __future__ import annotations

import importlib
import os

from textual.app import App
from textual.binding import Binding
from textual.signal import Signal

from workbench.errors import UserError, WorkbenchError

from .bridge import WorkerBridge
from .commands import WorkbenchCommands
from .config import Config, load_config
from .session import SCREEN_ORDER, Backend, Session
from .state import JobState, UIState
from .widgets import SCREENS, ConfirmModal, HelpModal, MessageModal, binding_rows

REPAINT = 0.05  # seconds: the most often the shown screen repaints from new worker data

# mode -> "module:class", imported when first shown so the first paint stays fast
SCREEN_CLASSES = {
    "model": "workbench.screens.model:ModelScreen",
    "calibration": "workbench.screens.calibration:CalibrationScreen",
    "compression": "workbench.screens.compression:CompressionScreen",
    "run": "workbench.screens.run:RunScreen",
    "evaluate": "workbench.screens.evaluate:EvaluateScreen",
    "history": "workbench.screens.history:HistoryScreen",
    "presets": "workbench.screens.presets:PresetsScreen",
}


def _factory(path: str):
    def make():
        module, _, name = path.partition(":")
        return getattr(importlib.import_module(module), name)()

    return make


class WorkbenchApp(App):
    TITLE = "workbench"
    CSS_PATH = "workbench.tcss"
    MODES = {name: _factory(path) for name, path in SCREEN_CLASSES.items()}
    COMMANDS = App.COMMANDS | {WorkbenchCommands}
    BINDINGS = [
        *(Binding(key, f"switch('{name}')", title, show=False, id=f"screen.{name}") for name, title, key in SCREENS),
        Binding("ctrl+r", "run", "Run", priority=True, id="run.start"),
        Binding("ctrl+n", "guide_next", "Next", show=False, priority=True, id="guide.next"),
        Binding("ctrl+b", "guide_back", "Back", show=False, priority=True, id="guide.back"),
        Binding("escape", "unfocus", "Leave the field (or end a guided walk)", show=False, id="app.unfocus"),
        Binding("f1", "help", "Keys of this screen", show=False, priority=True, id="app.help"),
        Binding("question_mark", "help", "Help", id="app.help_key"),
        Binding("ctrl+q", "quit", "Quit (asks first when work would be lost)", show=False, priority=True, id="app.quit"),
    ]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (30, "-tall")]  # a class on each screen: -short up to 29 rows

    def __init__(self, session: Session | None = None, *, preset: str = "quickstart", backend: Backend | None = None,
                 start_screen: str = "run",
                 history_path: str | None = None, client_options: dict | None = None, config: Config | None = None,
                 start_worker: bool = True):
        super().__init__()
        self.config = config or load_config()
        self.session = session or Session(preset, backend or self.config.backend)
        self.state = UIState()
        self.history_path = history_path
        self.bridge = WorkerBridge(self.state, self.session.backend, history_path=history_path,
                                   on_change=self.schedule_repaint, client_options=client_options)
        self.changed: Signal[set[str]] = Signal(self, "changed")
        self.start_screen, self.start_worker = start_screen, start_worker
        self._repaint_pending = False
        self._modes_shown: set[str] = set()
        self._shown_before = False
        self.first_paint: float | None = None  # perf_counter() of the first screen's first refresh

    # ---------------------------------------------------------------- lifecycle
    def on_mount(self) -> None:
        if self.config.keymap:
            self.set_keymap(self.config.keymap)
        if self.start_worker:
            self.bridge.announce()
        self.switch_mode(self.start_screen)
        self.call_after_refresh(self._painted)
        if self.config.problem:
            self.show_error(*self.config.problem, title="Settings")

    def _start_workers_now(self) -> None:
        if self.start_worker and not self.bridge.started:
            self.run_worker(self._start_workers(), group="workers", exit_on_error=False)

    def _painted(self) -> None:
        import gc
        import time

        self.first_paint = time.perf_counter()
        gc.freeze()  # what exists at start-up lives as long as the app: keep it out of full collections
        # the worker starts once the first screen is up: a real one imports torch, and on a small machine that
        # import would hold up the first screen for as long as it takes; a job submitted before waits for it
        self._start_workers_now()
        mark = os.environ.get("WORKBENCH_FIRST_PAINT_FILE")  # for the start-up benchmark
        if mark:
            with open(mark, "w") as f:
                f.write(f"{time.time()}\n")

    async def _start_workers(self) -> None:
        try:
            await self.bridge.start()
        except WorkbenchError as exc:
            self.show_error(exc.message, exc.hint, title="The worker could not start")

    async def on_unmount(self) -> None:
        await self.bridge.close()

    # ---------------------------------------------------------------- screens
    def switch_mode(self, mode: str):
        self._shown_before = mode in self._modes_shown
        self._modes_shown.add(mode)
        try:
            return super().switch_mode(mode)
        finally:
            self._shown_before = False

    def delay_update(self, delay: float = 0.05) -> None:
        # Textual holds every frame for 50 ms at a mode switch, to hide a screen still being built. A screen shown
        # before is built: it is drawn at once, as Textual draws a screen uncovered when a pushed one pops.
        if not self._shown_before:
            super().delay_update(delay)

    # ---------------------------------------------------------------- state -> screens
    def schedule_repaint(self) -> None:
        if not self._repaint_pending:
            self._repaint_pending = True
            self.set_timer(REPAINT, self._repaint)

    def session_changed(self) -> None:
        """A screen changed the setup: others re-read it when they show."""
        self.session.touch()
        self.state.changed.add("session")
        self.schedule_repaint()

    def _repaint(self) -> None:
        self._repaint_pending = False
        changes = self.state.take_changes()
        for severity, message, hint in self.state.notices:
            self.notify(f"{message}\n{hint}" if hint else message, severity=severity, timeout=8)
        self.state.notices.clear()
        if changes:
            self.changed.publish(changes)

    # ---------------------------------------------------------------- helpers for screens
    def key_for(self, binding_id: str, default: str) -> str:
        """The key bound to ``binding_id`` (after the user's keymap), for on-screen hints."""
        keys = self._keymap.get(binding_id) if hasattr(self, "_keymap") else None
        return (keys or default).split(",")[0]

    def show_error(self, message: str, hint: str | None = None, title: str = "Something went wrong") -> None:
        self.push_screen(MessageModal(title, message, hint))

    def show_exception(self, exc: BaseException, title: str = "Something went wrong") -> None:
        if isinstance(exc, WorkbenchError):
            self.show_error(exc.message, exc.hint, title)
        else:
            self.show_error(f"{type(exc).__name__}: {exc}", "this is a bug; the details are in the worker's log", title)

    async def submit(self, kind: str, spec: dict | None = None, title: str = "") -> JobState | None:
        """Queue a job on the workers; on failure show why and return None."""
        try:
            return await self.bridge.submit(kind, spec=spec, title=title)
        except WorkbenchError as exc:
            self.show_exception(exc, "The job could not start")
            return None

    # ---------------------------------------------------------------- actions
    def action_switch(self, name: str) -> None:
        self.switch_mode(name)

    def action_unfocus(self) -> None:
        """Leave the focused field; with nothing focused, end a guided walk."""
        if self.screen.focused is not None:
            self.screen.set_focus(None)
        elif self.session.guide is not None:
            self.end_guide()

    def end_guide(self) -> None:
        self.session.guide = None
        self.state.changed.add("session")
        self.schedule_repaint()
        screen = self.screen
        if hasattr(screen, "_show_guide"):
            screen._show_guide()
        self.notify(f"guided walk ended; Presets ({self.key_for('screen.presets', '7')}) starts another", timeout=4)

    def action_help(self) -> None:
        """The keys of the shown screen (and the guided walk's note for it)."""
        if isinstance(self.screen, HelpModal):
            return
        screen = self.screen
        guide = self.session.guide
        note = guide.note(screen.NAME) if guide is not None and getattr(screen, "NAME", None) in SCREEN_ORDER else ""
        title = getattr(screen, "TITLE", "") or screen.id or "this screen"
        self.push_screen(HelpModal(title, binding_rows(screen), note))

    async def action_quit(self) -> None:
        """Quit, after asking when a job would stop or setup edits would be lost."""
        running = [j for j in self.state.jobs.values() if j.active]
        lost = []
        if running:
            what = ", ".join(f"{j.title} ({j.kind}, {j.progress():.0%} done)" for j in running[:3])
            lost.append(f"{len(running)} job(s) stop: {what}. Their events so far stay in History.")
        if self.session.edited:
            lost.append("The setup's edits are not saved as a preset (Presets: s saves them).")
        if not lost:
            self.exit()
            return

        def answer(yes: bool | None) -> None:
            if yes:
                self.exit()

        self.push_screen(ConfirmModal("Quit the workbench? " + " ".join(lost), "Quit", "Stay"), answer)

    def memory_findings(self) -> list:
        """What the worker's machine cannot hold of a run of the setup, or may not (``workbench.memory_estimate``):
        the model's sizes from its Inspect, else its config.json; the memory from the worker's report."""
        from workbench.memory_estimate import Machine, ModelSize, check, model_size

        s = self.session
        model = s.data.get("model") if isinstance(s.data.get("model"), dict) else {}
        nsamples, seqlen = s.get("calibration.nsamples", 128), s.get("calibration.seqlen")
        if not s.data.get("steps") or not isinstance(nsamples, int) or nsamples < 1:
            return []
        seqlen = seqlen if isinstance(seqlen, int) and seqlen > 1 else None
        worker = next((w for w in self.state.workers.values() if w.status == "ready"), None)
        machine = Machine.from_devices(worker.devices) if worker is not None else None
        device = str(model.get("device") or "auto")
        inspected = [j for j in self.state.jobs.values() if j.kind == "inspect" and j.status == "finished" and j.result
                     and (j.spec.get("model") or {}).get("name", "demo") == model.get("name", "demo")
                     and (j.spec.get("model") or {}).get("dtype", "auto") == model.get("dtype", "auto")]
        size = ModelSize.from_inspect(max(inspected, key=lambda j: j.submitted).result) if inspected else None
        if size is None:
            on_gpu = device.startswith("cuda") or (device == "auto" and bool(machine and machine.gpus))
            size = model_size(model, on_gpu)
        if size is None:
            return []
        eval_seqlen = s.get("evaluate.seqlen")
        return check(size, machine, nsamples=nsamples, seqlen=seqlen, device=device,
                     offload=s.get("calibration.offload_activations", False) is True,
                     eval_seqlen=eval_seqlen if isinstance(eval_seqlen, int) else None)

    async def action_run(self) -> None:
        """Run the current setup (after validating it, and checking the worker's machine can hold it)."""
        try:
            spec = self.session.spec()
        except UserError as exc:
            self.show_error(exc.message, exc.hint, "The setup is not valid yet")
            return
        cannot = [f for f in self.memory_findings() if f.level == "problem"]
        if cannot:
            self.show_error(f"{cannot[0].key}: {cannot[0].message}", cannot[0].hint, "The setup cannot run on this machine")
            return
        if self.bridge.busy():
            running = next(j for j in self.state.jobs.values() if j.active)
            self.notify(f"queued behind {running.title}; it starts when the worker is free", timeout=5)
        job = await self.submit("run", spec.to_dict(), title=spec.name)
        if job is not None:
            self.switch_mode("run")

    async def action_cancel(self) -> None:
        """Cancel the running job, after confirmation."""
        job = next((j for j in sorted(self.state.jobs.values(), key=lambda j: j.submitted) if j.active), None)
        if job is None:
            self.notify("nothing is running", timeout=3)
            return

        async def answer(yes: bool | None) -> None:
            if yes:
                await self.bridge.cancel(job.id)

        self.push_screen(ConfirmModal(f"Cancel {job.title}? The events so far stay in the history.", "Cancel it", "Keep running"),
                         answer)

    def action_guide_next(self) -> None:
        self._guide_move(+1)

    def action_guide_back(self) -> None:
        self._guide_move(-1)

    def _guide_move(self, offset: int) -> None:
        guide = self.session.guide
        if guide is None:
            return
        here = SCREEN_ORDER.index(self.current_mode) if self.current_mode in SCREEN_ORDER else guide.position
        guide.position = max(0, min(len(SCREEN_ORDER) - 1, here + offset))
        self.switch_mode(guide.screen)

    def open_compare(self) -> None:
        """Show History and compare the runs selected there."""
        self.switch_mode("history")
        self.call_after_refresh(lambda: getattr(self.screen, "action_compare", lambda: None)())

    def save_preset(self) -> None:
        """Ask for a file name and save the current setup there as a preset."""
        from .widgets import PromptModal

        problem = self.session.problem()
        if problem is not None:
            self.show_error(problem.message, problem.hint, "The setup is not valid yet")
            return

        def save(path: str | None) -> None:
            if not path:
                return
            try:
                written = self.session.save_preset(path)
            except WorkbenchError as exc:
                self.show_exception(exc, "The preset was not saved")
            except OSError as exc:
                self.show_error(f"cannot write {path}: {exc}", "pick a folder you can write to", "The preset was not saved")
            else:
                self.session_changed()
                self.session.saved_revision = self.session.revision
                self.notify(f"saved {written} as preset {self.session.run_name()!r}; run it headless with: "
                            f"workbench run {written}", timeout=8)

        default = f"{file_name(self.session.run_name())}.toml"
        self.push_screen(PromptModal("Save the setup as a preset file (its name becomes the preset's name):", default,
                                     required="the preset needs a file name"), save)

    def open_preset(self, name: str, guided: bool = True) -> bool:
        """Load a preset into the setup (a guided walk through the screens when ``guided``)."""
        try:
            self.session.load_preset(name, guided=guided)
        except WorkbenchError as exc:
            self.show_exception(exc, f"The preset {name} could not be opened")
            return False
        self.session_changed()
        if guided:
            self.switch_mode(SCREEN_ORDER[0])
        return True


def file_name(name: str) -> str:
    """``name`` as a file name: letters, digits, ``.``, ``-`` and ``_``; runs of anything else become one ``-``."""
    import re

    return re.sub(r"[^A-Za-z0-9._]+", "-", name).strip("-.") or "setup"


def main(backend: Backend | None = None, preset: str = "quickstart") -> int:
    """Open the app (UserError when the preset cannot be read)."""
    WorkbenchApp(preset=preset, backend=backend).run()
    return 0
