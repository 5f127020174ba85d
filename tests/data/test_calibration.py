"""Calibration samples: the reference sampling protocol, sources, disk cache, errors."""

from __future__ import annotations

import warnings

import csv
import gzip
import json
from pathlib import Path

import pytest
import torch

from workbench.data import cache as wb_cache, corpora, sampling, sources
from workbench.data.sampling import calibration_samples
from workbench.data.sources import describe_source, register_source, source_names
from workbench.errors import UserError

DEMO = Path(sources.__file__).resolve().parents[1] / "assets" / "demo-llama"
DATA = Path(sources.__file__).resolve().parents[1] / "assets" / "data"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(DEMO))


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False, verbose=False)["input_ids"]


def find_window(sample: list[int], docs_ids: list[list[int]]) -> tuple[int, int] | None:
    """(document index, start) of the first place ``sample`` occurs contiguously, or None."""
    n = len(sample)
    for d, ids in enumerate(docs_ids):
        first = sample[0]
        for start in range(len(ids) - n + 1):
            if ids[start] == first and ids[start : start + n] == sample:
                return d, start
    return None


def words_text(tag: str, n: int) -> str:
    """Distinct, deterministic English-like text (so windows are unambiguous)."""
    return " ".join(f"{tag} sentence {i} says {i * 7919 % 1009} apples." for i in range(n))


@pytest.fixture(scope="module")
def c4_ids(tok):
    # Read the bundled file here, independently of workbench.data.corpora.
    with gzip.open(DATA / "c4-train-1000.jsonl.gz", "rt", encoding="utf-8") as fh:
        docs = [json.loads(line)["text"] for line in fh]
    assert len(docs) == 1000
    return [encode(tok, d) for d in docs]


# ----------------------------------------------------------------- basics


def test_shape_and_dtype(tok):
    x = calibration_samples("c4", tok, nsamples=6, seqlen=48)
    assert isinstance(x, torch.Tensor)
    assert x.shape == (6, 48)
    assert x.dtype == torch.long
    assert x.device.type == "cpu"


def test_deterministic_per_seed_and_different_across_seeds(tok):
    a = calibration_samples("c4", tok, nsamples=8, seqlen=32, seed=0)
    b = calibration_samples("c4", tok, nsamples=8, seqlen=32, seed=0)
    c = calibration_samples("c4", tok, nsamples=8, seqlen=32, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # The first k samples of a larger request are the k-sample request.
    assert torch.equal(calibration_samples("c4", tok, nsamples=3, seqlen=32, seed=0), a[:3])


def test_c4_samples_are_windows_of_long_documents(tok, c4_ids):
    seqlen = 64
    x = calibration_samples("c4", tok, nsamples=6, seqlen=seqlen, seed=3)
    for row in x.tolist():
        hit = find_window(row, c4_ids)
        assert hit is not None, "a sample is not a contiguous window of any C4 document"
        assert len(c4_ids[hit[0]]) > seqlen
    # Random documents, not one: six samples should come from several.
    assert len({find_window(row, c4_ids)[0] for row in x.tolist()}) > 1


def test_wikitext2_samples_are_windows_of_the_validation_text(tok):
    raw = (DATA / "wikitext2-valid.raw").read_text(encoding="utf-8")
    rows = [line + "\n" if line.strip() else "" for line in raw.split("\n")[:-1]]
    ids = encode(tok, "\n\n".join(rows))
    x = calibration_samples("wikitext2", tok, nsamples=5, seqlen=40, seed=7)
    starts = set()
    for row in x.tolist():
        hit = find_window(row, [ids])
        assert hit is not None
        starts.add(hit[1])
    assert len(starts) == 5


def test_random_ids_are_in_range_and_not_special(tok):
    x = calibration_samples("random", tok, nsamples=4, seqlen=512, seed=0)
    assert x.shape == (4, 512) and x.dtype == torch.long
    assert int(x.min()) >= 0 and int(x.max()) < len(tok)
    special = set(tok.all_special_ids)
    assert special and not special & set(x.flatten().tolist())
    assert torch.equal(x, calibration_samples("random", tok, nsamples=4, seqlen=512, seed=0))
    assert not torch.equal(x, calibration_samples("random", tok, nsamples=4, seqlen=512, seed=1))
    # Spread over the vocabulary, not a few ids.
    assert len(set(x.flatten().tolist())) > 1000


# ------------------------------------------------------------------ files


def check_windows_of(x: torch.Tensor, docs_ids: list[list[int]]) -> None:
    for row in x.tolist():
        assert find_window(row, docs_ids) is not None


def test_txt_file_is_one_document(tok, tmp_path):
    text = words_text("txt", 120)
    path = tmp_path / "notes.txt"
    path.write_text(text, encoding="utf-8")
    x = calibration_samples(f"file:{path}", tok, nsamples=6, seqlen=32, seed=0)
    check_windows_of(x, [encode(tok, text)])
    assert corpora.file_documents(path) == [text]


def test_txt_file_crlf_is_read_as_lf(tmp_path):
    path = tmp_path / "dos.txt"
    path.write_bytes(b"line one\r\nline two\r\n")
    assert corpora.file_documents(path) == ["line one\nline two\n"]


def doc_set():
    return [words_text("alpha", 40), "short one", words_text("beta", 60), words_text("gamma", 30)]


def test_jsonl_file(tok, tmp_path):
    docs = doc_set()
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "text": d}) for i, d in enumerate(docs)) + "\n", encoding="utf-8")
    assert corpora.file_documents(path) == docs
    x = calibration_samples(f"file:{path}", tok, nsamples=8, seqlen=32, seed=0)
    check_windows_of(x, [encode(tok, d) for d in docs])


def test_json_file(tok, tmp_path):
    docs = doc_set()
    path = tmp_path / "docs.json"
    path.write_text(json.dumps([{"text": d} for d in docs]), encoding="utf-8")
    assert corpora.file_documents(path) == docs


def test_csv_file(tok, tmp_path):
    docs = doc_set()
    path = tmp_path / "docs.csv"
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["label", "text"])
        for i, d in enumerate(docs):
            writer.writerow([i, d])
    assert corpora.file_documents(path) == docs
    x = calibration_samples(f"file:{path}", tok, nsamples=8, seqlen=32, seed=0)
    check_windows_of(x, [encode(tok, d) for d in docs])


def test_parquet_file(tok, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    docs = doc_set()
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), path)
    assert corpora.file_documents(path) == docs
    x = calibration_samples(f"file:{path}", tok, nsamples=8, seqlen=32, seed=0)
    check_windows_of(x, [encode(tok, d) for d in docs])


# ------------------------------------------------------------------ cache


@pytest.fixture
def count_encodes(monkeypatch):
    calls = {"n": 0}
    real = sampling.encode

    def counted(tokenizer, text):
        calls["n"] += 1
        return real(tokenizer, text)

    monkeypatch.setattr(sampling, "encode", counted)
    return calls


def test_cache_hit_and_misses(tok, tmp_path, count_encodes):
    cache = tmp_path / "cache"
    src = tmp_path / "data.txt"
    src.write_text(words_text("cache", 80), encoding="utf-8")
    source = f"file:{src}"

    first = calibration_samples(source, tok, nsamples=4, seqlen=32, seed=0, cache_dir=cache)
    assert count_encodes["n"] == 1
    assert len(list(cache.glob("*.pt"))) == 1
    assert not list(cache.glob("*.tmp"))

    again = calibration_samples(source, tok, nsamples=4, seqlen=32, seed=0, cache_dir=cache)
    assert count_encodes["n"] == 1, "a cache hit must not tokenize"
    assert torch.equal(first, again)

    for kwargs in ({"nsamples": 5, "seqlen": 32, "seed": 0}, {"nsamples": 4, "seqlen": 24, "seed": 0}, {"nsamples": 4, "seqlen": 32, "seed": 1}):
        before = count_encodes["n"]
        calibration_samples(source, tok, cache_dir=cache, **kwargs)
        assert count_encodes["n"] == before + 1, f"cache should miss for {kwargs}"
    assert len(list(cache.glob("*.pt"))) == 4

    # Same size, different content: the cache must miss and follow the new text.
    new_text = words_text("CACHE", 80)
    assert len(new_text) == src.stat().st_size
    src.write_text(new_text, encoding="utf-8")
    before = count_encodes["n"]
    changed = calibration_samples(source, tok, nsamples=4, seqlen=32, seed=0, cache_dir=cache)
    assert count_encodes["n"] == before + 1
    check_windows_of(changed, [encode(tok, new_text)])


def test_cache_misses_for_another_tokenizer(tok, tmp_path, count_encodes):
    from transformers import AutoTokenizer

    cache = tmp_path / "cache"
    calibration_samples("wikitext2", tok, nsamples=2, seqlen=16, cache_dir=cache)
    other = AutoTokenizer.from_pretrained(str(DEMO))
    other.add_tokens(["zzqqxx"])
    assert wb_cache.tokenizer_fingerprint(other) != wb_cache.tokenizer_fingerprint(tok)
    before = count_encodes["n"]
    calibration_samples("wikitext2", other, nsamples=2, seqlen=16, cache_dir=cache)
    assert count_encodes["n"] == before + 1


def test_corrupt_cache_file_is_rebuilt(tok, tmp_path):
    cache = tmp_path / "cache"
    first = calibration_samples("c4", tok, nsamples=2, seqlen=16, cache_dir=cache)
    (path,) = cache.glob("*.pt")
    path.write_bytes(b"not a torch file")
    assert torch.equal(calibration_samples("c4", tok, nsamples=2, seqlen=16, cache_dir=cache), first)
    assert torch.equal(torch.load(path, weights_only=True)["input_ids"], first)


# ------------------------------------------------------------------ errors


def test_unknown_source_lists_the_sources(tok):
    with pytest.raises(UserError) as err:
        calibration_samples("bookcorpus", tok, nsamples=1, seqlen=8)
    text = str(err.value)
    for name in ("c4", "wikitext2", "file:PATH", "hf:", "random"):
        assert name in text
    assert err.value.exit_code == 2


@pytest.mark.parametrize("source", ["file", "file:", "c4:extra", "random:1"])
def test_malformed_sources(tok, source):
    with pytest.raises(UserError):
        calibration_samples(source, tok, nsamples=1, seqlen=8)


def test_missing_file(tok, tmp_path):
    with pytest.raises(UserError, match="no such file"):
        calibration_samples(f"file:{tmp_path / 'absent.txt'}", tok, nsamples=1, seqlen=8)


def test_missing_file_with_cache_dir(tok, tmp_path):
    with pytest.raises(UserError, match="no such file"):
        calibration_samples(f"file:{tmp_path / 'absent.txt'}", tok, nsamples=1, seqlen=8, cache_dir=tmp_path)


def test_empty_file(tok, tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("", encoding="utf-8")
    with pytest.raises(UserError, match="empty"):
        calibration_samples(f"file:{path}", tok, nsamples=1, seqlen=8)
    path.write_text("  \n\n ", encoding="utf-8")
    with pytest.raises(UserError, match="empty"):
        corpora.file_documents(path)


def test_binary_file(tok, tmp_path):
    path = tmp_path / "blob.txt"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UserError, match="binary"):
        calibration_samples(f"file:{path}", tok, nsamples=1, seqlen=8)


def test_invalid_utf8_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    with pytest.raises(UserError, match="UTF-8"):
        corpora.file_documents(path)


def test_unknown_extension_lists_supported(tmp_path):
    path = tmp_path / "report.docx"
    path.write_bytes(b"PK\x03\x04")
    with pytest.raises(UserError) as err:
        corpora.file_documents(path)
    assert ".docx" in str(err.value)
    for suffix in (".txt", ".jsonl", ".json", ".csv", ".parquet"):
        assert suffix in str(err.value)


def test_jsonl_without_text_field_names_the_fields(tok, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"body": "hello", "title": "x"}\n', encoding="utf-8")
    with pytest.raises(UserError) as err:
        calibration_samples(f"file:{path}", tok, nsamples=1, seqlen=8)
    assert "'body'" in str(err.value) and "'title'" in str(err.value)


def test_csv_without_text_field_names_the_fields(tmp_path):
    path = tmp_path / "docs.csv"
    path.write_text("label,sentence\n1,hello\n", encoding="utf-8")
    with pytest.raises(UserError, match="sentence"):
        corpora.file_documents(path)


def test_too_many_samples_says_how_many_fit(tok, tmp_path):
    text = words_text("few", 30)
    path = tmp_path / "few.txt"
    path.write_text(text, encoding="utf-8")
    seqlen = 64
    length = len(encode(tok, text))
    fit = length // seqlen  # non-overlapping windows
    distinct = length - seqlen  # start positions the protocol can draw
    assert 1 <= fit < distinct
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert calibration_samples(f"file:{path}", tok, nsamples=fit, seqlen=seqlen).shape == (fit, seqlen)
    with pytest.warns(UserWarning, match=f"only {fit} non-overlapping"):
        assert calibration_samples(f"file:{path}", tok, nsamples=fit + 1, seqlen=seqlen).shape == (fit + 1, seqlen)
    with pytest.raises(UserError) as err:
        calibration_samples(f"file:{path}", tok, nsamples=distinct + 1, seqlen=seqlen)
    assert f"only {distinct} distinct" in err.value.message
    assert "samples" in err.value.hint and "seqlen" in err.value.hint


def test_no_document_long_enough(tok, tmp_path):
    path = tmp_path / "short.jsonl"
    path.write_text("".join(json.dumps({"text": f"tiny doc {i}"}) + "\n" for i in range(50)), encoding="utf-8")
    with pytest.raises(UserError, match="longer than 32 tokens"):
        calibration_samples(f"file:{path}", tok, nsamples=2, seqlen=32)


def test_bad_counts(tok):
    for kwargs in ({"nsamples": 0}, {"seqlen": 0}, {"nsamples": 1.5}, {"seed": "x"}):
        with pytest.raises(UserError):
            calibration_samples("c4", tok, **{"nsamples": 1, "seqlen": 8, **kwargs})


def test_hub_source_offline_is_a_user_error(tok):
    with pytest.raises(UserError) as err:
        calibration_samples("hf:workbench-test/absent-dataset:train", tok, nsamples=1, seqlen=8)
    assert "HF_HUB_OFFLINE" in str(err.value)
    assert "file:PATH" in str(err.value)


def test_hub_spec_parsing():
    assert corpora.parse_hub_spec("allenai/c4:en:validation") == ("allenai/c4", "en", "validation", "text")
    assert corpora.parse_hub_spec("wikitext:train") == ("wikitext", None, "train", "text")
    assert corpora.parse_hub_spec("org/data:train[:500]:content") == ("org/data", None, "train[:500]", "content")
    assert corpora.parse_hub_spec("org/data::test:body") == ("org/data", None, "test", "body")
    assert corpora.parse_hub_spec("wikitext:wikitext-2-raw-v1:train:text") == ("wikitext", "wikitext-2-raw-v1", "train", "text")
    with pytest.raises(UserError):
        corpora.parse_hub_spec("justaname")


# ------------------------------------------------------- registry, descriptions


def test_describe_every_source():
    for source in ("c4", "wikitext2", "random", "file:data/notes.txt", "file:d.jsonl", "hf:allenai/c4:en:validation"):
        line = describe_source(source)
        assert line and "\n" not in line
    assert "validation" in describe_source("wikitext2")
    with pytest.raises(UserError):
        describe_source("nope")


def test_register_source_documents_and_tensors(tok, monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "_SOURCES", dict(sources._SOURCES))
    seen = {}

    def selfgen(arg, tokenizer, nsamples, seqlen, seed, model):
        seen.update(arg=arg, model=model, nsamples=nsamples, seqlen=seqlen, seed=seed)
        return [words_text(f"gen{arg}", 50)]

    register_source("selfgen", selfgen, description=lambda arg: f"text generated by the model ({arg or 'default'})")
    assert "selfgen[:ARG]" in source_names()
    sentinel = object()
    x = calibration_samples("selfgen:7", tok, nsamples=3, seqlen=16, seed=2, model=sentinel)
    assert x.shape == (3, 16)
    assert seen == {"arg": "7", "model": sentinel, "nsamples": 3, "seqlen": 16, "seed": 2}
    check_windows_of(x, [encode(tok, words_text("gen7", 50))])
    assert describe_source("selfgen:7") == "text generated by the model (7)"

    register_source("ones", lambda arg, t, n, s, seed, m: torch.ones(n, s, dtype=torch.int32), takes_arg=False)
    y = calibration_samples("ones", tok, nsamples=2, seqlen=5)
    assert y.dtype == torch.long and torch.equal(y, torch.ones(2, 5, dtype=torch.long))

    # Registered sources are not cached unless they ask for it.
    calibration_samples("selfgen", tok, nsamples=1, seqlen=8, cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_a_registered_source_is_valid_everywhere_it_is_asked(tok, monkeypatch, tmp_path):
    """One registry: a source added with register_source passes spec validation and describe_source, and the engine and
    the preview both build their windows from it."""
    from workbench.data.preview import preview_calibration
    from workbench.engine import Run
    from workbench.models import load_model
    from workbench.spec import spec_from_dict

    monkeypatch.setattr(sources, "_SOURCES", dict(sources._SOURCES))
    text = words_text("mine", 400)
    register_source("mine", lambda arg, t, n, s, seed, m: [text], description="my own text", takes_arg=False)
    data = {"model": {"name": "demo"}, "calibration": {"source": "mine", "nsamples": 2, "seqlen": 32, "summary": False},
            "steps": [{"type": "prune", "method": "wanda", "sparsity": 0.5}],
            "evaluate": {"perplexity": ["wikitext2"], "seqlen": 32, "limit": 1, "before": False}}
    spec = spec_from_dict(data)  # validation asks the registry
    assert describe_source("mine") == "my own text"
    run = Run(spec)
    summary = run.execute()
    expected = calibration_samples("mine", run.loaded.tokenizer, nsamples=2, seqlen=32)
    assert summary["calibration"]["source"] == "mine" and torch.equal(run.tokens, expected)
    check_windows_of(expected, [encode(run.loaded.tokenizer, text)])
    preview = preview_calibration(spec, lambda event: None, loaded=load_model("demo", dtype="float32"))
    assert preview["description"] == "my own text" and preview["windows"] == 2 and preview["documents"] == 1


def test_a_registered_text_source_seeds_selfgen_and_others_do_not(monkeypatch):
    """text=True puts a source among the text corpora, for validation (selfgen:CORPUS, calibration.selfgen.corpus),
    for text_documents and for selfgen's seed texts alike; a registered token source is refused by all three."""
    from workbench.data.sampling import text_documents
    from workbench.data.selfgen import seed_texts
    from workbench.spec import spec_from_dict

    monkeypatch.setattr(sources, "_SOURCES", dict(sources._SOURCES))
    paragraphs = [words_text(f"p{i}", 20) for i in range(3)]
    calls = []

    def notes(arg, tokenizer, nsamples, seqlen, seed, model):
        calls.append((tokenizer, model))
        return ["\n\n".join(paragraphs), "   "]

    register_source("notes", notes, description="my notes", takes_arg=False, text=True)
    register_source("ids", lambda arg, t, n, s, seed, m: torch.zeros(n, s, dtype=torch.long), takes_arg=False)
    assert "notes" in sources.text_source_names() and "ids" not in sources.text_source_names()

    spec = spec_from_dict({"calibration": {"source": "mix:selfgen:notes=0.5,c4=0.5", "selfgen": {"corpus": "notes"}}})
    assert spec.calibration.selfgen.corpus == "notes"
    assert text_documents("notes") == ["\n\n".join(paragraphs)]  # the blank document dropped
    assert seed_texts("notes") == paragraphs  # cut at blank lines
    assert calls and all(c == (None, None) for c in calls)  # a text corpus needs no tokenizer or model

    for data, message in (({"source": "selfgen:ids"}, "calibration.source: 'ids' is not a seed corpus for selfgen"),
                          ({"selfgen": {"corpus": "ids"}}, "calibration.selfgen.corpus: 'ids' is not a seed corpus for selfgen")):
        with pytest.raises(UserError) as err:
            spec_from_dict({"calibration": data})
        assert err.value.message == message
        assert "notes" in err.value.hint and "file:PATH" in err.value.hint and "ids" not in err.value.hint
    with pytest.raises(UserError, match="'ids' is not a text corpus") as err:
        text_documents("ids")
    assert "notes" in err.value.hint


def test_a_registered_source_checks_its_argument_wherever_it_is_named(monkeypatch):
    """A source's check runs at validation time, alone and inside a mixture; the engine is never reached with a bad argument."""
    from workbench.spec import spec_from_dict

    monkeypatch.setattr(sources, "_SOURCES", dict(sources._SOURCES))

    def check(arg: str, key: str) -> None:
        if not arg.isdigit():
            raise UserError(f"{key}: shard {arg!r} is not a shard number", "write shard:N with N a whole number")

    register_source("shard", lambda arg, t, n, s, seed, m: [words_text(arg, 100)], takes_arg=True, check=check)
    assert spec_from_dict({"calibration": {"source": "shard:3"}}).calibration.source == "shard:3"
    assert spec_from_dict({"calibration": {"source": "mix:shard:3=0.5,c4=0.5"}}).calibration.source.startswith("mix:")
    for source, key in (("shard:x", "calibration.source"), ("mix:c4=0.5,shard:x=0.5", "calibration.source (in the mixture)")):
        with pytest.raises(UserError) as err:
            spec_from_dict({"calibration": {"source": source}})
        assert err.value.message == f"{key}: shard 'x' is not a shard number"
    with pytest.raises(UserError, match="needs an argument"):
        spec_from_dict({"calibration": {"source": "shard"}})


def test_corrupt_parquet_is_a_user_error(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet" * 8)
    with pytest.raises(UserError, match="parquet"):
        corpora.file_documents(path)
