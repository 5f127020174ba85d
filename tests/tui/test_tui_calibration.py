"""The Calibration screen on a fake worker: sources and mixtures written to the setup, inline problems,
the preview (the fake's documented data), and the real worker's preview computed in-process."""

from __future__ import annotations

import copy
import re
from collections import Counter

import pytest

from tui_support import SMALL, make_app, type_into, wait_for, worker_ready
from worker_support import async_test
from workbench.backends.fake import FAKE_DOCUMENTS, FAKE_TOP, fake_preview
from workbench.errors import UserError
from workbench.history import History
from workbench.screens.widgets import ConfirmModal, MessageModal
from workbench.spec import spec_from_dict


def _text(app, selector: str) -> str:
    widget = app.screen.query_one(selector)
    return str(widget.render()) if widget.display else ""


def _source(app) -> str:
    return app.session.data["calibration"]["source"]


def _validator_message(calibration: dict) -> str:
    with pytest.raises(UserError) as info:
        spec_from_dict({"calibration": calibration})
    return info.value.message


async def _open(pilot, tab: str = "tab-source") -> None:
    app = pilot.app
    await wait_for(pilot, lambda: app.screen.id == "screen-calibration", what="the Calibration screen")
    app.screen.query_one("#calibration-tabs").active = tab
    await pilot.pause()


async def _choose(pilot, value: str) -> None:
    """Pick a source kind, as choosing it from the focused list does, and let the screen handle it; the focus stays
    on the list (it never jumps by itself)."""
    select = pilot.app.screen.query_one("#source-kind")
    select.focus()
    select.value = value
    await pilot.pause()
    assert pilot.app.focused is select



@pytest.mark.slow
@async_test
async def test_each_kind_of_source_writes_its_source_string():
    app = make_app(start_screen="calibration", start_worker=False)
    async with app.run_test(size=SMALL) as pilot:
        await _open(pilot)
        assert _source(app) == "c4"  # quickstart's
        await _choose(pilot, "wikitext2")
        assert _source(app) == "wikitext2"
        assert not app.screen.query_one("#arg-line").display  # a bundled corpus takes no argument
        await _choose(pilot, "file")
        assert _source(app) == "file:"  # not valid yet: says so under the field
        assert _validator_message({"source": "file:"}) in _text(app, "#problem-source")
        await pilot.press("tab", *"data/my.txt")  # tab goes on from the choice to its argument
        assert _source(app) == "file:data/my.txt"
        assert not _text(app, "#problem-source")
        await _choose(pilot, "hf")
        await pilot.press("tab", *"allenai/c4:en:train")
        assert _source(app) == "hf:allenai/c4:en:train"
        await _choose(pilot, "selfgen")
        assert _source(app) == "selfgen"
        await pilot.press("tab", *"books")
        assert _source(app) == "selfgen:books"
        assert app.screen.query_one("#selfgen-warning").display  # the Preview tab warns that selfgen generates
        await _choose(pilot, "file")
        assert _source(app) == "file:data/my.txt"  # each kind keeps what was typed for it
        await _choose(pilot, "random")
        assert _source(app) == "random" and app.session.problem() is None


@async_test
async def test_a_mixture_composes_its_rows_and_shows_the_validators_message():
    app = make_app(start_screen="calibration")
    async with app.run_test(size=SMALL) as pilot:
        await _open(pilot)
        await _choose(pilot, "mix")
        assert _source(app) == "mix:c4=1"  # starts from the current source
        await type_into(pilot, "#mix-source", "selfgen")
        await type_into(pilot, "#mix-fraction", "0.5")
        await pilot.press("enter")
        assert _source(app) == "mix:c4=1,selfgen=0.5"
        expected = _validator_message({"source": "mix:c4=1,selfgen=0.5"})
        assert "sum to 1.5" in expected and expected in _text(app, "#problem-source")
        # enter on the c4 row puts it in the add fields; adding the same source replaces its fraction
        table = app.screen.query_one("#mix-table")
        table.focus()
        table.move_cursor(row=0)
        await pilot.press("enter")
        assert app.screen.query_one("#mix-source").value == "c4"
        await type_into(pilot, "#mix-fraction", "0.5")
        await pilot.press("enter")
        assert _source(app) == "mix:c4=0.5,selfgen=0.5"
        assert not _text(app, "#problem-source")
        # half of quickstart's 32 samples each
        assert [table.get_row_at(i) for i in range(table.row_count)] == [["c4", "0.5", "16"], ["selfgen", "0.5", "16"]]
        # a fraction rounding to no sample: the run would fail, so the screen says so now
        await type_into(pilot, "#f-nsamples", "1")
        assert "gets 0 of the 1 samples" in _text(app, "#problem-source")
        await type_into(pilot, "#f-nsamples", "32")
        table.focus()
        table.move_cursor(row=1)
        await pilot.press("delete")
        assert _source(app) == "mix:c4=0.5"
        assert _validator_message({"source": "mix:c4=0.5"}) in _text(app, "#problem-source")
        # run refuses the invalid mixture with the same message
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: isinstance(app.screen, MessageModal), what="the error modal")
        assert app.screen.message == _validator_message({"source": "mix:c4=0.5"})
        assert app.state.latest("run") is None


@async_test
async def test_sizes_and_selfgen_settings_edit_the_session_with_inline_problems():
    app = make_app(start_screen="calibration", start_worker=False)
    async with app.run_test(size=SMALL) as pilot:
        await _open(pilot)
        await type_into(pilot, "#f-nsamples", "0")
        assert app.session.data["calibration"]["nsamples"] == 0
        assert _validator_message({"nsamples": 0}) in _text(app, "#problem-source")
        await type_into(pilot, "#f-nsamples", "64")
        await type_into(pilot, "#f-seqlen", "")
        assert app.session.data["calibration"]["nsamples"] == 64
        assert "seqlen" not in app.session.data["calibration"]  # empty: the default applies
        assert not _text(app, "#problem-source")
        await _open(pilot, "tab-selfgen")
        await type_into(pilot, "#f-selfgen-temperature", "0")
        assert app.session.data["calibration"]["selfgen"]["temperature"] == 0.0
        message = _validator_message({"selfgen": {"temperature": 0.0}})
        assert message in _text(app, "#problem-selfgen")
        await type_into(pilot, "#f-selfgen-corpus", "books")
        await type_into(pilot, "#f-selfgen-temperature", "0.7")
        assert app.session.data["calibration"]["selfgen"] == {"temperature": 0.7, "corpus": "books"}
        assert not _text(app, "#problem-selfgen") and app.session.problem() is None


@async_test
async def test_preview_shows_the_fake_workers_statistics():
    app = make_app(start_screen="calibration")
    async with app.run_test(size=SMALL) as pilot:
        await _open(pilot)
        await worker_ready(pilot, app)
        await type_into(pilot, "#f-nsamples", "10")
        await type_into(pilot, "#f-seqlen", "100")
        await pilot.press("ctrl+l")
        await wait_for(pilot, lambda: app.state.latest("preview") is not None and not app.state.latest("preview").active,
                       what="the preview job")
        job = app.state.latest("preview")
        assert job.status == "finished"
        await wait_for(pilot, lambda: "distinct tokens" in _text(app, "#preview-stats"), what="the statistics")
        stats = _text(app, "#preview-stats")
        # the fake's formulas (backends/fake/ fake_preview) for c4, 10 windows of 100 tokens
        tokens = 10 * 100
        assert re.search(rf"documents +{FAKE_DOCUMENTS['c4']:,} +250,000 tokens", stats)
        assert re.search(rf"windows +10 +{tokens:,} tokens \(10 × 100\)", stats)
        assert re.search(rf"distinct tokens +{min(tokens, 8256) // 2:,}\s", stats)
        assert re.search(r"dense perplexity +40\.00 +on the first 8 windows", stats)  # the fake's dense c4 perplexity
        top_id, top_text = FAKE_TOP[0]
        assert f"{top_text!r} {tokens // 16 / tokens:.1%}" in stats
        samples = _text(app, "#preview-samples")
        assert all(f"fake window {i} of c4" in samples for i in range(3))
        assert History().runs() == []  # a preview is not a run
        assert "c4 · 10 × 100 tokens" in _text(app, "#preview-status")
        # a changed setting marks the preview stale
        await _open(pilot)
        await type_into(pilot, "#f-seed", "3")
        await _open(pilot, "tab-preview")
        assert "settings changed since" in _text(app, "#preview-status")


@async_test
async def test_previewing_selfgen_asks_first():
    app = make_app(start_screen="calibration")
    async with app.run_test(size=SMALL) as pilot:
        await _open(pilot)
        await worker_ready(pilot, app)
        await _choose(pilot, "selfgen")
        await pilot.press("ctrl+l")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmModal), what="the confirmation")
        await pilot.press("n")
        await wait_for(pilot, lambda: app.screen.id == "screen-calibration", what="the confirmation to close")
        assert app.state.latest("preview") is None
        await pilot.press("ctrl+l")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmModal), what="the confirmation")
        await pilot.press("y")
        await wait_for(pilot, lambda: getattr(app.state.latest("preview"), "status", None) == "finished", what="the preview")
        assert app.state.latest("preview").result["source"] == "selfgen"


@async_test
async def test_a_preview_job_reads_only_the_model_and_calibration_and_is_not_a_run():
    from worker_support import fake

    from workbench.backends.client import WorkerClient

    client = WorkerClient(fake(), history=History())
    await client.start()
    try:
        # a half-edited step does not block a preview; a bad calibration is refused before it is queued
        job = await client.submit("preview", spec={"calibration": {"source": "books", "nsamples": 4},
                                                   "steps": [{"type": "prune", "sparsity": 2.0}]})
        result = (await client.wait(job)).data["result"]
        assert (result["source"], result["documents"], result["tokens"]) == ("books", FAKE_DOCUMENTS["books"], 4 * 512)
        bad = await client.submit("preview", spec={"calibration": {"source": "mix:c4=0.7"}})
        error = (await client.wait(bad)).data
        assert error["kind"] == "bad_input" and error["message"] == _validator_message({"source": "mix:c4=0.7"})
        assert client.history.runs() == []
    finally:
        await client.close()


@pytest.mark.parametrize("source, kind", [
    ("c4", "c4"), ("random", "random"), ("selfgen", "selfgen"), ("selfgen:books", "selfgen"), ("file:data/my file.txt", "file"),
    ("hf:allenai/c4:en:train", "hf"), ("mix:c4=0.5,selfgen:books=0.5", "mix"), ("custom:arg", "other")])
def test_the_source_fields_give_back_the_source_they_were_filled_from(source, kind):
    from workbench.screens.calibration import compose_source, parse_source

    parsed = parse_source(source)
    assert parsed[0] == kind and compose_source(*parsed) == source
    # a mixture part without a fraction keeps its text, and the validator names it
    assert compose_source(*parse_source("mix:c4")) == "mix:c4="


def test_the_fake_preview_follows_its_documented_formulas():
    spec = spec_from_dict({"calibration": {"source": "random", "nsamples": 3, "seqlen": 64}})
    events = []
    result = fake_preview(spec, events.append)
    assert [e.type for e in events] == ["stage_started", "stage_finished"] * 2
    assert (result["documents"], result["document_tokens"]) == (None, None)  # random ids have no text
    assert (result["windows"], result["tokens"], result["distinct_tokens"]) == (3, 192, 96)
    assert [t["count"] for t in result["top_tokens"]] == [12, 6, 3, 1, 0]
    assert result["perplexity"] == 50.0 and result["perplexity_windows"] == 3


def test_the_workers_preview_counts_what_the_tokenizer_gives(one_thread):
    """The real preview on the demo model and WikiText-2, checked against the windows rebuilt independently."""
    from workbench.data.sampling import calibration_samples
    from workbench.data.corpora import wikitext2_text
    from workbench.models import load_model
    from workbench.data.preview import CHARS, PREVIEW_WINDOWS, preview_calibration

    spec = spec_from_dict({"calibration": {"source": "wikitext2", "nsamples": 5, "seqlen": 64, "seed": 3}})
    loaded = load_model("demo")
    events = []
    result = preview_calibration(spec, events.append, loaded=loaded)
    tok = loaded.tokenizer
    ids = calibration_samples("wikitext2", tok, 5, 64, 3)  # no cache: built again from the text
    flat = ids.reshape(-1).tolist()
    assert (result["windows"], result["seqlen"], result["tokens"]) == (5, 64, 5 * 64) and len(flat) == 5 * 64
    assert result["distinct_tokens"] == len(set(flat))
    counts = Counter(flat)
    assert [t["count"] for t in result["top_tokens"]] == sorted(counts.values(), reverse=True)[:10]
    assert all(counts[t["id"]] == t["count"] and t["text"] == tok.decode([t["id"]]) for t in result["top_tokens"])
    assert result["documents"] == 1  # WikiText-2 validation is one document
    text = wikitext2_text("valid")
    assert result["document_tokens"] == len(tok(text, add_special_tokens=False)["input_ids"])
    assert [s["text"] for s in result["samples"]] == [tok.decode(ids[i].tolist())[:CHARS] for i in range(3)]
    assert result["perplexity_windows"] == min(5, PREVIEW_WINDOWS) and 1.0 < result["perplexity"] < 1e5
    assert [e.type for e in events] == ["stage_started", "stage_finished"]  # the model was passed in: no load stage


@async_test
async def test_showing_the_screen_leaves_the_setup_as_it_was():
    app = make_app(start_screen="run", start_worker=False)
    app.session.set("calibration.source", "mix:books=0.25,selfgen:c4=0.75")
    app.session.set("calibration.selfgen", {"temperature": 0.7})
    before = copy.deepcopy(app.session.data)
    async with app.run_test(size=SMALL) as pilot:
        await wait_for(pilot, lambda: app.screen.id == "screen-run", what="the Run screen")
        await pilot.press("2")
        await _open(pilot)
        await pilot.pause(0.2)
        assert app.session.data == before  # widgets reporting their first values change nothing
        table = app.screen.query_one("#mix-table")
        assert [table.get_row_at(i) for i in range(table.row_count)] == [["books", "0.25", "8"], ["selfgen:c4", "0.75", "24"]]
        assert app.screen.query_one("#f-nsamples").value == "32"
        assert app.screen.query_one("#f-selfgen-temperature").value == "0.7"
