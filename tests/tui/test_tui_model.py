"""The Model screen on a fake worker: choosing the model (typed or browsed), inline problems, the backend
and its workers, and inspecting the model."""

from __future__ import annotations

import json

import pytest
from textual import events

from tui_support import SMALL, choose, fake_backend, make_app, type_into, wait_for, worker_ready
from worker_support import async_test
from workbench.backends.fake import FAKE_GPU_MEMORY, HIDDEN, LINEARS, VOCAB
from workbench.errors import UserError
from workbench.screens.browse import FolderModal, local_model_problem
from workbench.screens.widgets import MessageModal, human_bytes


def _text(app, selector: str) -> str:
    widget = app.screen.query_one(selector)
    return str(widget.render()) if widget.display else ""


async def _open_model(pilot, tab: str = "tab-model") -> None:
    app = pilot.app
    await wait_for(pilot, lambda: app.screen.id == "screen-model", what="the Model screen")
    app.screen.query_one("#model-tabs").active = tab
    await pilot.pause()




async def _paste(pilot, selector: str, text: str) -> None:
    """Focus an input, clear it and paste ``text`` into it (a path is pasted more often than typed)."""
    widget = pilot.app.screen.query_one(selector)
    widget.focus()
    widget.value = ""
    widget.post_message(events.Paste(text))
    await pilot.pause()


def test_model_folders_are_judged_as_the_engine_judges_them(tmp_path):
    """The screen's torch-free check gives the engine's own message for each kind of bad folder."""
    from workbench.models import resolve_model_source

    (tmp_path / "empty").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "weights.bin").write_bytes(b"0")
    for bad in (tmp_path / "missing", tmp_path / "empty", tmp_path / "weights.bin", "./relative/missing", "not a hub id"):
        with pytest.raises(UserError) as info:
            resolve_model_source(str(bad))
        problem = local_model_problem(str(bad))
        assert problem is not None and (problem.message, problem.hint) == (info.value.message, info.value.hint)
    for good in (tmp_path / "model", "demo", "org/name", "gpt2"):
        resolve_model_source(str(good))  # the engine accepts it (a hub id is only looked up when loaded)
        assert local_model_problem(str(good)) is None


@async_test
async def test_a_missing_folder_is_flagged_inline_with_the_engines_message(tmp_path):
    missing = tmp_path / "no-such-model"
    app = make_app(start_screen="model", start_worker=False)
    async with app.run_test(size=SMALL) as pilot:
        await _open_model(pilot)
        assert not _text(app, "#problem-name")  # the demo model is fine
        await choose(pilot, "#model-source", "local")
        await _paste(pilot, "#model-name", str(missing))
        await wait_for(pilot, lambda: app.session.data["model"]["name"] == str(missing), what="the typed name in the session")
        problem = _text(app, "#problem-name")
        assert f"model folder '{missing}' does not exist" in problem
        assert "what to do:" in problem
        # a file is not a model folder either
        (tmp_path / "weights.bin").write_bytes(b"0")
        await _paste(pilot, "#model-name", str(tmp_path / "weights.bin"))
        expected = f"'{tmp_path / 'weights.bin'}' is a file, not a model folder"
        await wait_for(pilot, lambda: expected in _text(app, "#problem-name"), what="the file problem")


@async_test
async def test_run_refuses_a_missing_model_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    app = make_app(start_screen="model")
    async with app.run_test(size=SMALL) as pilot:
        await _open_model(pilot)
        await worker_ready(pilot, app)
        await choose(pilot, "#model-source", "local")
        await _paste(pilot, "#model-name", str(missing))
        assert app.session.problem() is not None  # what ctrl+r checks
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: isinstance(app.screen, MessageModal), what="the error modal")
        assert app.screen.message == f"model folder '{missing}' does not exist"
        assert app.state.latest("run") is None  # nothing was submitted


@async_test
async def test_a_folder_picked_in_the_browser_becomes_the_model(tmp_path):
    models = tmp_path / "models"
    (models / "tiny").mkdir(parents=True)
    (models / "tiny" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    app = make_app(start_screen="model", start_worker=False)
    async with app.run_test(size=SMALL) as pilot:
        await _open_model(pilot)
        await choose(pilot, "#model-source", "local")
        await _paste(pilot, "#model-name", str(models))
        # a folder without config.json is not a model
        await wait_for(pilot, lambda: f"model folder '{models}' has no config.json" in _text(app, "#problem-name"),
                       what="the folder problem")
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: isinstance(app.screen, FolderModal), what="the folder browser")
        tree = app.screen.query_one("#folder-tree")
        await wait_for(pilot, lambda: len(tree.root.children) == 1, what="the tree to list the folder")
        await pilot.press("down")
        await wait_for(pilot, lambda: "config.json found" in _text(app, "#folder-note"), what="the folder note")
        await pilot.press("u")
        await wait_for(pilot, lambda: app.screen.id == "screen-model", what="the browser to close")
        assert app.session.data["model"]["name"] == str(models / "tiny")
        assert app.screen.query_one("#model-name").value == str(models / "tiny")
        assert not _text(app, "#problem-name")
        assert app.session.problem() is None


@async_test
async def test_dtype_device_and_trust_remote_code_edit_the_session():
    app = make_app(start_screen="model", start_worker=False)
    async with app.run_test(size=SMALL) as pilot:
        await _open_model(pilot)
        await choose(pilot, "#model-dtype", "bfloat16")
        await type_into(pilot, "#model-device", "gpu")
        await wait_for(pilot, lambda: app.session.data["model"].get("device") == "gpu", what="the device in the session")
        assert app.session.data["model"]["dtype"] == "bfloat16"
        with pytest.raises(UserError) as info:  # the validator's own message
            app.session.spec()
        assert info.value.message in _text(app, "#problem-device")
        assert not _text(app, "#problem-name")
        await type_into(pilot, "#model-device", "cuda:1")
        await wait_for(pilot, lambda: not _text(app, "#problem-device"), what="the device problem to clear")
        assert not app.screen.query_one("#trust-warning").display
        app.screen.query_one("#model-trust").focus()
        await pilot.press("space")
        await wait_for(pilot, lambda: app.session.data["model"].get("trust_remote_code") is True, what="trust_remote_code")
        assert app.screen.query_one("#trust-warning").display


@async_test
async def test_inspect_shows_the_fake_models_shapes_and_memory():
    app = make_app(start_screen="model")  # quickstart: 32 calibration samples of 256 tokens
    async with app.run_test(size=SMALL) as pilot:
        await _open_model(pilot)
        await worker_ready(pilot, app)
        await pilot.press("ctrl+l")
        await wait_for(pilot, lambda: getattr(app.state.latest("inspect"), "status", None) == "finished", what="the inspect job")
        table = app.screen.query_one("#inspect-linears")
        await wait_for(pilot, lambda: table.row_count == len(LINEARS), what="the linears table")
        rows = [table.get_row_at(i) for i in range(table.row_count)]
        assert rows == [[name, f"{o:,}", f"{i:,}", f"{o * i:,}"] for name, (o, i) in LINEARS.items()]
        # the fake's documented model: 8 layers of the demo model's linears and two norms, embeddings, LM head, final norm
        total = 8 * (sum(o * i for o, i in LINEARS.values()) + 2 * HIDDEN) + 2 * VOCAB * HIDDEN + HIDDEN
        summary = _text(app, "#inspect-summary")
        assert f"{total:,}" in summary and "8 layers" in summary and f"vocab {VOCAB:,}" in summary
        memory = _text(app, "#inspect-memory")
        assert human_bytes(total * 4) in memory.splitlines()[1]  # weights at float32
        per_sample = 2 * 256 * HIDDEN * 4  # layer input and output, 256 tokens (the preset's seqlen)
        assert f"{human_bytes(per_sample * 32)}" in memory and "32 samples of 256 tokens" in memory


@pytest.mark.slow
@async_test
async def test_a_bad_gpu_list_is_flagged_and_the_workers_keep_running():
    from workbench.backends.transports import parse_backend, parse_gpus

    app = make_app(start_screen="model")
    async with app.run_test(size=SMALL) as pilot:
        await _open_model(pilot, "tab-backend")
        await worker_ready(pilot, app)
        pool, pid = app.bridge.pool, next(iter(app.state.workers.values())).hello["pid"]
        for field, text, expected in (("#backend-gpus", "0,1.5", lambda: parse_gpus("0,1.5")),
                                      ("#backend-gpus", "0,0", lambda: parse_gpus("0,0")),
                                      ("#backend-where", "ssh://bad host", lambda: parse_backend("ssh://bad host"))):
            with pytest.raises(UserError) as info:
                expected()
            await type_into(pilot, field, text)
            await wait_for(pilot, lambda: info.value.message in _text(app, "#problem-backend"), what=f"the problem of {text}")
            await pilot.press("enter")  # apply
            await pilot.pause(0.2)
            assert app.bridge.pool is pool and next(iter(app.state.workers.values())).hello["pid"] == pid
            await type_into(pilot, field, "" if field == "#backend-gpus" else "local")
        await wait_for(pilot, lambda: not _text(app, "#problem-backend"), what="the problem to clear")
        await type_into(pilot, "#backend-where", "inprocess")
        await wait_for(pilot, lambda: "never loads torch" in _text(app, "#problem-backend"), what="the in-process refusal")
        assert app.session.backend.where == "local" and app.session.backend.gpus == ""


@async_test
async def test_the_hello_shows_the_fake_gpu_and_a_gpu_list_starts_a_worker_per_gpu(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # the fake reports GPU 0 then
    app = make_app(start_screen="model")
    async with app.run_test(size=SMALL) as pilot:
        await _open_model(pilot, "tab-backend")
        await worker_ready(pilot, app)
        await wait_for(pilot, lambda: "Fake GPU 0" in _text(app, "#workers"), what="the hello's GPU")
        assert f"free of {human_bytes(FAKE_GPU_MEMORY)}" in _text(app, "#workers")
        old_pid = next(iter(app.state.workers.values())).hello["pid"]
        await type_into(pilot, "#backend-gpus", "0,1")
        await pilot.press("enter")
        await wait_for(pilot, lambda: sorted(app.state.workers) == ["local, GPU 0", "local, GPU 1"]
                       and all(w.status == "ready" for w in app.state.workers.values()), what="a worker per GPU")
        await wait_for(pilot, lambda: "Fake GPU 1" in _text(app, "#workers"), what="the second GPU")
        assert app.session.backend.gpus == "0,1"
        assert old_pid not in {w.hello["pid"] for w in app.state.workers.values()}


@async_test
async def test_an_inspect_whose_worker_dies_explains_it_inline():
    app = make_app(start_screen="model", backend=fake_backend(delay=5.0))  # loading takes 5 s: time to kill it
    async with app.run_test(size=SMALL) as pilot:
        await _open_model(pilot)
        await worker_ready(pilot, app)
        await pilot.press("ctrl+l")
        await wait_for(pilot, lambda: app.state.latest("inspect") is not None and app.state.latest("inspect").status == "running",
                       what="the inspect job to start")
        assert app.screen.query_one("#inspect-summary").loading  # a loading indicator while it runs
        app.bridge.kill_worker()
        await wait_for(pilot, lambda: app.state.latest("inspect").status == "failed", what="the job to fail")
        await wait_for(pilot, lambda: "(inspect)" in _text(app, "#inspect-summary"), what="the failure on screen")
        summary = _text(app, "#inspect-summary")
        assert "the worker (local)" in summary and "while running job" in summary
        assert "what to do:" in summary and "out-of-memory killer" in summary  # the hint for a SIGKILL
        assert not app.screen.query_one("#inspect-summary").loading
        assert not app.screen.query_one("#inspect-linears").display


def test_a_dead_workers_reason_is_shown():
    from workbench.backends.client import Update
    from workbench.screens.model import worker_text
    from workbench.screens.state import UIState

    state = UIState()
    state.apply(Update("local", "died", data={"reason": "was killed by SIGKILL"}))
    text = worker_text(state.workers["local"])
    assert "local" in text and "dead" in text and "the worker was killed by SIGKILL" in text


@async_test
async def test_showing_the_screen_leaves_the_setup_as_it_was(tmp_path):
    app = make_app(start_screen="run", start_worker=False)
    (tmp_path / "config.json").write_text("{}")
    for key, value in (("model.name", str(tmp_path)), ("model.device", "cuda:1"), ("model.dtype", "fp8")):
        app.session.set(key, value)
    before = json.dumps(app.session.data, sort_keys=True)
    async with app.run_test(size=SMALL) as pilot:
        await wait_for(pilot, lambda: app.screen.id == "screen-run", what="the Run screen")
        await pilot.press("1")
        await _open_model(pilot)
        await pilot.pause(0.2)
        assert json.dumps(app.session.data, sort_keys=True) == before  # widgets reporting their first values change nothing
        assert app.screen.query_one("#model-source").value == "local"
        assert app.screen.query_one("#model-name").value == str(tmp_path)
        assert app.screen.query_one("#model-device").value == "cuda:1"
        assert "model.dtype = 'fp8'" in _text(app, "#problem-dtype")  # shown, not replaced
