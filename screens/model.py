"""The Model screen: which model, how it loads, where the workers run, and what the model is.

Three tabs:

- Model: the bundled demo model, a local folder (typed, or picked with the
  folder browser) or a hub id; dtype, device and ``trust_remote_code``.
  Every edit goes to ``app.session`` at once; a problem shows under its field
  as it is typed, with the validator's message (and, when the worker runs on
  this machine, what loading would say about a missing folder).
- Backend: where the workers run (this machine, a worker per GPU or one with
  several, or ssh) and what each worker reported in its hello, live.
- Inspect: the worker loads the model and reports its shape, its layer 0
  linears and the memory a run needs.
"""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

from rich.markup import escape
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Button, Checkbox, Input, Label, Select, Static, TabbedContent, TabPane

from workbench.errors import UserError, WorkbenchError
from workbench.model_source import looks_like_path
from workbench.spec import DTYPES, spec_from_dict

from .base import WorkbenchScreen
from .browse import FolderModal, folder_note, local_model_problem
from .session import Backend
from .stepforms import problem_text
from .widgets import Check, ConfirmModal, Table, human_bytes

SOURCES = (("demo", "demo model"), ("local", "local folder"), ("hub", "hub id"))
NAME_PLACEHOLDER = {"local": "/path/to/model (a folder with config.json)", "hub": "org/name, e.g. meta-llama/Llama-2-7b-hf"}
# the field a validator message is about -> the widget whose problem line shows it
PROBLEM_FIELDS = (("model.dtype", "dtype"), ("model.device", "device"), ("model.trust_remote_code", "trust"))
TRUST_WARNING = "⚠ the worker will run Python code that comes with the model: turn this on only for models you trust"
BACKEND_HELP = ("local: a worker on this machine; ssh://[user@]host[:port]: on another (key authentication). "
                "GPUs: empty inherits CUDA_VISIBLE_DEVICES; 0,1 a worker per GPU; 0+1 one worker with both. "
                "No in-process backend here: the UI never loads torch (headless runs can).")


def source_kind(name: str) -> str:
    """``demo``, ``local`` or ``hub``: how a model name reads."""
    name = name.strip()
    if name in ("", "demo"):
        return "demo"
    return "local" if looks_like_path(name) else "hub"


def model_problem(session) -> UserError | None:
    """The first problem of ``[model]``: the validator's, then (worker on this machine) the folder's."""
    try:
        spec_from_dict({"model": copy.deepcopy(session.data.get("model", {}))})
    except UserError as exc:
        return exc
    if session.backend.where == "local":
        return local_model_problem(str(session.get("model.name", "demo")))
    return None


def backend_problem(where: str, gpus: str, command: str | None) -> UserError | None:
    """What is wrong with a backend choice, before any worker is stopped (None: it can start)."""
    from workbench.backends.transports import parse_backend, parse_gpus

    if where == "inprocess":
        return UserError("the in-process backend is for headless runs: the UI never loads torch itself",
                         "use local (a worker process on this machine) or ssh://HOST")
    try:
        parse_gpus(gpus)
        parse_backend(where, None, command)
        if command:
            shlex.split(command)
    except UserError as exc:
        return exc
    except ValueError as exc:  # shlex: an unclosed quote
        return UserError(f"the worker command {command!r} cannot be split into words: {exc}", "close its quotes")
    return None


def human_count(n: int | None) -> str:
    """``10,522,880 (10.5M)``."""
    if n is None:
        return "?"
    for size, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n:,} ({n / size:.1f}{unit})"
    return f"{n:,}"


def worker_text(w) -> str:
    """A worker's state and hello as markup lines."""
    dot = {"ready": "[green]●[/]", "dead": "[red]●[/]"}.get(w.status, "[yellow]●[/]")
    lines = [f"{dot} [b]{escape(w.name)}[/]: {w.status}" + (f" — {escape(w.message)}" if w.message else "")]
    hello = w.hello or {}
    if hello:
        versions = " · ".join(f"{k} {hello[k]}" for k in ("python", "torch", "transformers", "workbench") if hello.get(k))
        lines.append(f"  host {escape(str(hello.get('host', '?')))} · pid {hello.get('pid', '?')} · {versions}"
                     + (" · [yellow]fake[/]" if hello.get("fake") else ""))
    for d in w.devices:
        what = "CPU" if d.get("kind") == "cpu" else "GPU"
        name = escape(str(d.get("name") or "?"))
        lines.append(f"  {what} {name}: {human_bytes(d.get('free'))} free of {human_bytes(d.get('total'))}")
    return "\n".join(lines)


def memory_text(result: dict, session, devices: list[dict]) -> Text:
    """What a run of the setup needs (``workbench.memory_estimate``, as ``workbench validate`` computes it) and
    what of it the worker's machine cannot hold."""
    from workbench.memory_estimate import Machine, ModelSize, check, estimate

    size = ModelSize.from_inspect(result)
    text = Text("Memory a run needs\n", style="bold")
    if size is None:
        return text.append("the worker did not report the model's sizes", style="dim")
    nsamples, seqlen = session.get("calibration.nsamples", 128), session.get("calibration.seqlen")
    nsamples = nsamples if isinstance(nsamples, int) and nsamples > 0 else 128  # a value being typed may not be a size yet
    seqlen = seqlen if isinstance(seqlen, int) and seqlen > 1 else None
    offload = session.get("calibration.offload_activations", False) is True
    e = estimate(size, nsamples, seqlen, offload)
    for what, amount, note in e.rows():
        text.append(f"{what:<14}{human_bytes(amount):>10}  ", style="not bold")
        text.append(f"{note}\n", style="dim")
    device = str(result.get("device") or session.get("model.device", "auto"))
    findings = check(size, Machine.from_devices(devices), nsamples=nsamples, seqlen=seqlen, offload=offload,
                     device="cpu" if device == "cpu" else session.get("model.device", "auto"),
                     eval_seqlen=session.get("evaluate.seqlen"))
    for f in findings:
        mark, style = ("✗ cannot run: ", "bold red") if f.level == "problem" else ("⚠ ", "yellow")
        text.append(mark + f.message + "\n", style=style)
        if f.hint:
            text.append(f"  what to do: {f.hint}\n", style="dim")
    text.rstrip()
    return text


class ModelScreen(WorkbenchScreen):
    NAME = "model"
    TITLE = "Model"
    CSS_PATH = "model.tcss"
    BINDINGS = [
        Binding("ctrl+l", "inspect", "Inspect", priority=True, id="model.inspect"),
        Binding("ctrl+o", "browse", "Browse", priority=True, id="model.browse"),
    ]

    def __init__(self):
        super().__init__()
        self.kind = "demo"
        self.typed: dict[str, str] = {}  # what was typed per source kind, restored when it is chosen again
        self.restarting = False

    def compose_body(self) -> ComposeResult:
        # selects post Changed with their first value when mounted: it must be the setup's, not a default
        self.kind = source_kind(str(self.app.session.get("model.name", "demo")))
        dtype = self.app.session.get("model.dtype", "auto")
        dtype = dtype if dtype in DTYPES else Select.NULL  # blank for a value that is not a dtype (the validator names it)
        with TabbedContent(id="model-tabs"):
            with TabPane("Model", id="tab-model"):
                with VerticalScroll(classes="form", can_focus=False):  # its fields take the focus
                    yield from self._line("Source", Select([(t, k) for k, t in SOURCES], value=self.kind, allow_blank=False,
                                                           compact=True, id="model-source"))
                    browse = f"Browse ({self.app.key_for('model.browse', 'ctrl+o')})"
                    yield from self._line("Name", Input(compact=True, id="model-name"), Button(browse, compact=True, id="browse"))
                    yield Static("", id="model-note", classes="note")
                    yield Static("", id="problem-name", classes="problem")
                    yield from self._line("dtype", Select([(d, d) for d in DTYPES], value=dtype, prompt="?", compact=True,
                                                          id="model-dtype"))
                    yield Static("", id="problem-dtype", classes="problem")
                    yield from self._line("Device", Input(placeholder="auto | cpu | cuda | cuda:N", compact=True,
                                                          id="model-device"))
                    yield Static("", id="problem-device", classes="problem")
                    yield from self._line("", Check("trust_remote_code", compact=True, id="model-trust"))
                    yield Static("", id="problem-trust", classes="problem")
                    yield Static(TRUST_WARNING, id="trust-warning", classes="warning")
            with TabPane("Backend", id="tab-backend"):
                with VerticalScroll(classes="form", can_focus=False):  # its fields take the focus
                    yield from self._line("Where", Input(placeholder="local or ssh://[user@]host[:port]", compact=True,
                                                         id="backend-where"))
                    yield from self._line("GPUs", Input(placeholder="inherit; 0 | 0,1 | 0+1", compact=True, id="backend-gpus"))
                    yield from self._line("Worker command", Input(placeholder="default: workbench worker", compact=True,
                                                                  id="backend-command"))
                    yield from self._line("", Button("Apply: restart the workers", compact=True, id="apply-backend"))
                    yield Static("", id="problem-backend", classes="problem")
                    yield Static("", id="workers")
                    yield Static(BACKEND_HELP, id="backend-help", classes="note")
            with TabPane("Inspect", id="tab-inspect"):
                with VerticalScroll(classes="form", can_focus=False):  # its fields take the focus
                    with Horizontal(classes="line"):
                        yield Button(f"Inspect ({self.app.key_for('model.inspect', 'ctrl+l')})", compact=True, id="inspect")
                        yield Static("", id="inspect-status")
                    yield Static("", id="inspect-summary")
                    yield Table(id="inspect-linears", cursor_type="row", zebra_stripes=True)
                    yield Static("", id="inspect-memory")

    @staticmethod
    def _line(label: str, *widgets) -> ComposeResult:
        with Horizontal(classes="line"):
            yield Label(label, classes="label")
            yield from widgets

    def on_mount(self) -> None:  # the frame's on_mount runs too (Textual calls every class's handler)
        table = self.query_one("#inspect-linears", Table)
        table.add_columns("linear (layer 0)", "out", "in", "parameters")
        table.display = False

    # ------------------------------------------------------------ session -> widgets
    def on_session(self) -> None:
        session = self.app.session
        name = str(session.get("model.name", "demo"))
        if name or self.kind == "demo":
            self.kind = source_kind(name)
        if self.kind != "demo":
            self.typed[self.kind] = name
        self._set(self.query_one("#model-source", Select), self.kind)
        self._set(self.query_one("#model-name", Input), name)
        dtype = session.get("model.dtype", "auto")
        self._set(self.query_one("#model-dtype", Select), dtype if dtype in DTYPES else Select.NULL)
        self._set(self.query_one("#model-device", Input), "" if session.get("model.device", "auto") == "auto"
                  else str(session.get("model.device")))
        self._set(self.query_one("#model-trust", Checkbox), bool(session.get("model.trust_remote_code", False)))
        b = session.backend
        self._set(self.query_one("#backend-where", Input), b.where)
        self._set(self.query_one("#backend-gpus", Input), b.gpus)
        self._set(self.query_one("#backend-command", Input), b.worker_command or "")
        self._show_model()

    @staticmethod
    def _set(widget, value) -> None:
        if widget.value != value:  # an unchanged value posts no Changed message
            widget.value = value

    def _show_model(self) -> None:
        session = self.app.session
        name_input = self.query_one("#model-name", Input)
        name_input.disabled = self.kind == "demo"
        name_input.placeholder = NAME_PLACEHOLDER.get(self.kind, "")
        self.query_one("#browse").display = self.kind == "local"
        self.query_one("#trust-warning").display = bool(session.get("model.trust_remote_code", False))
        name = str(session.get("model.name", "demo")).strip()
        if self.kind == "demo":
            note = "the bundled demo model: a small Llama-style decoder that runs on a laptop CPU"
        elif self.kind == "hub" or session.backend.where != "local":
            where = "" if session.backend.where == "local" else f" on {session.backend.where}"
            note = (f"the worker{escape(where)} loads it when a job starts"
                    + (" (from the Hugging Face Hub, or its cache)" if self.kind == "hub" else ""))
        elif name:
            note = folder_note(Path(name).expanduser())
        else:
            note = f"type a folder, or browse with {self.app.key_for('model.browse', 'ctrl+o')}"
        self.query_one("#model-note", Static).update(note)
        problem = model_problem(session)
        field = next((f for key, f in PROBLEM_FIELDS if problem and problem.message.startswith(key)), "name")
        for f in ("name", "dtype", "device", "trust"):
            line = self.query_one(f"#problem-{f}", Static)
            shown = problem is not None and f == field
            line.update(problem_text(problem.message, problem.hint) if shown else "")
            line.display = shown

    # ------------------------------------------------------------ edits
    def _edit(self, key: str, value, default=None) -> None:
        session = self.app.session
        if session.get(key, default) != value:
            session.set(key, value)
            self.app.session_changed()
            self._seen_revision = session.revision  # our own edit: the widgets already show it
        self._show_model()

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.value != event.select.value:
            return  # a stale message: the widget was set again since
        if event.select.id == "model-source" and event.value != self.kind:
            self.kind = event.value
            name = "demo" if self.kind == "demo" else self.typed.get(self.kind, "")
            self._set(self.query_one("#model-name", Input), name)
            self._edit("model.name", name, "demo")  # the focus stays on the choice: tab goes on to the name
        elif event.select.id == "model-dtype" and event.value is not Select.NULL:
            self._edit("model.dtype", event.value, "auto")

    def on_input_changed(self, event: Input.Changed) -> None:
        wid = event.input.id
        if event.value != event.input.value:
            return  # a stale message: the widget was set again since
        if wid == "model-name" and self.kind != "demo":
            self.typed[self.kind] = event.value
            self._edit("model.name", event.value.strip(), "demo")
        elif wid == "model-device":
            self._edit("model.device", event.value.strip() or "auto", "auto")
        elif wid in ("backend-where", "backend-gpus", "backend-command"):
            self._show_backend_problem(self._backend_problem())

    def on_checkbox_changed(self, event: Checkbox.Changed) -> None:
        if event.checkbox.id == "model-trust":
            self._edit("model.trust_remote_code", event.value, False)

    async def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id in ("backend-where", "backend-gpus", "backend-command"):
            await self.action_apply_backend()

    async def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "browse":
            self.action_browse()
        elif event.button.id == "apply-backend":
            await self.action_apply_backend()
        elif event.button.id == "inspect":
            await self.action_inspect()

    def action_browse(self) -> None:
        """Pick a local model folder in the folder browser."""

        def chosen(path: str | None) -> None:
            if path:
                self.query_one("#model-source", Select).value = "local"
                self.kind = "local"
                self.typed["local"] = path
                self._set(self.query_one("#model-name", Input), path)
                self._edit("model.name", path, "demo")

        self.query_one(TabbedContent).active = "tab-model"
        self.app.push_screen(FolderModal(self.typed.get("local", "")), chosen)

    # ------------------------------------------------------------ backend
    def _backend_values(self) -> tuple[str, str, str | None]:
        where = self.query_one("#backend-where", Input).value.strip() or "local"
        gpus = self.query_one("#backend-gpus", Input).value.strip()
        return where, gpus, self.query_one("#backend-command", Input).value.strip() or None

    def _backend_problem(self) -> UserError | None:
        return backend_problem(*self._backend_values())

    def _show_backend_problem(self, problem: WorkbenchError | None) -> None:
        line = self.query_one("#problem-backend", Static)
        line.update(problem_text(problem.message, problem.hint) if problem else "")
        line.display = problem is not None

    async def action_apply_backend(self) -> None:
        """Restart the workers on the backend in the fields (after a confirmation while a job runs)."""
        problem = self._backend_problem()
        self._show_backend_problem(problem)
        if problem is not None:
            return
        where, gpus, command = self._backend_values()
        old = self.app.session.backend
        backend = Backend(where, gpus, command, list(old.ssh_options) if where == old.where else [])
        if not self.app.bridge.busy():
            self._restart(backend)
            return

        def answer(yes: bool | None) -> None:
            if yes:
                self._restart(backend)

        self.app.push_screen(ConfirmModal("A job is running: restarting the workers stops it. Restart them?",
                                          "Restart", "Keep running"), answer)

    def _restart(self, backend: Backend) -> None:
        if self.restarting:  # a second restart midway through the first would leave two sets of workers
            self.notify("the workers are restarting: apply again when they are up", timeout=4)
            return
        self.restarting = True
        self.app.session.backend = backend
        self.app.session_changed()
        self._seen_revision = self.app.session.revision
        self._show_model()  # a folder is checked here only when the worker runs here
        self.run_worker(self._restart_workers(backend), group="backend", exit_on_error=False)

    async def _restart_workers(self, backend: Backend) -> None:
        try:
            await self.app.bridge.restart(backend)
        except WorkbenchError as exc:
            self._show_backend_problem(exc)
        finally:
            self.restarting = False
        self.app.schedule_repaint()

    # ------------------------------------------------------------ inspect
    async def action_inspect(self) -> None:
        """Ask the worker to load the model and describe it."""
        problem = model_problem(self.app.session)
        if problem is not None:
            self.app.show_error(problem.message, problem.hint, "The model setting is not valid yet")
            return
        self.query_one(TabbedContent).active = "tab-inspect"
        name = self.app.session.get("model.name", "demo")
        if await self.app.submit("inspect", copy.deepcopy(self.app.session.data), title=f"inspect {name}") is not None:
            self._show_inspect()

    def _show_inspect(self) -> None:
        job = self.app.state.latest("inspect")
        status = self.query_one("#inspect-status", Static)
        summary = self.query_one("#inspect-summary", Static)
        table = self.query_one("#inspect-linears", Table)
        memory = self.query_one("#inspect-memory", Static)
        result = job.result if job is not None and job.status == "finished" else None
        summary.loading = job is not None and job.active
        table.display = result is not None
        if job is None:
            status.update(" the worker loads the model and reports its shape and the memory a run needs")
            summary.update("")
            memory.update("")
            return
        model = (job.spec.get("model") or {}).get("name", "demo")
        if job.active:
            stage = job.stages.get(job.current or "")
            status.update(f" {escape(stage.title if stage else f'waiting for the worker: {model}')}…")
            return
        if result is None:
            error = job.error or {}
            status.update(f" {escape(str(model))}: {job.status}")
            summary.update(problem_text(error.get("message") or job.status, error.get("hint")))
            memory.update("")
            return
        where = f"{result.get('dtype', '?')} on {result.get('device', '?')}"
        status.update(f" {escape(str(result.get('source') or model))} · {where}")
        heads = result.get("num_attention_heads")
        kv = result.get("num_key_value_heads")
        summary.update(Text.assemble(
            (f"{result.get('architecture', '?')}", "bold"), f" ({result.get('family') or result.get('model_type') or '?'}) · ",
            f"{result.get('num_layers', '?')} layers · {human_count(result.get('total_params'))} parameters\n",
            f"hidden {result.get('hidden_size', '?')} · vocab {result.get('vocab_size') or 0:,} · "
            f"context {result.get('context_length', '?')} · heads {heads if heads is not None else '?'}"
            + (f" (kv {kv})" if kv is not None and kv != heads else "")))
        table.clear()
        for name, shape in (result.get("layer0_linears") or {}).items():
            out, inp = shape
            table.add_row(name, f"{out:,}", f"{inp:,}", f"{out * inp:,}", key=name)
        worker = self.app.state.workers.get(job.worker) or next(iter(self.app.state.workers.values()), None)
        memory.update(memory_text(result, self.app.session, worker.devices if worker else []))

    # ------------------------------------------------------------ state -> widgets
    def on_state(self, changes: set[str]) -> None:
        if "workers" in changes:
            workers = self.app.state.workers
            self.query_one("#workers", Static).update(
                "\n".join(worker_text(w) for w in workers.values()) or "no worker yet: one starts with the first job")
        job = self.app.state.latest("inspect")
        if job is None or job.id in changes or "session" in changes:
            self._show_inspect()
