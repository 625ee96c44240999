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
import math
from dataclasses import dataclass, field
from pathlib import Path

from launcher.runner import (
    JobFailed,
    ensure_ray,
    fit_job,
    make_trainer,
    reopen_run,
    stack_versions,
    this_driver,
)
from launcher.spec import JobSpec, Sweep, check_job_id, new_job_id, with_values
from ptv2 import storage
from ptv2.errors import first_line
from ptv2.tracking import RunRecord, Tracker, TrackingError, job_tags, swept_tags


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
    from ptv2.tasks import task_of  # transformers: not for `ptv2 --help`

    task = task_of(spec.model.task)
    metric = spec.sweep.metric or task.primary[0]
    return metric, spec.sweep.mode or task.metrics[metric]


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


def run_trial(config: dict, base: dict, sweep_id: str, parent_run_id: str, uri: str, training=None) -> None:
    """One trial, in its own Tune actor: its spec, its nested MLflow run (reopened when the sweep
    resumes), its Ray Train worker group reporting each evaluation to Tune. The trial ends its
    run FINISHED; the sweep's driver ends it otherwise (stopped, failed)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    params = config["params"]
    spec = JobSpec.model_validate(with_values(base, params))
    trial = tune.get_context().get_trial_id()
    job_id = trial_job_id(sweep_id, trial)
    tracker = Tracker(uri)
    run = tracker.find_job_run(spec.tracking.experiment, job_id)
    if run is None:
        tags = job_tags(
            job_id,
            spec.job_storage(job_id),
            stack_versions(),
            driver=this_driver(),
            parent_run_id=parent_run_id,
            sweep_id=sweep_id,
            trial=trial,
        )
        tags |= swept_tags(params)
        run_id = tracker.start_run(spec.tracking.experiment, job_id, spec.model_dump(mode="json"), tags)
        tracker.mark(run_id, name=f"{job_id} {trial_name(params)}")
    elif run.status == "FINISHED":
        # done before the sweep's driver died: tell Tune its result instead of training again
        from ptv2.tasks import task_of  # transformers: in the trial's process only

        metrics = task_of(spec.model.task).metrics
        last = {k: h[-1] for k in metrics if (h := tracker.history(run.run_id, f"eval/{k}"))}
        step = max(m.step for m in last.values())
        every = spec.train.eval_every
        tune.report(
            {"step": step, "eval_index": -(-step // every) if every else 1, **{k: m.value for k, m in last.items()}}
        )
        return
    else:
        run_id = run.run_id
        tracker.reopen(run_id, this_driver())
    trainer = make_trainer(
        spec, job_id, run_id, uri, report_eval=True, ray_callbacks=[TuneReportCallback()], trainable=training
    )
    fit_job(trainer, spec, job_id, run_id, tracker, owns_run=False)


def _error_of(trial) -> str:
    """The first line of a failed trial's error, as Tune wrote it on the driver."""
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text() if path else ""
    except OSError:
        text = ""
    lines = [x for x in text.splitlines() if x.strip() and not x.startswith(("Traceback", "  "))]
    return first_line(lines[-1] if lines else "the trial failed", 2000)


class TrialRuns:
    """How a sweep's trial runs end other than FINISHED, owned by the sweep's driver: a trial the
    scheduler stops is marked KILLED (and early-stopped) the moment it decides so, before Tune
    stops the trial's actor, whose worker group then goes down with errors that are not the
    trial's; a trial that failed is marked FAILED with its error. A run already ended stays as it
    is, so the order in which Tune reports a stop and an error does not matter."""

    def __init__(self, uri: str, experiment: str, sweep_id: str, metric: str) -> None:
        self.tracker, self.experiment, self.sweep_id, self.metric = Tracker(uri), experiment, sweep_id, metric

    def run(self, trial) -> RunRecord | None:
        return self.tracker.find_job_run(self.experiment, trial_job_id(self.sweep_id, trial.trial_id))

    def stopped(self, trial) -> None:
        run = self.run(trial)
        if run is not None and run.status == "RUNNING":
            self.tracker.mark(run.run_id, early_stopped=True)
            self.tracker.end(run.run_id, "KILLED")

    def completed(self, trial) -> None:
        run = self.run(trial)
        value = (trial.last_result or {}).get(self.metric)
        what = "stopped early" if run is not None and run.early_stopped else "finished"
        shown = f"{self.metric} {value:.4f}" if isinstance(value, float) else "no evaluation"
        print(f"[ptv2] trial {trial.trial_id} {what}: {shown} ({trial_name(trial.config['params'])})", flush=True)

    def failed(self, trial) -> None:
        run = self.run(trial)
        if run is not None and run.status == "RUNNING":
            self.tracker.end(run.run_id, "FAILED", error=None if run.error else _error_of(trial))
        print(f"[ptv2] trial {trial.trial_id} failed ({trial_name(trial.config['params'])})", flush=True)

    def callback(self):
        """The Tune callback that reports trials' ends here."""
        from ray import tune

        owner = self

        class Callback(tune.Callback):
            def on_trial_complete(self, iteration, trials, trial, **info):
                owner.stopped(trial)  # a trial Tune completes while its run still runs was stopped
                owner.completed(trial)

            def on_trial_error(self, iteration, trials, trial, **info):
                owner.failed(trial)

        return Callback()

    def asha(self, **settings):
        """Tune's ASHA scheduler, marking each trial it stops as it decides to."""
        from ray.tune.schedulers import ASHAScheduler, TrialScheduler

        owner = self

        class Scheduler(ASHAScheduler):
            def on_trial_result(self, tune_controller, trial, result):
                decision = super().on_trial_result(tune_controller, trial, result)
                if decision == TrialScheduler.STOP:
                    owner.stopped(trial)
                return decision

        return Scheduler(**settings)


def open_parent(
    spec: JobSpec, spec_text: str, sweep_id: str, tracker: Tracker, resume: bool, address: str | None, force: bool
) -> str:
    if resume:
        return reopen_run(tracker, spec.tracking.experiment, sweep_id, "sweep", force)
    metric, mode = objective(spec)
    params = {
        **{f"sweep.parameters.{k}": d.describe() for k, d in spec.sweep.parameters.items()},
        "sweep.samples": spec.sweep.samples,
        "sweep.metric": metric,
        "sweep.mode": mode,
        "sweep.early_stopping": spec.sweep.early_stopping.model_dump() if spec.sweep.early_stopping else None,
    }
    tags = job_tags(
        sweep_id,
        spec.job_storage(sweep_id),
        stack_versions(),
        driver=this_driver(),
        ray_job_id=sweep_id if address is not None else None,
        sweep_id=sweep_id,
        kind="sweep",
        sweep_metric=metric,
        sweep_mode=mode,
    )
    return tracker.start_run(spec.tracking.experiment, sweep_id, params, tags, spec_text)


def run_sweep(
    spec: JobSpec,
    spec_text: str,
    address: str | None = None,
    sweep_id: str | None = None,
    resume: bool = False,
    force: bool = False,
    trainable=None,
) -> SweepSummary:
    """Run (or resume) the sweep of `spec` on Ray Tune; the parent MLflow run ends FINISHED with
    the best trial, FAILED when no trial succeeded, KILLED when stopped. `trainable`: what every
    trial trains besides the head (`ptv2.trainee.Trainable`; default the spec's prompt)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    if resume and sweep_id is None:
        raise JobFailed("resume needs the id of the sweep to resume")
    sweep_id = check_job_id(sweep_id) if sweep_id is not None else new_job_id(f"{spec.name}-sweep")
    location = spec.job_storage(sweep_id)
    fs, path = storage.resolve(location)
    if resume and not storage.exists(storage.join(location, "tune")):
        raise JobFailed(f"--resume {sweep_id}: nothing of that sweep in storage at {location}")
    tracker = Tracker(spec.tracking.tracking_uri)
    metric, mode = objective(spec)
    parent = open_parent(spec, spec_text, sweep_id, tracker, resume, address, force)
    print(f"[ptv2] sweep {sweep_id}: MLflow run {parent} at {tracker.uri}; storage {location}", flush=True)
    started_here = False
    try:
        started_here = ensure_ray(spec, address)
        trial = tune.with_parameters(
            run_trial,
            base=spec.model_dump(mode="json", exclude={"sweep"}),
            sweep_id=sweep_id,
            parent_run_id=parent,
            uri=tracker.uri,
            training=trainable,  # (with_parameters takes `trainable` itself)
        )
        trial = tune.with_resources(trial, {"memory": 1})  # no CPU: the worker group claims the trial's
        es = spec.sweep.early_stopping
        trial_runs = TrialRuns(tracker.uri, spec.tracking.experiment, sweep_id, metric)
        scheduler = (
            trial_runs.asha(
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
            callbacks=[trial_runs.callback()],
            failure_config=tune.FailureConfig(fail_fast=False),
            verbose=0,
        )
        if resume:
            tuner = tune.Tuner.restore(
                storage.join(location, "tune") if storage.is_uri(location) else f"{path}/tune",
                trainable=trial,
                resume_errored=True,
                storage_filesystem=fs,
            )
        else:
            tuner = tune.Tuner(
                trial,
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
        summary = summarize(spec, sweep_id, parent, tracker, metric, mode)
        record(summary, spec, tracker)
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        close_open_trials(tracker, spec.tracking.experiment, sweep_id, status)
        tracker.end_if_running(parent, status, error=str(e))
        raise
    finally:
        if started_here:
            ray.shutdown()
    return summary


def trials(tracker: Tracker, experiment: str, sweep_id: str, metric: str, mode: str, names: list[str]) -> list[dict]:
    """The sweep's trials as MLflow recorded them, best first: run, status (early stops marked),
    evaluations, the best value of `metric` over its evaluations, the swept values."""
    sign = 1 if mode == "max" else -1
    rows = []
    for run in tracker.runs(experiment, sweep_id=sweep_id):
        if run.is_sweep:
            continue
        values = [m.value for m in tracker.history(run.run_id, f"eval/{metric}")]
        rows.append(
            {
                "run_id": run.run_id,
                "trial": run.trial,
                "status": "STOPPED EARLY" if run.early_stopped else run.status,
                "evaluations": len(values),
                metric: max(values, key=lambda v: sign * v) if values else math.nan,
                **{k: run.swept(k) for k in names},
            }
        )
    return sorted(rows, key=lambda t: (math.isnan(t[metric]), 0 if math.isnan(t[metric]) else -sign * t[metric]))


def sweep_table(uri: str | None, sweep_id: str) -> tuple[list[dict], list[str]]:
    """(rows, columns) of a sweep's trials, best first, read from MLflow (`ptv2 runs --sweep`)."""
    tracker = Tracker(uri)
    parents = [r for r in tracker.runs(sweep_id=sweep_id) if r.is_sweep]
    if not parents:
        raise TrackingError(f"no sweep {sweep_id!r} in {tracker.uri}")
    parent = parents[0]
    metric, mode = parent.sweep_objective
    names = [k.removeprefix("sweep.parameters.") for k in parent.params if k.startswith("sweep.parameters.")]
    rows = trials(tracker, tracker.experiment_name(parent.experiment_id), sweep_id, metric, mode, names)
    return rows, ["run_id", "trial", "status", "evaluations", metric, *names]


def summarize(spec: JobSpec, sweep_id: str, parent: str, tracker: Tracker, metric: str, mode: str) -> SweepSummary:
    summary = SweepSummary(sweep_id, parent, tracker.uri, metric, mode)
    summary.trials = trials(tracker, spec.tracking.experiment, sweep_id, metric, mode, list(spec.sweep.parameters))
    done = [t for t in summary.trials if not math.isnan(t[metric])]
    if not done:
        raise JobFailed(f"no trial of sweep {sweep_id} produced {metric}: see the trial runs for why")
    best = done[0]
    summary.best_run_id, summary.best_value = best["run_id"], best[metric]
    summary.best_params = {k: best[k] for k in spec.sweep.parameters}
    tracker.mark(best["run_id"], sweep_best=True)
    return summary


def record(summary: SweepSummary, spec: JobSpec, tracker: Tracker) -> None:
    """The parent run: best value and parameters, the trials' table and plot; the best prompt
    registered when the spec says so; then FINISHED."""
    run_id = summary.run_id
    tracker.record_sweep_result(run_id, summary.metric, summary.best_value, summary.best_run_id, summary.best_params)
    tracker.log_text(run_id, trials_csv(summary), "sweep/trials.csv")
    tracker.log_text(run_id, trials_markdown(summary), "sweep/trials.md")
    tracker.log_figure(run_id, plot(summary, spec), "sweep/metric_by_parameter.png")
    if spec.tracking.register_as:
        version = tracker.register_prompt(summary.best_run_id, spec.tracking.register_as, path="best")
        print(f"[ptv2] registered models:/{spec.tracking.register_as}/{version} (best trial)", flush=True)
    tracker.end(run_id, "FINISHED", {summary.metric: summary.best_value})


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


def close_open_trials(tracker: Tracker, experiment: str, sweep_id: str, status: str) -> None:
    """A stopped or failed sweep leaves no trial run marked as running."""
    for run in tracker.runs(experiment, sweep_id=sweep_id):
        if run.status == "RUNNING" and not run.is_sweep:
            tracker.end(run.run_id, status)
