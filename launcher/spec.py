"""The YAML job spec: typed, strict, checked against the files and the model it names.

A spec is the training job's sections (`ptv2.settings.TrainJob`: model, prompt, data, train,
deepspeed) plus `name`, `storage`, `resources` and `tracking`. Unknown keys are errors; every
error names the field path and the bad value, in one line. Relative paths resolve against the
spec's folder on the submitting side. YAML is read with `yaml.safe_load`: tags that would build
Python objects are refused, and model code runs only with `model.trust_remote_code: true`.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
import time
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ptv2 import dsconfig, storage, tracking
from ptv2.settings import TrainJob


class SpecError(ValueError):
    """A spec that cannot run; the message is one line naming the file and the field."""


# A job (or sweep) id names its storage folder, its MLflow run and its Ray job, and is written
# into shell commands and MLflow filters: one pattern for all, no quote, slash or leading dot.
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id) or ".." in job_id:
        raise SpecError(
            f"job id {job_id!r} is not valid: 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return job_id


def new_job_id(name: str) -> str:
    return check_job_id(f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}")


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
        if v is not None and "@" in urlsplit(v).netloc:
            raise ValueError(
                "the tracking URI carries credentials, which would be printed and logged with the job: "
                "give them as MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
            )
        return v


class Distribution(BaseModel):
    """Where a swept field's values come from: exactly one of these."""

    model_config = ConfigDict(extra="forbid")

    grid: list | None = Field(None, min_length=1, description="every value, each in its own trial(s)")
    choice: list | None = Field(None, min_length=1, description="one value drawn per trial")
    uniform: tuple[float, float] | None = Field(None, description="[low, high], drawn uniformly")
    loguniform: tuple[float, float] | None = Field(None, description="[low, high], drawn uniformly in log space")
    integer: tuple[int, int] | None = Field(None, description="[low, high], an integer drawn uniformly, both included")

    @model_validator(mode="after")
    def _one_kind(self) -> Distribution:
        kinds = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform, integer (got {kinds or 'none'})")
        bounds = self.uniform or self.loguniform or self.integer
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"[low, high] needs low < high, got {list(bounds)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.loguniform[0]}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in type(self).model_fields if getattr(self, k) is not None)

    def values_to_check(self) -> list:
        """Every value a trial can get (lists), or the bounds (ranges)."""
        return list(getattr(self, self.kind))

    def describe(self) -> str:
        return f"{self.kind} {list(getattr(self, self.kind))}"


class EarlyStopping(BaseModel):
    """ASHA: at each rung (grace_period, then × reduction_factor evaluations) a trial goes on only
    if its metric is in the best 1/reduction_factor of the trials that reached that rung."""

    model_config = ConfigDict(extra="forbid")

    grace_period: int = Field(1, ge=1, le=100000, description="evaluations every trial gets before it can be stopped")
    reduction_factor: float = Field(2, gt=1, le=100)


class Sweep(BaseModel):
    """A hyperparameter search over the spec's own fields, run by Ray Tune: one trial = one job."""

    model_config = ConfigDict(extra="forbid")

    parameters: dict[str, Distribution] = Field(
        min_length=1, description="spec fields by dotted path (e.g. train.lr, prompt.length) -> their values"
    )
    samples: int = Field(1, ge=1, le=10000, description="trials drawn (each grid point runs this many times)")
    metric: str | None = Field(None, description="eval metric to optimise (default: the task's primary metric)")
    mode: Literal["min", "max"] | None = Field(None, description="default: the metric's own direction")
    max_concurrent: int = Field(0, ge=0, le=10000, description="trials at once; 0: as many as the cluster fits")
    early_stopping: EarlyStopping | None = Field(
        default_factory=EarlyStopping, description="ASHA on the metric (null: every trial runs to its end)"
    )
    seed: int = Field(0, ge=0, description="seed of the random draws")


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
    sweep: Sweep | None = Field(None, description="a hyperparameter search over this spec (`ptv2 sweep`)")

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
        ""
        if isinstance(value, dict) or first["type"] == "missing"
        else f" (got {storage.redact(json.dumps(value, default=str))[:80]})"
    )
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key (typo?)"
    more = f" [+{len(errs) - 1} more]" if len(errs) > 1 else ""
    where = f"{_loc(first)}: " if first["loc"] else ""  # a whole-spec check names its fields itself
    return f"{path}: {where}{msg}{shown}{more}"


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

    from ptv2.geometry import Geometry  # beside transformers, which only a model check needs

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
    from ptv2.data import DataError, read_table  # datasets, torch: only when files are checked

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
    from ptv2.tasks import task_of  # torch, transformers: only when the files are checked

    task = task_of(spec.model.task)
    if not task.labelled:
        return
    known = set(spec.model.labels or [])
    for value in filter(None, (d.train_file, d.validation_file, d.test_file)):
        unknown = sorted(task.label_names(_column_values(value, d.format, task.target_column(d))) - known)
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
    if spec.sweep is not None:
        check_sweep(path, raw, spec)
    if spec.data.packing:
        from ptv2.tasks import task_of  # torch, transformers: only for a spec that packs

        if not task_of(spec.model.task).packs:
            raise SpecError(f"{path}: data.packing: only causal-lm examples are packed, not {spec.model.task}")
    if check_files:
        try:
            check_model(spec, on_cluster)
            check_data(spec)
        except SpecError as e:
            raise SpecError(f"{path}: {e}") from e
    return spec


# Sweeping these would change what the sweep is, where it lives, or what it is called.
NOT_SWEPT = ("name", "sweep", "storage", "tracking")


def field_at(path: str) -> None:
    """Check that a dotted path names a field of the spec; ValueError saying what exists if not."""
    model: type[BaseModel] = JobSpec
    parts = path.split(".")
    if parts[0] in NOT_SWEPT:
        raise ValueError(f"{parts[0]} cannot be swept")
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:i]) or "the spec"
            raise ValueError(f"no such field ({where} has: {', '.join(fields)})")
        annotation = fields[part].annotation
        inner = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        nested = next((a for a in inner if issubclass(a, BaseModel)), None)
        if i < len(parts) - 1:
            if nested is None:
                raise ValueError(f"{'.'.join(parts[: i + 1])} has no fields")
            model = nested
        elif nested is not None:
            raise ValueError(f"{path} is a whole section: sweep one of its fields")


def with_values(raw: dict, values: dict) -> dict:
    """A copy of the raw spec with each dotted path set to its value (and no sweep section)."""
    out = copy.deepcopy(raw)
    out.pop("sweep", None)
    for path, value in values.items():
        node = out
        *parents, leaf = path.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return out


def check_sweep(path: Path, raw: dict, spec: JobSpec) -> None:
    """Every swept path names a field, every value a trial can get is valid there, the metric is
    one the task's evaluation gives, and there is something to evaluate on."""
    from ptv2.tasks import task_of  # torch, transformers: only for a spec with a sweep

    sweep = spec.sweep
    for name, dist in sweep.parameters.items():
        try:
            field_at(name)
        except ValueError as e:
            raise SpecError(f"{path}: sweep.parameters.{name}: {e}") from e
        for value in dist.values_to_check():
            try:
                JobSpec.model_validate(with_values(raw, {name: value}))
            except ValidationError as e:
                err = e.errors()[0]
                raise SpecError(
                    f"{path}: sweep.parameters.{name}: value {value!r} is not valid there: "
                    f"{_loc(err)}: {err['msg'].removeprefix('Value error, ')}"
                ) from e
    known = task_of(spec.model.task).metrics
    if sweep.metric is not None and sweep.metric not in known:
        raise SpecError(
            f"{path}: sweep.metric: {sweep.metric!r} is not an eval metric of {spec.model.task} "
            f"(one of: {', '.join(known)})"
        )
    if spec.data.validation_file is None:
        raise SpecError(f"{path}: data.validation_file: a sweep compares trials on validation data: set one")
    if sweep.early_stopping is not None and not spec.train.eval_every:
        raise SpecError(
            f"{path}: train.eval_every: early stopping compares trials at evaluations: set eval_every "
            "(or sweep.early_stopping: null)"
        )


def json_schema() -> dict:
    return JobSpec.model_json_schema()
