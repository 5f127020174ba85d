"""History runs as the screens show them: opening the UI's history, what a run did in a few words, whether it is an
evaluation made in the Evaluate screen. Shared by Evaluate, History and Compare."""

from __future__ import annotations

import copy

from workbench.errors import UserError
from workbench.history import History, RunRecord
from workbench.spec import spec_from_dict

EVAL_REFERENCES = ("run:", "model:")  # an evaluation job's spec reference: what it evaluated


def is_evaluation(record) -> bool:
    """Whether a history run is an evaluation made here (of a run's model, or of a setup's model)."""
    return not record.spec.get("steps") and str(record.spec.get("reference") or "").startswith(EVAL_REFERENCES)


def open_history(app) -> History:
    """The run history the app's workers record into (UserError when it cannot be opened)."""
    path = getattr(app, "history_path", None)
    return History(path) if path else History()


def steps_text(record: RunRecord) -> str:
    """The run's compression steps in a few words (``wanda 50%``), ``dense`` for a run without steps, and for an
    evaluation made in the Evaluate screen what it measured (``eval · wanda 50%``)."""
    if is_evaluation(record):
        what = str(record.spec.get("description") or "")
        return "eval · " + (what.rsplit(": ", 1)[1] if ": " in what else "dense")
    labels = [s.get("label") or s.get("type", "?") for s in (record.summary or {}).get("steps") or []]
    if not labels and record.spec.get("steps"):
        try:
            labels = [s.label() for s in spec_from_dict(copy.deepcopy(record.spec)).steps]
        except UserError:  # a spec an older version wrote: its step types are still readable
            labels = [str(s.get("type", "?")) for s in record.spec["steps"] if isinstance(s, dict)]
    return ", ".join(labels) or "dense"
