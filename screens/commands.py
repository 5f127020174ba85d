"""The command palette's workbench commands: open a preset or a study, run, cancel, compare, switch screen, save."""

from __future__ import annotations

from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider

from .widgets import SCREENS


class WorkbenchCommands(Provider):
    def commands(self) -> list[tuple[str, object, str]]:
        """(title, callback, help) of every command the palette offers now."""
        from .session import run_presets
        from .study import open_study, study_presets

        app = self.app
        key = app.key_for
        found: list[tuple[str, object, str]] = [
            ("Run the current setup", app.action_run, f"{key('run.start', 'ctrl+r')} · validate the setup and start it"),
            ("Cancel the running job", app.action_cancel, f"{key('run.cancel', 'c')} on Run · stops at the next layer boundary"),
            ("Compare runs", partial(app.open_compare), f"{key('history.compare', 'c')} on History · the marked runs side by side"),
            ("Save the setup as a preset", partial(app.save_preset),
             f"{key('presets.save', 's')} on Presets · a TOML file that 'workbench run' takes"),
            ("Show the keys of this screen", app.action_help, f"{key('app.help_key', '?')} or F1 · every key that works here"),
            ("Quit", app.action_quit, f"{key('app.quit', 'ctrl+q')} · asks first when a job runs or edits are unsaved"),
        ]
        found += [(f"Screen: {title}", partial(app.action_switch, name), f"{key(f'screen.{name}', shown)}")
                  for name, title, shown in SCREENS]
        found += [(f"Open preset: {name}", partial(app.open_preset, name), "a guided walk through its values")
                  for name, _ in run_presets()]
        found += [(f"Open study: {name}", partial(open_study, app, name), "its plan of runs, results and ranking of sources")
                  for name in study_presets()]
        return found

    async def discover(self) -> Hits:
        for title, callback, help_text in self.commands():
            yield DiscoveryHit(title, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, callback, help_text in self.commands():
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), callback, help=help_text)
