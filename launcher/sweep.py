"""Hyperparameter sweeps: a spec's `sweep:` section run by Ray Tune, compared in MLflow.

Each trial is a normal ptv2 job (a Ray Train worker group with DeepSpeed, its checkpoints in its
own storage folder) started by a Tune function, with the trial's values set at their dotted
paths. Workers report every evaluation to Ray; ASHA stops the trials that fall behind at its
rungs. MLflow gets one parent run for the sweep (the search space, the best result, a table and
a plot of the metric against each parameter) and one nested child run per trial (stopped
trials marked so); the best trial's run is tagged and its best prompt registered when the spec
says `register_as`. A sweep whose driver died resumes with `--resume SWEEP_ID`: finished trials
stay done, unfinished ones resume from their checkpoints in their own runs; a failing trial
fails alone.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field

from launcher.runner import (
    JobFailed,
    ensure_ray,
    fit_job,
    job_tags,
    make_trainer,
    new_job_id,
    reopen_run,
)
from launcher.spec import JobSpec, Sweep, with_values
from ptv2 import storage, tracking
from ptv2.evaluate import METRICS, PRIMARY_METRIC


@dataclass
class SweepSummary:
    sweep_id: str
    run_id: str  # the parent MLflow run
    tracking_uri: str
    metric: str
    mode: str
    best_run_id: str | None = None
    best_value: float | None = None
    best_params: dict = field(default_factory=dict)
    trials: list[dict] = field(default_factory=list)


def objective(spec: JobSpec) -> tuple[str, str]:
    """(metric, mode): the sweep's, or the task's primary eval metric and its direction."""
    metric = spec.sweep.metric or PRIMARY_METRIC[spec.model.task][0]
    return metric, spec.sweep.mode or METRICS[spec.model.task][metric]


def search_space(sweep: Sweep) -> dict:
    from ray import tune

    make = {
        "grid": tune.grid_search,
        "choice": tune.choice,
        "uniform": lambda b: tune.uniform(*b),
        "loguniform": lambda b: tune.loguniform(*b),
        "integer": lambda b: tune.randint(b[0], b[1] + 1),  # Tune's upper bound is exclusive
    }
    return {"params": {path: make[d.kind](getattr(d, d.kind)) for path, d in sweep.parameters.items()}}


def concurrency(spec: JobSpec) -> int:
    """Trials at once: the spec's bound, else as many worker groups as the cluster holds."""
    import ray

    if spec.sweep.max_concurrent:
        return spec.sweep.max_concurrent
    res, have = spec.resources, ray.cluster_resources()
    fits = [have.get("CPU", 0) // (res.workers * res.cpus_per_worker)]
    if res.gpus_per_worker:
        fits.append(have.get("GPU", 0) // (res.workers * res.gpus_per_worker))
    return max(1, int(min(fits)))


def trial_job_id(sweep_id: str, trial_id: str) -> str:
    return f"{sweep_id}-{trial_id}"


def trial_name(params: dict) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def run_trial(config: dict, base: dict, sweep_id: str, parent_run_id: str, uri: str) -> None:
    """One trial, in its own Tune actor: its spec, its nested MLflow run (reopened when the sweep
    resumes), its Ray Train worker group reporting each evaluation to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    params = config["params"]
    spec = JobSpec.model_validate(with_values(base, params))
    job_id = trial_job_id(sweep_id, tune.get_context().get_trial_id())
    run_id = tracking.find_job_run(uri, spec.tracking.experiment, job_id)
    if run_id is None:
        tags = {
            **job_tags(job_id, spec.job_storage(job_id), None),
            "mlflow.parentRunId": parent_run_id,
            "ptv2.sweep_id": sweep_id,
            "ptv2.trial": tune.get_context().get_trial_id(),
            **{f"sweep.{k}": json.dumps(v) for k, v in params.items()},
        }
        run_id = tracking.start_run(uri, spec.tracking.experiment, job_id, spec.model_dump(mode="json"), tags)
        tracking.client(uri).set_tag(run_id, "mlflow.runName", f"{job_id} {trial_name(params)}"[:250])
    elif tracking.client(uri).get_run(run_id).info.status == "FINISHED":
        # done before the sweep's driver died: tell Tune its result instead of training again
        history = {k: tracking.client(uri).get_metric_history(run_id, f"eval/{k}") for k in METRICS[spec.model.task]}
        last = {k: sorted(v, key=lambda m: m.step)[-1] for k, v in history.items() if v}
        step = max(m.step for m in last.values())
        every = spec.train.eval_every
        tune.report(
            {"step": step, "eval_index": -(-step // every) if every else 1, **{k: m.value for k, m in last.items()}}
        )
        return
    else:
        tracking.reopen_run(uri, run_id)
    trainer = make_trainer(spec, job_id, run_id, uri, report_eval=True, ray_callbacks=[TuneReportCallback()])
    fit_job(trainer, spec, job_id, run_id, uri)


def _trial_run(uri: str, experiment: str, sweep_id: str, trial_id: str):
    run_id = tracking.find_job_run(uri, experiment, trial_job_id(sweep_id, trial_id))
    return None if run_id is None else tracking.client(uri).get_run(run_id)


def make_callback(uri: str, experiment: str, sweep_id: str, metric: str):
    """A Tune callback in the sweep's driver: prints each trial's end and closes the MLflow run
    of a trial that ASHA stopped (its workers were stopped with it) as KILLED, tagged so."""
    from ray import tune

    class TrialRuns(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            run = _trial_run(uri, experiment, sweep_id, trial.trial_id)
            value = (trial.last_result or {}).get(metric)
            stopped = run is not None and run.info.status == "RUNNING"
            if stopped:
                tracking.client(uri).set_tag(run.info.run_id, "ptv2.early_stopped", "true")
                tracking.end_run(uri, run.info.run_id, "KILLED")
            what = "stopped early" if stopped else "finished"
            shown = f"{metric} {value:.4f}" if isinstance(value, float) else "no evaluation"
            print(f"[ptv2] trial {trial.trial_id} {what}: {shown} ({trial_name(trial.config['params'])})", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            run = _trial_run(uri, experiment, sweep_id, trial.trial_id)
            if run is not None and run.info.status == "RUNNING":
                tracking.end_run(uri, run.info.run_id, "FAILED", error=str(trial.error_file or "trial failed"))
            print(f"[ptv2] trial {trial.trial_id} failed ({trial_name(trial.config['params'])})", flush=True)

    return TrialRuns()


def open_parent(spec: JobSpec, spec_text: str, sweep_id: str, uri: str, resume: bool, address: str | None) -> str:
    if resume:
        return reopen_run(uri, spec.tracking.experiment, sweep_id, "sweep")
    metric, mode = objective(spec)
    params = {
        **{f"sweep.parameters.{k}": d.describe() for k, d in spec.sweep.parameters.items()},
        "sweep.samples": spec.sweep.samples,
        "sweep.metric": metric,
        "sweep.mode": mode,
        "sweep.early_stopping": spec.sweep.early_stopping.model_dump() if spec.sweep.early_stopping else None,
    }
    tags = {
        **job_tags(sweep_id, spec.job_storage(sweep_id), address),
        "ptv2.sweep_id": sweep_id,
        "ptv2.kind": "sweep",
        "ptv2.sweep_metric": metric,
        "ptv2.sweep_mode": mode,
    }
    return tracking.start_run(uri, spec.tracking.experiment, sweep_id, params, tags, spec_text)


def run_sweep(
    spec: JobSpec, spec_text: str, address: str | None = None, sweep_id: str | None = None, resume: bool = False
) -> SweepSummary:
    """Run (or resume) the sweep of `spec` on Ray Tune; the parent MLflow run ends FINISHED with
    the best trial, FAILED when no trial succeeded, KILLED when stopped."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if resume and sweep_id is None:
        raise JobFailed("resume needs the id of the sweep to resume")
    sweep_id = sweep_id or new_job_id(f"{spec.name}-sweep")
    location = spec.job_storage(sweep_id)
    fs, path = storage.resolve(location)
    if resume and not storage.exists(storage.join(location, "tune")):
        raise JobFailed(f"--resume {sweep_id}: nothing of that sweep in storage at {location}")
    uri = tracking.resolve_uri(spec.tracking.tracking_uri)
    metric, mode = objective(spec)
    parent = open_parent(spec, spec_text, sweep_id, uri, resume, address)
    print(f"[ptv2] sweep {sweep_id}: MLflow run {parent} at {uri}; storage {location}", flush=True)
    started_here = False
    try:
        started_here = ensure_ray(spec, address)
        trainable = tune.with_parameters(
            run_trial,
            base=spec.model_dump(mode="json", exclude={"sweep"}),
            sweep_id=sweep_id,
            parent_run_id=parent,
            uri=uri,
        )
        trainable = tune.with_resources(trainable, {"memory": 1})  # no CPU: the worker group claims the trial's
        es = spec.sweep.early_stopping
        scheduler = (
            ASHAScheduler(
                time_attr="eval_index",
                grace_period=es.grace_period,
                reduction_factor=es.reduction_factor,
                max_t=10**6,  # rungs at grace·rf^k evaluations, whatever a trial's length
                stop_last_trials=False,
            )
            if es is not None
            else FIFOScheduler()
        )
        run_config = tune.RunConfig(
            name="tune",
            storage_path=path,
            storage_filesystem=fs,
            callbacks=[make_callback(uri, spec.tracking.experiment, sweep_id, metric)],
            failure_config=tune.FailureConfig(fail_fast=False),
            verbose=0,
        )
        if resume:
            tuner = tune.Tuner.restore(
                storage.join(location, "tune") if storage.is_uri(location) else f"{path}/tune",
                trainable=trainable,
                resume_errored=True,
                storage_filesystem=fs,
            )
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=search_space(spec.sweep),
                tune_config=tune.TuneConfig(
                    metric=metric,
                    mode=mode,
                    num_samples=spec.sweep.samples,
                    scheduler=scheduler,
                    # grids in order, draws seeded; at most as many trials as the cluster fits
                    search_alg=tune.search.BasicVariantGenerator(
                        random_state=spec.sweep.seed, max_concurrent=concurrency(spec)
                    ),
                ),
                run_config=run_config,
            )
        tuner.fit()
        summary = summarize(spec, sweep_id, parent, uri, metric, mode)
        record(summary, spec, uri)
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        close_open_trials(uri, spec.tracking.experiment, sweep_id, status)
        tracking.end_run(uri, parent, status, error=str(e))
        raise
    finally:
        if started_here:
            ray.shutdown()
    return summary


def trials(uri: str, experiment: str, sweep_id: str, metric: str, mode: str, names: list[str]) -> list[dict]:
    """The sweep's trials as MLflow recorded them, best first: run, status (early stops marked),
    evaluations, the best value of `metric` over its evaluations, the swept values."""
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`ptv2.sweep_id` = '{sweep_id}'") if exp else []
    sign = 1 if mode == "max" else -1
    rows = []
    for run in runs:
        tags = run.data.tags
        if tags.get("ptv2.kind") == "sweep":
            continue
        values = [m.value for m in c.get_metric_history(run.info.run_id, f"eval/{metric}")]
        status = "STOPPED EARLY" if tags.get("ptv2.early_stopped") == "true" else run.info.status
        rows.append(
            {
                "run_id": run.info.run_id,
                "trial": tags.get("ptv2.trial", ""),
                "status": status,
                "evaluations": len(values),
                metric: max(values, key=lambda v: sign * v) if values else math.nan,
                **{k: _value(tags.get(f"sweep.{k}")) for k in names},
            }
        )
    return sorted(rows, key=lambda t: (t[metric] != t[metric], -sign * t[metric] if t[metric] == t[metric] else 0))


def _value(text: str | None):
    """A swept value back from its tag (JSON)."""
    return None if text is None else json.loads(text)


def summarize(spec: JobSpec, sweep_id: str, parent: str, uri: str, metric: str, mode: str) -> SweepSummary:
    summary = SweepSummary(sweep_id, parent, uri, metric, mode)
    summary.trials = trials(uri, spec.tracking.experiment, sweep_id, metric, mode, list(spec.sweep.parameters))
    done = [t for t in summary.trials if t[metric] == t[metric]]
    if not done:
        raise JobFailed(f"no trial of sweep {sweep_id} produced {metric}: see the trial runs for why")
    best = done[0]
    summary.best_run_id, summary.best_value = best["run_id"], best[metric]
    summary.best_params = {k: best[k] for k in spec.sweep.parameters}
    tracking.client(uri).set_tag(best["run_id"], "ptv2.sweep_best", "true")
    return summary


def record(summary: SweepSummary, spec: JobSpec, uri: str) -> None:
    """The parent run: best value and parameters, the trials' table and plot; the best prompt
    registered when the spec says so; then FINISHED."""
    c = tracking.client(uri)
    metric = summary.metric
    c.log_metric(summary.run_id, f"best/{metric}", summary.best_value)
    c.set_tag(summary.run_id, "ptv2.best_run_id", summary.best_run_id)
    for k, v in summary.best_params.items():
        c.set_tag(summary.run_id, f"best.{k}", str(v))
    c.log_text(summary.run_id, trials_csv(summary), "sweep/trials.csv")
    c.log_text(summary.run_id, trials_markdown(summary), "sweep/trials.md")
    c.log_figure(summary.run_id, plot(summary, spec), "sweep/metric_by_parameter.png")
    if spec.tracking.register_as:
        from launcher.prompts import register

        version = register(uri, summary.best_run_id, spec.tracking.register_as, path="best")
        print(f"[ptv2] registered models:/{spec.tracking.register_as}/{version} (best trial)", flush=True)
    tracking.end_run(uri, summary.run_id, "FINISHED", {metric: summary.best_value})


def columns(summary: SweepSummary) -> list[str]:
    params = [k for k in summary.trials[0] if k not in ("run_id", "trial", "status", "evaluations", summary.metric)]
    return ["run_id", "trial", "status", "evaluations", summary.metric, *params]


def trials_csv(summary: SweepSummary) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns(summary))
    writer.writeheader()
    writer.writerows(summary.trials)
    return buf.getvalue()


def trials_markdown(summary: SweepSummary) -> str:
    cols = columns(summary)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for t in summary.trials:
        lines.append("| " + " | ".join(f"{t[c]:.4g}" if isinstance(t[c], float) else str(t[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: SweepSummary, spec: JobSpec):
    """The metric (best evaluation of each trial) against each swept parameter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(spec.sweep.parameters)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for status, marker in (("FINISHED", "o"), ("STOPPED EARLY", "x"), ("FAILED", "s")):
            rows = [t for t in summary.trials if t["status"] == status and t[summary.metric] == t[summary.metric]]
            numeric = all(isinstance(t[name], int | float) for t in summary.trials)
            xs = [t[name] if numeric else str(t[name]) for t in rows]
            ax.scatter(xs, [t[summary.metric] for t in rows], marker=marker, label=status.lower())
        if spec.sweep.parameters[name].kind == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel(summary.metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"sweep {summary.sweep_id}: {summary.metric} ({summary.mode}) by parameter")
    fig.tight_layout()
    return fig


def close_open_trials(uri: str, experiment: str, sweep_id: str, status: str) -> None:
    """A stopped or failed sweep leaves no trial run marked as running."""
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return
    for run in c.search_runs([exp.experiment_id], filter_string=f"tags.`ptv2.sweep_id` = '{sweep_id}'"):
        if run.info.status == "RUNNING" and run.data.tags.get("ptv2.kind") != "sweep":
            tracking.end_run(uri, run.info.run_id, status)
