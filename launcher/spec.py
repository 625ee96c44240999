"""The YAML job spec: typed, strict, checked against the files and the model it names.

A spec is the training job's sections (`ptv2.settings.TrainJob`: model, prompt, data, train,
deepspeed) plus `name`, `storage`, `resources` and `tracking`. Unknown keys are errors; every
error names the field path and the bad value, in one line. Relative paths resolve against the
spec's folder on the submitting side. YAML is read with `yaml.safe_load`: tags that would build
Python objects are refused, and model code runs only with `model.trust_remote_code: true`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ptv2 import dsconfig, storage, tracking
from ptv2.settings import TrainJob


class SpecError(ValueError):
    """A spec that cannot run; the message is one line naming the file and the field."""


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workers: int = Field(2, ge=1, le=4096, description="Ray Train workers (DeepSpeed ranks)")
    cpus_per_worker: float = Field(1, gt=0, le=512)
    gpus_per_worker: float = Field(0, ge=0, le=16, description="0: CPU workers over gloo; 1: one GPU each (NCCL)")

    @field_validator("gpus_per_worker")
    @classmethod
    def _whole_gpus(cls, v: float) -> float:
        # Ray would pack two 0.5-GPU workers onto one device, and NCCL refuses (or deadlocks on)
        # two ranks sharing a GPU: each DeepSpeed rank needs a GPU of its own.
        if v != int(v):
            raise ValueError(
                f"gpus_per_worker must be 0 (CPU workers) or a whole number of GPUs, not {v}: "
                "a fraction puts several NCCL ranks on one GPU"
            )
        return v


class Tracking(BaseModel):
    model_config = ConfigDict(extra="forbid")

    experiment: str = Field("ptv2", min_length=1, max_length=200)
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default: the embedded local store")
    register_as: str | None = Field(None, min_length=1, max_length=200, description="registry name for the prompt")

    @field_validator("tracking_uri")
    @classmethod
    def _scheme(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^(sqlite:///|file:|https?://|databricks)", v):
            raise ValueError(f"tracking_uri {v!r} must start with sqlite:///, file:, http:// or https://")
        return v


class JobSpec(TrainJob):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="job name: letters, digits, . _ -")
    storage: str | None = Field(
        None,
        description="where jobs keep what outlives them (checkpoints, prompts), one folder per job id: a path "
        "every node sees (shared filesystem) or an object-store URI such as s3://bucket/ptv2 (endpoint and "
        "credentials from the AWS variables). Default for `ptv2 run`: $PTV2_HOME/runs",
    )
    resources: Resources = Field(default_factory=Resources)
    tracking: Tracking = Field(default_factory=Tracking)

    def job_storage(self, job_id: str) -> str:
        return storage.join(self.storage or str(tracking.home() / "runs"), job_id)

    def train_job(self, job_id: str) -> TrainJob:
        data = self.model_dump(include=set(TrainJob.model_fields))
        data["storage"] = self.job_storage(job_id)
        return TrainJob.model_validate(data)


def _loc(err: dict) -> str:
    return ".".join(str(p) for p in err["loc"]) or "(top level)"


def _one_line(path: Path, e: ValidationError) -> str:
    errs = e.errors()
    first = errs[0]
    value = first.get("input")
    shown = (
        "" if isinstance(value, dict) or first["type"] == "missing" else f" (got {json.dumps(value, default=str)[:80]})"
    )
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key (typo?)"
    more = f" [+{len(errs) - 1} more]" if len(errs) > 1 else ""
    return f"{path}: {_loc(first)}: {msg}{shown}{more}"


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise SpecError(f"{path}: no such spec file")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        raw = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as e:
        mark = f"line {e.problem_mark.line + 1}: " if e.problem_mark else ""
        tag = str(e.problem).removeprefix("could not determine a constructor for the tag ").strip("'")
        raise SpecError(f"{path}: {mark}YAML tag {tag!r} is not allowed (specs never execute code)") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise SpecError(f"{path}: {where}invalid YAML: {getattr(e, 'problem', e)}") from e
    if raw is None:
        raise SpecError(f"{path}: the spec is empty")
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: the spec must be a mapping of sections, not a {type(raw).__name__}")
    return raw


def _model_config(spec: JobSpec, model_on_cluster: bool = False) -> dict | None:
    folder = Path(spec.model.name_or_path)
    cfg = folder / "config.json"
    if model_on_cluster and not folder.exists():
        return None  # a path on the cluster's shared storage: the job checks it where it runs
    if folder.is_dir():
        if not cfg.is_file():
            raise SpecError(f"model.name_or_path: {folder} has no config.json (not a transformers model folder)")
        try:
            return json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise SpecError(f"model.name_or_path: {cfg} is not valid JSON: {e}") from e
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec.model.name_or_path) or folder.is_absolute():
        raise SpecError(f"model.name_or_path: {folder} does not exist")
    return None  # a hub id ("org/name"): checked when it loads


def check_model(spec: JobSpec, model_on_cluster: bool = False) -> None:
    """Check the model folder (config, remote code, supported architecture, positions). With
    `model_on_cluster`, a folder that does not exist here is left for the cluster to check."""
    raw = _model_config(spec, model_on_cluster)
    if raw is None:
        return
    if raw.get("auto_map") and not spec.model.trust_remote_code:
        raise SpecError(
            f"model.trust_remote_code: {spec.model.name_or_path} ships its own Python code (auto_map); "
            "set trust_remote_code: true only if you trust it"
        )
    from transformers import AutoConfig

    from ptv2.prefix import Geometry

    try:
        geometry = Geometry.of(
            AutoConfig.from_pretrained(spec.model.name_or_path, trust_remote_code=spec.model.trust_remote_code)
        )
    except ValueError as e:
        raise SpecError(f"model.name_or_path: {e}") from e
    need = spec.prompt.length + spec.data.max_length
    if geometry.max_positions is not None and need > geometry.max_positions:
        raise SpecError(
            f"prompt.length: {spec.prompt.length} prompt positions + data.max_length {spec.data.max_length} = {need} "
            f"exceed the {geometry.max_positions} positions {geometry.model_type} allows"
        )


def _column_values(path: str, fmt: str, column: str) -> list:
    from ptv2.data import DataError, read_table

    try:
        table = read_table(path, fmt)
    except DataError as e:
        raise SpecError(f"data: {e}") from e
    if column not in table.column_names:
        raise SpecError(f"data: {path}: missing column {column!r} (found: {', '.join(table.column_names)})")
    return table[column]


def check_data(spec: JobSpec) -> None:
    d = spec.data
    for field in ("train_file", "validation_file", "test_file"):
        value = getattr(d, field)
        try:
            if value is not None and not storage.is_file(value):
                raise SpecError(f"data.{field}: {value} does not exist")
        except storage.StorageError as e:
            raise SpecError(f"data.{field}: {e}") from e
    if spec.model.task == "causal-lm":
        return
    known = set(spec.model.labels or [])
    column = d.label_column if spec.model.task == "seq-cls" else d.tags_column
    for value in filter(None, (d.train_file, d.validation_file, d.test_file)):
        seen = _column_values(value, d.format, column)
        found = (
            {str(v) for v in seen if v is not None}
            if spec.model.task == "seq-cls"
            else {str(t) for row in seen if row for t in row}
        )
        unknown = sorted(found - known)
        if unknown:
            raise SpecError(
                f"model.labels: {value} uses label(s) {', '.join(unknown[:5])} not in model.labels {sorted(known)}"
            )


def load_spec(path: str | Path, check_files: bool = True, model_on_cluster: bool = False) -> JobSpec:
    """Parse, validate and resolve a spec; raises SpecError with a one-line message.

    `model_on_cluster` (for `ptv2 submit`): an absolute `model.name_or_path` that does not exist
    on this machine is accepted, since it names the cluster's storage and the job checks it
    there; a relative path or a hub id is checked as usual, and so is the data."""
    path = Path(path)
    raw = read_yaml(path)
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(_one_line(path, e)) from e
    # only a path written absolute can name the cluster's storage (a relative one resolves here)
    on_cluster = model_on_cluster and spec.model.name_or_path.startswith("/")
    spec = spec.resolve_paths(path.resolve().parent)
    if spec.storage is not None:
        spec = spec.model_copy(update={"storage": storage.normalize(spec.storage)})
    try:
        dsconfig.validate(spec, spec.resources.workers)
    except dsconfig.DeepSpeedConfigError as e:
        raise SpecError(f"{path}: {e}") from e
    if check_files:
        try:
            check_model(spec, on_cluster)
            check_data(spec)
        except SpecError as e:
            raise SpecError(f"{path}: {e}") from e
    return spec


def json_schema() -> dict:
    return JobSpec.model_json_schema()
