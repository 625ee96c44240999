"""`ptv2 eval`: a saved prompt's task metrics on a labelled data file, recorded in MLflow as an
evaluation of that prompt: a run nested under the run that trained it (the UI lists it there),
tagged with the prompt and registered version it scored, the data file as its dataset input.
It runs here, or on a Ray cluster as a job (`JobsClient.submit_eval`) for large files or a GPU.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from launcher import prompts
from ptv2 import tracking
from ptv2.tracking import ModelVersion, Tracker

COLUMNS = ("text", "text_pair", "label", "tokens", "tags", "prompt", "response")
RESULT = "PTV2-EVALUATION "  # the line a cluster job prints its result on


@dataclass
class Evaluation:
    run_id: str  # the evaluation's MLflow run
    metrics: dict[str, float]
    examples: int
    source_run: str | None  # the run that trained the prompt, when known
    columns: dict[str, str] = field(default_factory=dict)


def parse_columns(pairs: list[str]) -> dict[str, str]:
    """`--column text=sentence` pairs as data settings (`text_column: sentence`)."""
    out = {}
    for pair in pairs:
        name, sep, column = pair.partition("=")
        if not sep or name not in COLUMNS or not column:
            raise ValueError(f"--column {pair!r}: give NAME=COLUMN, NAME one of {', '.join(COLUMNS)}")
        out[f"{name}_column"] = column
    return out


def _prompt(tracker: Tracker, source: str, tmp: Path) -> tuple[Path, str | None, ModelVersion | None]:
    """(local folder, training run, registered version) of a prompt folder, run id, runs:/ or models:/ URI."""
    if Path(source).is_dir():
        return Path(source), None, None
    run_id, path, version = prompts.resolve(tracker.uri, source)
    prompts.fetch(tracker.uri, f"runs:/{run_id}/{path}", tmp / "prompt")
    model = None
    if version is not None:
        name = source.removeprefix("models:/").split("/")[0].split("@")[0]
        model = ModelVersion(name, version, run_id, path)
    return tmp / "prompt", run_id, model


def _trained_columns(tracker: Tracker, run_id: str, tmp: Path) -> dict[str, str]:
    """The column settings of the spec the run trained with (what its data files looked like)."""
    try:
        spec = yaml.safe_load(tracker.download_artifact(run_id, "spec.yaml", tmp / "spec").read_text())
    except Exception:  # a run without the artifact (MLflow's errors), unreadable YAML: data's defaults
        return {}
    data = spec.get("data") if isinstance(spec, dict) else None
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if k.endswith("_column") and isinstance(v, str)}


def evaluate_prompt(
    source: str,
    data: str,
    tracking_uri: str | None = None,
    columns: dict[str, str] | None = None,
    fmt: str = "auto",
    batch_size: int = 16,
    model_path: str | None = None,
    experiment: str | None = None,
) -> Evaluation:
    """Score the prompt `source` on `data` (a path or storage URI) and record the evaluation.
    Columns default to those the training spec named (for a run or registered source), else
    data's defaults; `model_path` replaces the base model path of the manifest."""
    # torch and transformers, only when a prompt is scored: the command line imports this module
    import torch
    from transformers import AutoTokenizer

    from ptv2.artifact import load_prompt, read_manifest, sha256_file
    from ptv2.data import local_file, read_table
    from ptv2.infer import score
    from ptv2.model import load_base_model

    tracker = Tracker(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="ptv2-eval-") as tmp:
        folder, run_id, model = _prompt(tracker, source, Path(tmp))
        used = {**(_trained_columns(tracker, run_id, Path(tmp)) if run_id else {}), **(columns or {})}
        manifest = read_manifest(folder)
        base_path = model_path or manifest["base_model"]["name_or_path"]
        base, _ = load_base_model(base_path, manifest["task"], manifest.get("labels"))
        prompted = load_prompt(folder, base)
        if torch.cuda.is_available():  # a cluster job given a GPU
            prompted.to("cuda")
        metrics, n = score(prompted, AutoTokenizer.from_pretrained(base_path), data, used, fmt, batch_size)
    exp = experiment or (tracker.experiment_name(tracker.run(run_id).experiment_id) if run_id else "ptv2-eval")
    params = {"prompt": source, "data": data, "examples": n, "base_model": base_path, **used}
    eval_run = tracker.record_evaluation(exp, f"eval {Path(data.split('?')[0]).name}", params, metrics, run_id, model)
    frame = read_table(data, fmt).to_pandas()
    tracker.log_dataset(eval_run, frame, data, "evaluation", sha256_file(local_file(data)))
    return Evaluation(eval_run, metrics, n, run_id, used)


def tracking_reachable_from_cluster(uri: str) -> str | None:
    """Why a cluster job could not record into `uri` (None: it can)."""
    if not tracking.Tracker(uri).is_server:
        return (
            f"the tracking URI {uri} is this machine's own store, which a cluster job cannot write to: "
            "give --tracking-uri http://... (an MLflow server the cluster reaches)"
        )
    return None
