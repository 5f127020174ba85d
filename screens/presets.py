"""The Presets screen: the shipped presets, what each reproduces, a preview, and the guided session.

Enter starts a guided session with the highlighted preset (Model ->
Calibration -> Compression -> Run, each screen explaining the preset's
values); the other keys load a preset without the guide, open a preset file
by path, or save the current setup as a preset. Study presets (grids of
runs) are marked "study"; enter (or l) opens their study view (``study.py``),
and their preview also gives the headless command.
"""

from __future__ import annotations

import copy

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from workbench.errors import UserError
from workbench.spec import RunSpec, load_preset_data, spec_from_dict

from .base import WorkbenchScreen
from .browse import FolderModal


def study_command(name: str) -> str:
    return f"workbench study {name}"


def describe_spec(spec: RunSpec) -> Text:
    """The preview of a run spec: model, calibration, steps and evaluation, one block each."""
    c, e = spec.calibration, spec.evaluate
    tokens = f"{c.seqlen} tokens" if c.seqlen else "min(2048, the model's context) tokens"
    calibration = f"{c.source}, {c.nsamples} samples of {tokens}, seed {c.seed}"
    if c.source == "selfgen" or c.source.startswith("selfgen:"):
        calibration += f" (generated from {c.selfgen.corpus} prefixes of {c.selfgen.prefix_tokens} tokens)"
    steps = [f"{i + 1}. {step.label()}" for i, step in enumerate(spec.steps)] or ["none: the dense model is evaluated"]
    evaluation = []
    if e.perplexity:
        windows = f", first {e.limit} windows" if e.limit else ""
        evaluation.append(f"perplexity on {', '.join(e.perplexity)}{windows}" + (", before and after" if e.before else ""))
    if e.zeroshot:
        evaluation.append(f"zero-shot: {', '.join(e.zeroshot)}")
    if e.icl:
        evaluation.append(f"in-context learning: {', '.join(e.icl)} ({', '.join(e.icl_modes)})")
    if e.efficiency:
        evaluation.append("efficiency: size, throughput, latency, memory")
    rows = [("Model", [f"{spec.model.name} ({spec.model.dtype}, {spec.model.device})"]),
            ("Calibration", [calibration]), ("Steps", steps), ("Evaluation", evaluation or ["none"])]
    if spec.export.save:
        rows.append(("Export", [spec.export.out or "a folder in the run's directory"]))
    text = Text("\n\n")
    for title, lines in rows:
        text.append(f"{title}:", style="bold")
        text.append(f" {lines[0]}\n" if len(lines) == 1 else "".join(f"\n  {line}" for line in lines) + "\n")
    return text


class PresetsScreen(WorkbenchScreen):
    NAME = "presets"
    TITLE = "Presets"
    CSS_PATH = "presets.tcss"
    BINDINGS = [
        Binding("enter", "guided", "Guided walk", id="presets.guided"),
        Binding("l", "load", "Load", id="presets.load"),
        Binding("o", "open_file", "Open file", id="presets.open_file"),
        Binding("s", "save", "Save setup", id="presets.save"),
    ]

    def __init__(self):
        super().__init__()
        self.presets: dict[str, dict] = {}  # name -> parsed TOML
        self.studies: set[str] = set()

    def compose_body(self) -> ComposeResult:
        with Horizontal(id="presets-body"):
            yield OptionList(id="preset-list")
            with VerticalScroll(id="preset-pane"):
                yield Static("", id="current-setup")
                yield Static("", id="preset-preview")

    def on_mount(self) -> None:  # the frame's on_mount runs too (Textual calls every class's handler)
        self.query_one("#current-setup").border_title = "Your setup: what ctrl+r runs"
        self.query_one("#preset-preview").border_title = "The highlighted preset (not loaded)"
        self._fill_list()

    def _fill_list(self) -> None:
        from workbench.presets import preset_names

        from .session import run_presets

        self.presets = dict(run_presets())
        options = [Option(name, id=name) for name in self.presets]
        for name in preset_names():
            if name in self.presets:
                continue
            try:
                data = load_preset_data(name)
            except UserError:
                continue
            if "study" in data:
                self.presets[name], self.studies = data, self.studies | {name}
                # marked apart: enter opens the study view instead of loading a setup
                options.append(Option(Text.assemble(name, (" (study)", "dim italic")), id=name))
        listing = self.query_one("#preset-list", OptionList)
        listing.set_options(options)
        current = self.app.session.preset
        index = next((i for i, o in enumerate(options) if o.id == current), 0)
        listing.highlighted = index
        self._preview(options[index].id if options else None)

    # ------------------------------------------------------------ rendering
    def on_session(self) -> None:
        session = self.app.session
        problem = session.problem()
        origin = f"from preset {session.preset}" if session.preset else "from a run in the history"
        edited = ", edited" if session.edited else ""
        state = (("not valid yet: ", "red"), problem.message) if problem else ("valid",)
        self.query_one("#current-setup", Static).update(Text.assemble(
            (session.run_name(), "bold"), f" ({origin}{edited}; ", *state, ")"))
        self.query_one("#current-setup").border_title = f"Your setup: what {self.app.key_for('run.start', 'ctrl+r')} runs"

    def _preview(self, name: str | None) -> None:
        preview = self.query_one("#preset-preview", Static)
        data = self.presets.get(name or "")
        loaded = name == self.app.session.preset and not self.app.session.edited
        preview.border_title = f"Preset {name}" + (" (loaded: your setup)" if loaded else " (not loaded)") if name else ""
        if data is None:
            preview.update("")
            return
        text = Text.assemble((f"{name}\n", "bold"), data.get("description", ""))
        if name in self.studies:
            text.append(f"\n\nA study: a grid of runs over calibration sources, methods, sparsities and seeds.\n"
                        f"Run it headless: {study_command(name)}\n")
        else:
            try:
                text.append_text(describe_spec(spec_from_dict(copy.deepcopy(data))))
            except UserError as exc:
                text.append(f"\n\nThis preset is not valid: {exc.message}\n", style="red")
        text.append("\nReproduces: ", style="bold")
        text.append(f"{data.get('reference', '')}\n", style="italic")
        if name not in self.studies:
            enter = self.app.key_for("presets.guided", "enter")
            load = self.app.key_for("presets.load", "l")
            text.append(f"\n{enter}: a guided walk through its settings · {load}: load it without the guide", style="dim")
        else:
            text.append(f"\n{self.app.key_for('presets.guided', 'enter')}: open the study: its plan, runs and results",
                        style="dim")
        preview.update(text)

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        self._preview(event.option.id)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.action_guided()

    # ------------------------------------------------------------ actions
    @property
    def highlighted(self) -> str | None:
        option = self.query_one("#preset-list", OptionList).highlighted_option
        return option.id if option is not None else None

    def _open(self, guided: bool) -> None:
        name = self.highlighted
        if name is None:
            return
        if name in self.studies:
            from .study import open_study

            open_study(self.app, name)
            return
        if self.app.open_preset(name, guided=guided) and not guided:
            self.notify(f"loaded {name}; edit it on the Model, Calibration and Compression screens", timeout=5)

    def action_guided(self) -> None:
        self._open(guided=True)

    def action_load(self) -> None:
        self._open(guided=False)

    def action_save(self) -> None:
        self.app.save_preset()

    def action_open_file(self) -> None:
        def opened(path: str | None) -> None:
            if not path:
                return
            try:  # the whole preset must be valid before it replaces the setup
                data = load_preset_data(path)
                if "study" in data:
                    from .study import open_study

                    open_study(self.app, path)
                    return
                spec_from_dict(copy.deepcopy(data))
            except UserError as exc:
                self.app.show_error(exc.message, exc.hint, "The preset could not be opened")
                return
            if self.app.open_preset(path, guided=False):
                self.notify(f"loaded {path}", timeout=5)

        self.app.push_screen(FolderModal("", suffix=".toml", title="Open a preset or study file (.toml)"), opened)
