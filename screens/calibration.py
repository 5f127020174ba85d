"""The Calibration screen: the data each layer's statistics come from, and a preview of it.

Three tabs:

- Source: a built-in corpus (c4, wikitext2, books), random tokens, text the
  model generates (selfgen), a file, a Hub dataset, another registered
  source, or a mixture of several (a table of source and fraction rows that
  composes ``mix:A=0.5,B=0.5``); with nsamples, seqlen, seed and batch size.
- Self-generation: the ``[calibration.selfgen]`` settings.
- Preview: the worker builds the windows for the current model's tokenizer
  and reports documents, tokens, distinct and top tokens, the dense model's
  perplexity on the first windows and the first windows' text. Previewing a
  selfgen source generates its text (after a confirmation); the generated
  set is cached, so a run with the same settings reuses it.

Every edit goes to ``app.session`` at once and ``[calibration]`` is
validated again, so a problem shows as it is typed, with the validator's
message.
"""

from __future__ import annotations

import copy
import dataclasses

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Button, Checkbox, Input, Label, Select, Static, TabbedContent, TabPane

from workbench.errors import UserError
from workbench.data.sources import describe_source, mixture_counts, parse_mixture
from workbench.spec import CalibrationSpec, SelfGenSpec, spec_from_dict

from .base import WorkbenchScreen
from .stepforms import problem_text
from .widgets import Check, ConfirmModal, Table

KINDS = (("c4", "c4"), ("wikitext2", "wikitext2"), ("books", "books"), ("random", "random"), ("selfgen", "selfgen"),
         ("file", "file:PATH"), ("hf", "hf:DATASET"), ("mix", "mixture"), ("other", "other"))
BUILTIN = ("c4", "wikitext2", "books", "random")
# kind -> (label, placeholder) of its argument field
ARGUMENTS = {
    "file": ("Path", "a .txt, .jsonl, .json, .csv or .parquet file"),
    "hf": ("Dataset", "NAME[:CONFIG]:SPLIT[:FIELD]"),
    "selfgen": ("Seed corpus", "empty: the Self-generation tab's corpus"),
    "other": ("Source", "a registered source, e.g. name:ARG"),
}
SIZES = (("nsamples", "Samples"), ("seqlen", "Seqlen"), ("seed", "Seed"), ("batch_size", "Batch size"))
SELFGEN_WARNING = ("⚠ previewing selfgen generates its text with the model now (minutes for a large model); "
                   "the set is cached and a run with the same settings reuses it")


@dataclasses.dataclass(frozen=True)
class Field:
    key: str  # the session key, e.g. calibration.selfgen.top_p
    label: str
    kind: str  # int, float or str
    optional: bool
    default: object

    @property
    def id(self) -> str:
        return "f-" + self.key.removeprefix("calibration.").replace(".", "-")

    def parse(self, text: str):
        """The input's text as a value: None when empty (the default applies); the raw text when it does not parse,
        so the validator names the problem."""
        text = text.strip()
        if not text:
            return None
        try:
            return {"int": int, "float": float}.get(self.kind, str)(text)
        except ValueError:
            return text


def _fields(cls, prefix: str, labels: dict[str, str]) -> tuple[Field, ...]:
    out = []
    for f in dataclasses.fields(cls):
        if f.name in labels:
            ann = str(f.type).replace(" ", "")
            kind = next((k for k in ("int", "float") if ann.startswith(k)), "str")
            out.append(Field(f"{prefix}.{f.name}", labels[f.name], kind, "None" in ann, f.default))
    order = list(labels)
    return tuple(sorted(out, key=lambda x: order.index(x.key.rsplit(".", 1)[1])))


SIZE_FIELDS = _fields(CalibrationSpec, "calibration", dict(SIZES))
SELFGEN_FIELDS = _fields(SelfGenSpec, "calibration.selfgen", {
    "corpus": "Corpus", "prefix_tokens": "Prefix tokens", "samples": "Samples", "max_new_tokens": "New tokens",
    "temperature": "Temperature", "top_p": "top_p", "top_k": "top_k", "repetition_penalty": "Rep. penalty",
    "keep": "Keep", "batch_size": "Batch size"})
FIELDS = {f.id: f for f in SIZE_FIELDS + SELFGEN_FIELDS}
PLACEHOLDERS = {"calibration.seqlen": "min(2048, context)", "calibration.selfgen.samples": "nsamples / keep",
                "calibration.selfgen.max_new_tokens": "seqlen"}


# ---------------------------------------------------------------- the source string


def parse_source(source: str) -> tuple[str, str, list[tuple[str, str]]]:
    """(kind, argument, mixture rows) of a source string; rows are (source, fraction text)."""
    source = (source or "c4").strip()
    prefix, sep, arg = source.partition(":")
    if source in BUILTIN or source == "selfgen":
        return source, "", []
    if prefix in ("file", "hf", "selfgen") and sep:
        return prefix, arg, []
    if prefix == "mix" and sep:
        rows = []
        for part in arg.split(","):
            name, sep, fraction = part.strip().rpartition("=")
            if part.strip():  # a part without "=" keeps its text, so the validator can name it
                rows.append((name.strip(), fraction.strip()) if sep else (fraction.strip(), ""))
        return "mix", "", rows
    return "other", source, []


def compose_source(kind: str, arg: str, rows: list[tuple[str, str]]) -> str:
    """The ``calibration.source`` string of the widgets' values."""
    arg = arg.strip()
    if kind in BUILTIN:
        return kind
    if kind == "selfgen":
        return f"selfgen:{arg}" if arg else "selfgen"
    if kind == "mix":
        return "mix:" + ",".join(f"{name}={fraction}" for name, fraction in rows)
    if kind == "other":
        return arg
    return f"{kind}:{arg}"


def uses_selfgen(source: str) -> bool:
    kind, _, rows = parse_source(source)
    return kind == "selfgen" or any(name.split(":")[0] == "selfgen" for name, _ in rows)


def format_fraction(text: str) -> str:
    try:
        return f"{float(text):g}"
    except ValueError:
        return text.strip()


def calibration_problem(session) -> UserError | None:
    """The first problem of ``[calibration]``: the validator's, then a mixture source that would get no sample."""
    data = copy.deepcopy(session.data.get("calibration", {}))
    try:
        spec = spec_from_dict({"calibration": data})
    except UserError as exc:
        return exc
    c = spec.calibration
    if c.source.startswith("mix:"):

        try:
            mixture_counts(parse_mixture(c.source[4:]), c.nsamples)
        except UserError as exc:
            return exc
    return None


def mixture_samples(session) -> dict[str, int]:
    """Samples each mixture source gets at the current nsamples (empty while the mixture is not valid)."""

    source = str(session.get("calibration.source", "c4"))
    try:
        parts = parse_mixture(source[4:])
        return {name: n for (name, _), n in zip(parts, mixture_counts(parts, int(session.get("calibration.nsamples", 128))))}
    except (UserError, TypeError, ValueError):
        return {}


# ---------------------------------------------------------------- the screen


class CalibrationScreen(WorkbenchScreen):
    NAME = "calibration"
    TITLE = "Calibration"
    CSS_PATH = "calibration.tcss"
    BINDINGS = [
        Binding("ctrl+l", "preview", "Preview", priority=True, id="calibration.preview"),
        Binding("delete", "remove_part", "Remove source", id="calibration.remove_part"),
    ]

    def __init__(self):
        super().__init__()
        self.kind = "c4"
        self.args: dict[str, str] = {}  # the argument typed per kind, restored when it is chosen again
        self.rows: list[tuple[str, str]] = []  # the mixture: (source, fraction text)
        self.preview_id: str | None = None

    def compose_body(self) -> ComposeResult:
        # a select posts Changed with its first value when mounted: it must be the setup's, not a default
        self.kind = parse_source(str(self.app.session.get("calibration.source", "c4")))[0]
        with TabbedContent(id="calibration-tabs"):
            with TabPane("Source", id="tab-source"):
                with VerticalScroll(classes="form", can_focus=False):  # its fields take the focus
                    yield from self._line("Source", Select([(t, k) for k, t in KINDS], value=self.kind, allow_blank=False,
                                                           compact=True, id="source-kind"))
                    with Horizontal(classes="line", id="arg-line"):
                        yield Label("", classes="label", id="arg-label")
                        yield Input(compact=True, id="source-arg")
                    yield Static("", id="source-description", classes="note")
                    yield Table(id="mix-table", cursor_type="row")
                    with Horizontal(classes="line", id="mix-add"):
                        yield Label("Add source", classes="label")
                        yield Input(placeholder="c4, selfgen, file:PATH...", compact=True, id="mix-source")
                        yield Input(placeholder="fraction", compact=True, id="mix-fraction")
                        yield Button("Add", compact=True, id="mix-add-button")
                    for pair in (SIZE_FIELDS[:2], SIZE_FIELDS[2:]):
                        with Horizontal(classes="line"):
                            for f in pair:
                                yield Label(f.label, classes="label")
                                yield self._input(f)
                    yield Static("", id="memory-note", classes="note")
                    with Horizontal(classes="line"):
                        yield Label("Options", classes="label")
                        yield Check("offload activations to host memory", compact=True, id="f-offload")
                    with Horizontal(classes="line"):
                        yield Label("", classes="label")
                        yield Check("describe the data before compressing (summary)", compact=True, id="f-summary")
                    with Horizontal(classes="line"):
                        yield Label("Compare with", classes="label")
                        yield Input(placeholder="none; a source to measure the token divergence from", compact=True,
                                    id="f-compare")
                    yield Static("", id="source-string", classes="note")
                    yield Static("", id="problem-source", classes="problem")
            with TabPane("Self-generation", id="tab-selfgen"):
                with VerticalScroll(classes="form", can_focus=False):  # its fields take the focus
                    yield Static("", id="selfgen-note", classes="note")
                    for i in range(0, len(SELFGEN_FIELDS), 2):
                        with Horizontal(classes="line"):
                            for f in SELFGEN_FIELDS[i:i + 2]:
                                yield Label(f.label, classes="label")
                                yield self._input(f)
                    yield Static("", id="problem-selfgen", classes="problem")
            with TabPane("Preview", id="tab-preview"):
                with VerticalScroll(classes="form", can_focus=False):  # its fields take the focus
                    with Horizontal(classes="line"):
                        yield Button(f"Preview ({self.app.key_for('calibration.preview', 'ctrl+l')})", compact=True, id="preview")
                        yield Static("", id="preview-status")
                    yield Static(SELFGEN_WARNING, id="selfgen-warning", classes="warning")
                    yield Static("", id="preview-stats")
                    yield Static("", id="preview-samples")

    @staticmethod
    def _line(label: str, *widgets) -> ComposeResult:
        with Horizontal(classes="line"):
            yield Label(label, classes="label")
            yield from widgets

    @staticmethod
    def _input(f: Field) -> Input:
        # a text field: a letter typed into a number shows, and the validator names it (empty: the default)
        placeholder = PLACEHOLDERS.get(f.key) or ("" if f.default is None else f"default {f.default}")
        return Input(placeholder=placeholder, compact=True, id=f.id)

    def on_mount(self) -> None:  # the frame's on_mount runs too (Textual calls every class's handler)
        self.query_one("#mix-table", Table).add_columns("source", "fraction", "samples")

    # ------------------------------------------------------------ session -> widgets
    def on_session(self) -> None:
        session = self.app.session
        self.kind, arg, self.rows = parse_source(str(session.get("calibration.source", "c4")))
        if self.kind in ARGUMENTS:
            self.args[self.kind] = arg
        self._set(self.query_one("#source-kind", Select), self.kind)
        self._set(self.query_one("#source-arg", Input), self.args.get(self.kind, ""))
        for f in FIELDS.values():
            value = session.get(f.key)
            self._set(self.query_one(f"#{f.id}", Input), "" if value is None else str(value))
        self._set(self.query_one("#f-offload", Checkbox), session.get("calibration.offload_activations", False) is True)
        self._set(self.query_one("#f-summary", Checkbox), session.get("calibration.summary", True) is not False)
        compare = session.get("calibration.compare")
        self._set(self.query_one("#f-compare", Input), "" if compare is None else str(compare))
        self._show_source()

    @staticmethod
    def _set(widget, value) -> None:
        if widget.value != value:  # an unchanged value posts no Changed message
            widget.value = value

    def _show_source(self) -> None:
        session = self.app.session
        source = str(session.get("calibration.source", "c4"))
        label, placeholder = ARGUMENTS.get(self.kind, ("", ""))
        self.query_one("#arg-line").display = self.kind in ARGUMENTS
        self.query_one("#arg-label", Label).update(label)
        self.query_one("#source-arg", Input).placeholder = placeholder
        mix = self.kind == "mix"
        self.query_one("#mix-table").display = self.query_one("#mix-add").display = mix
        if mix:
            self._fill_mixture()
        description, about = self.query_one("#source-description", Static), self._description(source)
        description.update(Text(about))
        description.display = bool(about)
        self.refresh_bindings()  # "remove source" applies to a mixture only
        self.query_one("#source-string", Static).update(Text.assemble("calibration.source = ", (repr(source), "bold")))
        problem = calibration_problem(session)
        text = problem_text(problem.message, problem.hint) if problem else None
        for wid, shown in (("#problem-source", problem is not None),
                           ("#problem-selfgen", problem is not None and problem.message.startswith("calibration.selfgen"))):
            line = self.query_one(wid, Static)
            line.update(text if shown else "")
            line.display = shown
        self._show_memory()
        used = uses_selfgen(source)
        self.query_one("#selfgen-note", Static).update(Text(
            "Used: the source includes selfgen. Empty fields take the defaults shown." if used else
            f"Not used by the source {source!r}: these settings apply to a source with selfgen in it."))
        self.query_one("#selfgen-warning").display = used

    def _show_memory(self) -> None:
        """What the worker's machine cannot hold of these sizes (the estimate Inspect shows), under the sizes."""
        note = self.query_one("#memory-note", Static)
        findings = self.app.memory_findings()
        text = Text()
        for f in findings:
            mark, style = ("✗ cannot run: ", "bold red") if f.level == "problem" else ("⚠ ", "yellow")
            text.append(mark + f.message, style=style)
            text.append((f"\n  what to do: {f.hint}" if f.hint else "") + "\n", style="dim")
        text.rstrip()
        note.update(text)
        note.display = bool(findings)

    @staticmethod
    def _description(source: str) -> str:

        try:
            return describe_source(source)
        except (UserError, ValueError):
            return ""  # the problem line says what is wrong

    def _fill_mixture(self) -> None:
        table = self.query_one("#mix-table", Table)
        counts = mixture_samples(self.app.session)
        cursor = table.cursor_row
        table.clear()
        for name, fraction in self.rows:
            table.add_row(name, fraction, str(counts.get(name, "-")))  # no row keys: a preset may repeat a source
        if self.rows:
            table.move_cursor(row=min(cursor, len(self.rows) - 1))

    # ------------------------------------------------------------ edits
    def _edit(self, key: str, value) -> None:
        session = self.app.session
        if session.get(key) != value:
            session.set(key, value)
            self.app.session_changed()
            self._seen_revision = session.revision  # our own edit: the widgets already show it
        self._show_source()

    def _edit_source(self) -> None:
        arg = self.query_one("#source-arg", Input).value
        self._edit("calibration.source", compose_source(self.kind, arg, self.rows))

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id != "source-kind" or event.value == self.kind or event.value != event.select.value:
            return  # not ours, no change, or a stale message (the widget was set again since)
        previous = str(self.app.session.get("calibration.source", "c4"))
        self.kind = event.value
        if self.kind == "mix" and not self.rows and previous and not previous.startswith("mix:"):
            self.rows = [(previous, "1")]  # start from the current source, to be split
        self._set(self.query_one("#source-arg", Input), self.args.get(self.kind, ""))
        self._edit_source()  # the focus stays on the choice: tab goes on to its argument

    def on_input_changed(self, event: Input.Changed) -> None:
        wid = event.input.id or ""
        if event.value != event.input.value:
            return  # a stale message: the widget was set again since
        if wid == "source-arg":
            self.args[self.kind] = event.value
            self._edit_source()
        elif wid in FIELDS:
            self._edit(FIELDS[wid].key, FIELDS[wid].parse(event.value))
        elif wid == "f-compare":
            self._edit("calibration.compare", event.value.strip() or None)

    def on_checkbox_changed(self, event: Checkbox.Changed) -> None:
        key = {"f-offload": "calibration.offload_activations", "f-summary": "calibration.summary"}.get(event.checkbox.id or "")
        if key is not None and self.app.session.get(key, key.endswith("summary")) != event.value:
            self._edit(key, event.value)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id in ("mix-source", "mix-fraction"):
            self.action_add_part()

    def on_data_table_row_selected(self, event: Table.RowSelected) -> None:
        """Enter on a mixture row: edit it in the add fields (adding the same source replaces it)."""
        if event.data_table.id == "mix-table":
            name, fraction = self.rows[event.cursor_row]
            self.query_one("#mix-source", Input).value = name
            self.query_one("#mix-fraction", Input).value = fraction
            self.query_one("#mix-fraction", Input).focus()

    async def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "mix-add-button":
            self.action_add_part()
        elif event.button.id == "preview":
            await self.action_preview()

    def action_add_part(self) -> None:
        """Add the source and fraction typed under the mixture table (replacing that source's row)."""
        name = self.query_one("#mix-source", Input).value.strip()
        fraction = self.query_one("#mix-fraction", Input).value.strip()
        if not name or not fraction:
            self.query_one("#mix-fraction" if name else "#mix-source", Input).focus()
            return
        fraction = format_fraction(fraction)
        rows = [r for r in self.rows if r[0] != name]
        at = next((i for i, r in enumerate(self.rows) if r[0] == name), len(rows))
        self.rows = rows[:at] + [(name, fraction)] + rows[at:]
        self.query_one("#mix-source", Input).value = ""
        self.query_one("#mix-fraction", Input).value = ""
        self.query_one("#mix-source", Input).focus()
        self._edit_source()

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        return self.kind == "mix" if action == "remove_part" else super().check_action(action, parameters)

    def action_remove_part(self) -> None:
        """Remove the highlighted mixture row."""
        table = self.query_one("#mix-table", Table)
        if self.kind != "mix" or not self.rows or not table.has_focus:
            return
        del self.rows[min(table.cursor_row, len(self.rows) - 1)]
        self._edit_source()

    # ------------------------------------------------------------ preview
    async def action_preview(self) -> None:
        """Ask the worker for the windows' statistics and first samples (after a confirmation for selfgen)."""
        session = self.app.session
        from .model import model_problem

        problem = calibration_problem(session) or model_problem(session)
        if problem is not None:
            self.app.show_error(problem.message, problem.hint, "The setup cannot be previewed yet")
            return
        spec = {"model": copy.deepcopy(session.data.get("model", {})),
                "calibration": copy.deepcopy(session.data.get("calibration", {}))}
        self.query_one(TabbedContent).active = "tab-preview"
        if not uses_selfgen(str(spec["calibration"].get("source", "c4"))):
            await self._preview(spec)
            return

        async def answer(yes: bool | None) -> None:
            if yes:
                await self._preview(spec)

        self.app.push_screen(ConfirmModal("Previewing selfgen generates its text with the model now (cached for the run). "
                                          "Generate it?", "Generate", "Not now"), answer)

    async def _preview(self, spec: dict) -> None:
        job = await self.app.submit("preview", spec, f"preview {spec['calibration'].get('source', 'c4')}")
        if job is not None:
            self.preview_id = job.id
            self._show_preview()

    def _show_preview(self) -> None:
        state = self.app.state
        job = state.jobs.get(self.preview_id or "") or state.latest("preview")
        status = self.query_one("#preview-status", Static)
        stats = self.query_one("#preview-stats", Static)
        samples = self.query_one("#preview-samples", Static)
        stats.loading = job is not None and job.active
        if job is None:
            status.update(" the worker builds the windows with the model's tokenizer and describes them")
            return
        if job.active:
            stage = job.stages.get(job.current or "")
            progress = f" {stage.done}/{stage.total}" if stage and stage.total else ""
            detail = f" {stage.detail}" if stage and stage.detail else ""
            status.update(Text(f" {stage.title if stage else 'waiting for the worker'}{progress}{detail}…"))
            return
        result = job.result if job.status == "finished" else None
        if result is None:
            error = job.error or {}
            status.update(f" {job.status}")
            stats.update(problem_text(error.get("message") or job.status, error.get("hint")))
            samples.update("")
            return
        stale = job.spec.get("calibration") != self.app.session.data.get("calibration") or \
            job.spec.get("model") != self.app.session.data.get("model")
        status.update(Text.assemble(" ", (f"{result['source']}", "bold"),
                                    f" · {result['nsamples']} × {result['seqlen']} tokens · seed {result['seed']} · "
                                    f"model {result['model']}",
                                    (" · settings changed since: ctrl+l again" if stale else "", "yellow")))
        stats.update(self._stats(result))
        shown = Text("First windows\n", style="bold")
        for s in result.get("samples") or []:
            shown.append(f"{s['window']}: ", style="bold")
            shown.append(repr(s["text"]) + (" …" if s.get("truncated") else "") + "\n", style="not bold")
        shown.rstrip()
        samples.update(shown)

    @staticmethod
    def _stats(r: dict) -> Text:
        def number(n) -> str:
            return "-" if n is None else f"{n:,}"

        rows = [
            ("documents", number(r.get("documents")),
             "token ids, no text" if r.get("documents") is None else f"{number(r.get('document_tokens'))} tokens"),
            ("windows", number(r.get("windows")), f"{number(r.get('tokens'))} tokens ({r.get('nsamples')} × {r.get('seqlen')})"),
            ("distinct tokens", number(r.get("distinct_tokens")), ""),
            ("dense perplexity", "-" if r.get("perplexity") is None else f"{r['perplexity']:.2f}",
             f"on the first {r.get('perplexity_windows')} windows" if r.get("perplexity") is not None else ""),
        ]
        text = Text(f"{r.get('description', '')}\n", style="dim")
        for what, value, note in rows:
            text.append(f"{what:<18}{value:>10}  ", style="not dim")
            text.append(f"{note}\n", style="dim")
        tokens = r.get("tokens") or 1
        top = " · ".join(f"{t['text']!r} {t['count'] / tokens:.1%}" for t in r.get("top_tokens") or [])
        text.append(f"{'top tokens':<18}", style="not dim")
        text.append(top, style="not dim")
        return text

    # ------------------------------------------------------------ state -> widgets
    def on_state(self, changes: set[str]) -> None:
        if "workers" in changes or any(self.app.state.jobs[j].kind == "inspect" for j in changes if j in self.app.state.jobs):
            self._show_memory()  # the worker's memory, or the model's inspected sizes, changed
        job = self.app.state.jobs.get(self.preview_id or "") or self.app.state.latest("preview")
        if job is None or job.id in changes or "session" in changes:
            self._show_preview()
