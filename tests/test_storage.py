"""Storage locations as users write them: object-store URIs with ?options, URIs that carry
credentials (refused before anything is printed or logged), scratch folders on a folder that
several hosts share, and data files that are empty."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ptv2 import storage
from tests.conftest import S3_BUCKET

BIN = Path(sys.executable).parent


def test_a_uri_with_options_keeps_them_at_the_end_and_jobs_land_under_its_prefix(s3):
    endpoint = os.environ["AWS_ENDPOINT_URL"].removeprefix("http://")
    root = f"s3://{S3_BUCKET}/teams/a/?endpoint_override={endpoint}&scheme=http"
    job = storage.join(root, "job-1")
    assert job == f"s3://{S3_BUCKET}/teams/a/job-1?endpoint_override={endpoint}&scheme=http"
    storage.write_bytes(storage.join(job, "checkpoints", "state.json"), b"{}")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=S3_BUCKET, Prefix="teams/")["Contents"]]
    keys = [k for k in keys if not k.endswith("/")]  # pyarrow marks folders with empty objects
    assert keys == ["teams/a/job-1/checkpoints/state.json"]
    assert storage.listdir(storage.join(job, "checkpoints")) == ["state.json"]
    # a data file given the same way is found, named and parsed by its own suffix
    s3.put_object(Bucket=S3_BUCKET, Key="teams/a/train.jsonl", Body=b'{"prompt": "p", "response": "r"}\n')
    from ptv2.data import read_table

    table = read_table(storage.join(root, "train.jsonl"))
    assert table.column_names == ["prompt", "response"] and len(table) == 1
    assert storage.basename(storage.join(root, "train.jsonl")) == "train.jsonl"


@pytest.mark.parametrize(
    "field,value",
    [
        ("storage", "s3://AKIAEXAMPLE:s3cr3t-value@bucket/jobs"),
        ("storage", "s3://bucket/jobs?access_key=AKIAEXAMPLE&secret_key=s3cr3t-value"),
        ("data.train_file", "s3://bucket/train.jsonl?secret_key=s3cr3t-value"),
        ("tracking.tracking_uri", "http://user:s3cr3t-value@mlflow.internal:5000"),
    ],
)
def test_credentials_in_a_uri_are_refused_without_being_shown(tmp_path, field, value):
    section, _, key = field.rpartition(".")
    spec = {
        "name": "x",
        "model": {"name_or_path": "org/model", "task": "causal-lm"},
        "data": {"train_file": "train.jsonl"},
    }
    (spec.setdefault(section, {}) if section else spec)[key] = value
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    proc = subprocess.run(
        [str(BIN / "ptv2"), "validate", str(tmp_path / "job.yaml")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert f"{field}: " in proc.stderr and "credentials" in proc.stderr
    assert "s3cr3t-value" not in proc.stderr + proc.stdout and len(proc.stderr.strip().splitlines()) == 1


def test_scratch_cleanup_removes_only_this_hosts_dead_processes_folders(tmp_path, monkeypatch):
    """PTV2_SCRATCH may be shared by hosts or containers whose pids mean nothing here: a folder of
    another owner stays, whatever its pid; one of this host's dead processes goes."""
    monkeypatch.setenv("PTV2_SCRATCH", str(tmp_path))
    owner = storage.process_owner()
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()  # a pid that no longer runs here
    mine = tmp_path / f"ptv2-{owner}-{dead.pid}-abc"
    other_host = tmp_path / f"ptv2-{'0' * 12}-{dead.pid}-abc"
    alive = tmp_path / f"ptv2-{owner}-{os.getpid()}-abc"
    for folder in (mine, other_host, alive):
        folder.mkdir()
    new = storage.scratch()
    assert not mine.exists() and other_host.exists() and alive.exists()
    assert new.parent == tmp_path and new.name.startswith(f"ptv2-{owner}-{os.getpid()}-")


def test_an_empty_or_blank_data_file_is_one_line_naming_it(tmp_path):
    from ptv2.data import DataError, read_table
    from ptv2.errors import first_line

    empty, blank = tmp_path / "empty.jsonl", tmp_path / "blank.jsonl"
    empty.write_text("")
    blank.write_text("\n\n")
    with pytest.raises(DataError, match=f"^{empty}: the file is empty$"):
        read_table(empty)
    with pytest.raises(DataError) as e:
        read_table(blank)
    assert str(e.value).startswith(f"{blank}: ") and "\n" not in str(e.value)
    assert first_line(IndexError()) == "IndexError" and first_line(ValueError("\n\n  two\nthree")) == "two"
