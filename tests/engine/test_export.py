"""Export: a plain Hugging Face folder plus compression.json, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import workbench
from workbench import export as export_mod
from workbench.errors import RunError, UserError
from workbench.export import INFO_FILE, export_model, read_export_info
from workbench.models import DEMO_MODEL_DIR, get_adapter, weight_matrix


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)


def _sparsify(model, fraction=0.5, seed=0):
    """Zero about ``fraction`` of every decoder linear weight, in place through weight_matrix."""
    adapter = get_adapter(model)
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    with torch.no_grad():
        for i, layer in enumerate(adapter.layers):
            for name, module in adapter.linear_modules(layer).items():
                w = weight_matrix(module)
                mask = torch.rand(w.shape, generator=gen) < fraction
                w[mask] = 0
                masks[f"{i}.{name}"] = mask
    return masks


def _zero_positions(model):
    adapter = get_adapter(model)
    return {
        f"{i}.{name}": weight_matrix(m) == 0
        for i, layer in enumerate(adapter.layers)
        for name, m in adapter.linear_modules(layer).items()
    }


@pytest.fixture
def tiny_llama(tokenizer):
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama", hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=128,
        bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    _sparsify(model)
    return model


INFO = {
    "spec": {"method": "magnitude", "sparsity": 0.5, "model": "tiny"},
    "layers": [{"index": 0, "sparsity": 0.5}, {"index": 1, "sparsity": 0.5}],
    "metrics": {"ppl_before": 12.5, "ppl_after": 14.25},
    "timings": {"total_s": 1.5},
}


def _ids():
    return torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_round_trip_is_exact(tiny_llama, tokenizer, tmp_path):
    out = tmp_path / "export" / "pruned"
    zeros_before = _zero_positions(tiny_llama)
    total = sum(m.numel() for m in zeros_before.values())
    assert 0.45 < sum(m.sum().item() for m in zeros_before.values()) / total < 0.55

    result = export_model(tiny_llama, tokenizer, out, INFO)
    assert result == out.absolute() and result.is_dir()
    assert any(result.glob("*.safetensors")) and not any(result.glob("*.bin"))
    assert _leftovers(out.parent, "pruned") == []

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(tiny_llama)
    assert reloaded.dtype == tiny_llama.dtype == torch.float32
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, tiny_llama(ids).logits)
    zeros_after = _zero_positions(reloaded)
    assert zeros_after.keys() == zeros_before.keys()
    for key in zeros_before:
        assert torch.equal(zeros_after[key], zeros_before[key]), key
    for (name, a), (_, b) in zip(tiny_llama.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name

    tok = AutoTokenizer.from_pretrained(out)
    text = "Exported, and back again."
    assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert tok.decode(tok(text)["input_ids"]) == text


def test_compression_json(tiny_llama, tokenizer, tmp_path):
    info = dict(INFO, extra={"path": tmp_path / "x", "dtype": torch.bfloat16, "t": torch.tensor(0.25)})
    out = export_model(tiny_llama, tokenizer, tmp_path / "out", info)
    text = (out / INFO_FILE).read_text()
    data = json.loads(text)
    assert text.startswith("{\n  ")  # indent=2
    for key in ("spec", "layers", "metrics", "timings"):
        assert data[key] == INFO[key]
    assert data["extra"] == {"path": str(tmp_path / "x"), "dtype": "bfloat16", "t": 0.25}
    assert data["versions"]["torch"] == torch.__version__
    assert data["versions"]["transformers"] == transformers.__version__
    assert data["versions"]["workbench"] == workbench.__version__
    assert read_export_info(out) == data
    assert "versions" not in INFO  # the caller's dict is not modified


def test_given_versions_are_kept(tiny_llama, tokenizer, tmp_path):
    out = export_model(tiny_llama, tokenizer, tmp_path / "out", {"versions": {"torch": "custom"}})
    versions = read_export_info(out)["versions"]
    assert versions["torch"] == "custom" and versions["transformers"] == transformers.__version__


def test_export_in_another_dtype(tiny_llama, tokenizer, tmp_path):
    out = export_model(tiny_llama, tokenizer, tmp_path / "bf16", INFO, dtype="bfloat16")
    assert next(tiny_llama.parameters()).dtype == torch.float32  # the model itself is untouched
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.dtype == torch.bfloat16
    for (name, a), (_, b) in zip(tiny_llama.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16), b), name
    zeros = _zero_positions(reloaded)
    for key, mask in _zero_positions(tiny_llama).items():
        assert torch.equal(zeros[key], mask)


def test_gpt2_round_trip_tied_and_conv1d(tokenizer, tmp_path):
    torch.manual_seed(0)
    config = AutoConfig.for_model("gpt2", n_embd=64, n_head=4, n_layer=2, vocab_size=512, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    model = AutoModelForCausalLM.from_config(config).eval()
    _sparsify(model)
    out = export_model(model, tokenizer, tmp_path / "gpt2", {"spec": {}})
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert get_adapter(reloaded).tied_lm_head
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    zeros = _zero_positions(reloaded)
    for key, mask in _zero_positions(model).items():
        assert torch.equal(zeros[key], mask)


def _failing_save(model, monkeypatch, exc=RuntimeError("disk on fire")):
    real = model.save_pretrained

    def save(folder, *args, **kwargs):
        real(folder, *args, **kwargs)  # write real files first, then fail midway
        (Path(folder) / "partial.tmp").write_text("x")
        raise exc

    monkeypatch.setattr(model, "save_pretrained", save)


def test_failed_export_leaves_nothing(tiny_llama, tokenizer, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _failing_save(tiny_llama, monkeypatch)
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_model(tiny_llama, tokenizer, out, INFO)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_reexport_replaces_an_earlier_export_only_when_asked(tiny_llama, tokenizer, tmp_path):
    out = tmp_path / "out"
    export_model(tiny_llama, tokenizer, out, {"run": 1})
    info = read_export_info(out)
    assert info["exported_by"].startswith("workbench")
    assert sorted(info["files"]) == sorted(p.name for p in out.iterdir())
    before = _snapshot(out)
    with pytest.raises(UserError) as err:
        export_model(tiny_llama, tokenizer, out, {"run": 2})
    assert "earlier workbench export" in err.value.message and "--overwrite" in err.value.hint
    assert _snapshot(out) == before
    export_model(tiny_llama, tokenizer, out, {"run": 2}, overwrite=True)
    assert read_export_info(out)["run"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    AutoModelForCausalLM.from_pretrained(out)


def _snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes (and every folder), to compare byte for byte."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def _user_folder(folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("my notes")
    (folder / "data").mkdir()
    (folder / "data" / "train.jsonl").write_bytes(b'{"text": "mine"}\n' * 3)
    (folder / ".hidden").write_bytes(bytes(range(256)))
    return _snapshot(folder)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_that_is_not_an_export_is_never_touched(tiny_llama, tokenizer, tmp_path, overwrite):
    out = tmp_path / "mine"
    before = _user_folder(out)
    with pytest.raises(UserError) as err:
        export_model(tiny_llama, tokenizer, out, INFO, overwrite=overwrite)
    assert "not a workbench export" in err.value.message and str(out) in err.value.message
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]


def test_an_export_holding_user_files_is_not_replaced(tiny_llama, tokenizer, tmp_path):
    out = tmp_path / "out"
    export_model(tiny_llama, tokenizer, out, {"run": 1})
    (out / "notes.txt").write_text("written by the user after the export")
    (out / "eval").mkdir()
    before = _snapshot(out)
    with pytest.raises(UserError) as err:
        export_model(tiny_llama, tokenizer, out, {"run": 2}, overwrite=True)
    assert "notes.txt" in err.value.message and "eval/" in err.value.message
    assert _snapshot(out) == before


def test_an_older_export_without_a_file_list_is_replaced_when_asked(tiny_llama, tokenizer, tmp_path):
    out = tmp_path / "out"
    export_model(tiny_llama, tokenizer, out, {"run": 1})
    info = read_export_info(out)
    del info["files"], info["exported_by"]  # what exports wrote before they named themselves
    (out / INFO_FILE).write_text(json.dumps(info))
    export_model(tiny_llama, tokenizer, out, {"run": 2}, overwrite=True)
    assert read_export_info(out)["run"] == 2


def test_an_empty_folder_is_filled_and_kept(tiny_llama, tokenizer, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    inode = out.stat().st_ino
    export_model(tiny_llama, tokenizer, out, INFO)
    assert out.stat().st_ino == inode  # the user's folder itself, not a replacement
    assert read_export_info(out)["spec"] == INFO["spec"]
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]
    AutoModelForCausalLM.from_pretrained(out)


def test_stale_temporary_folders_are_cleaned_by_the_next_export(tiny_llama, tokenizer, tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / ".out.tmp-0badf00d"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    (stale / ".workbench-partial").write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid}))
    live = tmp_path / ".out.tmp-00c0ffee"  # another export to the same folder, still being written
    live.mkdir()
    (live / ".workbench-partial").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    not_ours = tmp_path / ".out.tmp-mine"  # not our naming: never touched
    not_ours.mkdir()
    other = tmp_path / ".other.tmp-0badf00d"  # another export's name: not this export's business
    other.mkdir()
    messages = []
    export_model(tiny_llama, tokenizer, tmp_path / "out", INFO, log=messages.append)
    assert not stale.exists()
    assert live.is_dir() and not_ours.is_dir() and other.is_dir()
    assert any(".out.tmp-0badf00d" in m for m in messages)


def test_an_interrupted_replacement_is_put_back(tiny_llama, tokenizer, tmp_path):
    out = tmp_path / "out"
    export_model(tiny_llama, tokenizer, out, {"run": 1})
    aside = tmp_path / ".out.old-12345678"
    os.rename(out, aside)  # killed between moving the old export aside and moving the new one in
    export_model(tiny_llama, tokenizer, tmp_path / "out2", {"run": 9})  # another name: leaves it alone
    assert aside.is_dir()
    with pytest.raises(UserError):  # the old export is back in place first, and needs --overwrite
        export_model(tiny_llama, tokenizer, out, {"run": 2})
    assert read_export_info(out)["run"] == 1 and not aside.exists()


def test_failed_reexport_keeps_old_folder(tiny_llama, tokenizer, tmp_path, monkeypatch):
    out = tmp_path / "out"
    export_model(tiny_llama, tokenizer, out, {"run": 1})
    before = sorted(p.name for p in out.iterdir())
    _failing_save(tiny_llama, monkeypatch)
    with pytest.raises(RuntimeError):
        export_model(tiny_llama, tokenizer, out, {"run": 2}, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before
    assert read_export_info(out)["run"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with torch.no_grad():
        ids = _ids()
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out)(ids).logits, tiny_llama(ids).logits)


def test_os_error_becomes_run_error(tiny_llama, tokenizer, tmp_path, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tokenizer, "save_pretrained", no_space)
    with pytest.raises(RunError, match="No space left"):
        export_model(tiny_llama, tokenizer, tmp_path / "out", INFO)
    assert list(tmp_path.iterdir()) == []


def test_failed_swap_restores_old_folder(tiny_llama, tokenizer, tmp_path, monkeypatch):
    out = tmp_path / "out"
    export_model(tiny_llama, tokenizer, out, {"run": 1})
    real_rename = export_mod.os.rename
    calls = []

    def rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # old aside worked; new into place fails
            raise PermissionError(13, "Permission denied")
        return real_rename(src, dst)

    monkeypatch.setattr(export_mod.os, "rename", rename)
    with pytest.raises(RunError):
        export_model(tiny_llama, tokenizer, out, {"run": 2}, overwrite=True)
    assert read_export_info(out)["run"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_refuses_existing_file(tiny_llama, tokenizer, tmp_path):
    target = tmp_path / "model.bin"
    target.write_text("keep me")
    with pytest.raises(UserError) as err:
        export_model(tiny_llama, tokenizer, target, INFO)
    assert "file" in err.value.message
    assert target.read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_refuses_bad_dtype_and_demo_folder(tiny_llama, tokenizer, tmp_path):
    with pytest.raises(UserError, match="int8"):
        export_model(tiny_llama, tokenizer, tmp_path / "out", INFO, dtype="int8")
    with pytest.raises(UserError, match="demo"):
        export_model(tiny_llama, tokenizer, DEMO_MODEL_DIR, INFO)
    assert list(tmp_path.iterdir()) == []
    assert (DEMO_MODEL_DIR / "config.json").is_file()
