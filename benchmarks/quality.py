"""Quality benchmark: a deep prompt against LoRA, full fine-tuning, Lester prompts and a linear
probe, on real models and real data, over 3 seeds.

Every training run goes through the service: `ptv2 sweep` over `train.seed` (each trial a ptv2
job with 2 DeepSpeed workers, recorded in MLflow; ASHA off), the results read back from MLflow
(dev and test metrics, trainable parameter counts, wall time). What trains besides the task head
is the spec's prompt, or a baseline plugged in through the service's extension point
(`ptv2.trainee.Trainable`, benchmarks/baselines.py): full fine-tuning and PEFT's LoRA.

Each method runs at its learning rate chosen on dev by the one-seed sweeps recorded before
(QUALITY.md); a method without one (the LoRA rows, and every method on a task never swept) is
first swept over 3 learning rates at seed 0, the best on dev kept, then run at seeds 1 and 2.

    python benchmarks/quality.py                   # every task and method (results kept as each run ends)
    python benchmarks/quality.py --only polarity --methods lora-r8   # a part; the rest of quality.json is kept
    python benchmarks/quality.py --only wnut16 --methods full-ft-long --seeds 0   # twice the steps, one seed
    python benchmarks/quality.py --report          # the Markdown tables of quality.json
    python benchmarks/quality.py --quick           # ~4.5 min on 2 cores: P-Tuning v2 must beat the linear probe

Tasks: polarity and uncertainty (MiniLM-L6, accuracy), WNUT-16 NER (MiniLM-L6, entity F1,
seqeval), SmolLM2-135M chatterbot replies (loss on the reply tokens; the splits share no prompt).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import FullFineTuning, Lora  # noqa: E402
from quality_report import SEEDS, plot, report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PTV2 = Path(sys.executable).parent / "ptv2"
PROMPT_STEPS, WEIGHT_STEPS = 300, 150  # prompts train for more steps than weights (THUDM's recipes)
# Grids for a task without a chosen rate. LoRA: polarity's sweep over 3e-4, 1e-3, 3e-3 chose its top
# (dev 81.5 / 84.3 / 85.5), so the grid moved up one step; full fine-tuning: uncertainty's sweep over
# 2e-5, 5e-5, 1e-4 chose its top, and WNUT-16 at 5e-5 was still under-trained after 150 steps.
LR_SWEEP = {"lora": [1e-3, 3e-3, 1e-2], "full-ft": [5e-5, 1e-4, 2e-4], "prompt": [1e-2, 2e-2, 4e-2]}


@dataclass
class Method:
    settings: dict  # merged into the spec
    steps: int
    lrs: dict[str, float]  # task -> the learning rate chosen on dev by an earlier sweep
    sweep: list[float]  # learning rates tried at seed 0 on a task without one
    trainable: Callable | None = None  # a baselines.Trainable factory (None: the spec's prompt)


def _lora(r: int) -> Callable:
    return lambda: Lora(r=r)


# The one-seed sweeps recorded in quality.json (2026-11-28, chosen on dev accuracy): polarity and
# uncertainty; the WNUT-16 (prompts only: full fine-tuning is swept) and SmolLM2 rates of the
# earlier single runs. LoRA: PEFT's LoraConfig on the attention projections (BERT:
# query/key/value; Llama: q/k/v/o). r=8, and the rank with about
# ptv2's trained parameters: MiniLM r=6 (82,944 LoRA values + head against ptv2's 74,498), SmolLM2
# r=2 (230,400: k and v are 192 wide under grouped-query attention, against ptv2's 184,320): ptv2
# trains fewer than either.
METHODS = {
    "ptv2": Method(
        {"prompt": {"method": "ptv2", "length": 16}},
        PROMPT_STEPS,
        {"polarity": 2e-2, "uncertainty": 4e-2, "wnut16": 3e-2},
        LR_SWEEP["prompt"],
    ),
    "prompt-tuning": Method(
        {"prompt": {"method": "prompt-tuning", "length": 16}},
        PROMPT_STEPS,
        {"polarity": 1e-2, "uncertainty": 1e-2, "wnut16": 1e-2},  # WNUT-16: the rate both sentence tasks chose
        [1e-2, 3e-2, 1e-1],
    ),
    "lora-r8": Method({"prompt": {"length": 0}}, PROMPT_STEPS, {}, LR_SWEEP["lora"], _lora(8)),
    "lora-matched": Method({"prompt": {"length": 0}}, PROMPT_STEPS, {}, LR_SWEEP["lora"], None),  # rank per model
    "full-ft": Method(
        {"prompt": {"length": 0}},
        WEIGHT_STEPS,
        {"polarity": 5e-5, "uncertainty": 1e-4},  # WNUT-16: swept (never was)
        LR_SWEEP["full-ft"],
        FullFineTuning,
    ),
    "linear-probe": Method(
        {"prompt": {"length": 0}}, WEIGHT_STEPS, {"polarity": 1e-1, "uncertainty": 3e-2}, [1e-2, 3e-2, 1e-1]
    ),
}
# Not goals' rows, run only when named (--methods): what twice the steps give a method whose dev
# score was still rising at its last evaluation. Full fine-tuning on WNUT-16 at the rate its sweep
# chose (2e-4, the grid's top).
METHODS["ptv2-long"] = replace(METHODS["ptv2"], steps=2 * PROMPT_STEPS)
METHODS["full-ft-long"] = replace(METHODS["full-ft"], steps=2 * WEIGHT_STEPS, lrs={"wnut16": 2e-4})
OPT_IN = {"ptv2-long", "full-ft-long"}
MATCHED_RANK = {"minilm": 6, "smollm2-135m": 2}
QUICK = {"ptv2": 2e-2, "linear-probe": 3e-2}  # --quick: one run each, 120 steps


@dataclass
class Task:
    name: str  # the data folder
    model: str  # under data/models
    kind: str  # the spec's model.task
    labels: list[str] | None
    metric: str  # the primary metric (higher is better unless `lower`)
    max_length: int
    micro_batch: int
    lower: bool = False
    methods: tuple[str, ...] = tuple(METHODS)


NER_TAGS = ["O"] + [
    f"{p}-{t}"
    for t in (
        "company",
        "facility",
        "geo-loc",
        "movie",
        "musicartist",
        "other",
        "person",
        "product",
        "sportsteam",
        "tvshow",
    )
    for p in ("B", "I")
]
TASKS = {
    "polarity": Task("polarity", "minilm", "seq-cls", ["negative", "positive"], "accuracy", 64, 16),
    "uncertainty": Task("uncertainty", "minilm", "seq-cls", ["certain", "uncertain"], "accuracy", 64, 16),
    "wnut16": Task("wnut16", "minilm", "token-cls", NER_TAGS, "entity_f1", 96, 16),
    "smollm2": Task(
        "chat",
        "smollm2-135m",
        "causal-lm",
        None,
        "loss",
        64,
        8,
        lower=True,
        methods=("ptv2", "prompt-tuning", "lora-r8", "lora-matched", "full-ft"),
    ),
}
# SmolLM2: the rates of the earlier runs (ptv2 from the ablation of its init, QUALITY.md), 120 steps;
# full fine-tuning at a common rate for a 135M decoder, not swept (a run costs ~6 min here)
GENERATION = {"steps": 120, "lrs": {"ptv2": 1e-2, "prompt-tuning": 3e-2, "full-ft": 5e-5}, "ptv2_init": "text"}
# in this order, method by method over the tasks: the comparisons users ask first complete first
ORDER = ("ptv2", "lora-matched", "full-ft", "lora-r8", "prompt-tuning", "linear-probe", "ptv2-long", "full-ft-long")


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def base_spec(
    name: str,
    data: Path,
    dataset: str,
    model: str,
    task: str,
    labels,
    steps: int,
    mbs: int,
    max_length: int,
    experiment: str,
) -> dict:
    spec = {
        "name": name,
        "model": {"name_or_path": str(data / "models" / model), "task": task},
        "data": {
            "train_file": str(data / dataset / "train.jsonl"),
            "validation_file": str(data / dataset / "dev.jsonl"),
            "test_file": str(data / dataset / "test.jsonl"),
            "max_length": max_length,
        },
        "train": {
            "max_steps": steps,
            "micro_batch_size": mbs,
            "warmup_steps": max(1, steps // 20),
            "eval_every": max(1, steps // 2),
            "log_every": 10,
            "seed": 0,
        },
        # replicated frozen weights: MiniLM/SmolLM2 fit every worker, and nothing is all-gathered
        "deepspeed": {"config": "replicated.json"},
        "resources": {"workers": 2, "cpus_per_worker": 1},
        "tracking": {"experiment": experiment},
    }
    if labels:
        spec["model"]["labels"] = labels
    if task == "causal-lm":
        spec["data"]["prompt_template"] = "User: {prompt}\nAssistant:"
    return spec


# Methods that train something else than the spec's prompt: plugged in through the service's
# extension point (ptv2.trainee.Trainable), run in this process through the same run/sweep code.
def service(command: str, spec: dict, workdir: Path, answer: str, trainable=None) -> str:
    """`ptv2 COMMAND` (run or sweep) on the spec; returns the value of its `ANSWER:` output line
    (the MLflow run id, or the sweep id). A baseline Trainable goes through the same service code
    in this process (the command line has no flag for it: it is not a product feature)."""
    path = workdir / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    t0 = time.time()
    if trainable is not None:
        return in_process(command, path, trainable, t0)
    proc = subprocess.run([str(PTV2), command, str(path)], capture_output=True, text=True, cwd=workdir)
    if proc.returncode != 0:
        raise RuntimeError(f"ptv2 {command} {spec['name']} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    value = next(line.split()[-1] for line in proc.stdout.splitlines() if line.startswith(f"{answer}:"))
    print(f"  {spec['name']}: {command} {value} ({time.time() - t0:.0f} s)", flush=True)
    return value


def in_process(command: str, path: Path, trainable, t0: float) -> str:
    from launcher.runner import run_spec
    from launcher.spec import load_spec
    from launcher.sweep import run_sweep

    # the workers unpickle the trainable from benchmarks/baselines.py
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    spec = load_spec(path)
    if command == "sweep":
        value = run_sweep(spec, path.read_text(), trainable=trainable).sweep_id
    else:
        value = run_spec(spec, path.read_text(), trainable=trainable).run_id
    print(f"  {spec.name}: {command} {value} ({time.time() - t0:.0f} s, {trainable.name})", flush=True)
    return value


def results(run_id: str) -> dict:
    from ptv2.tracking import Tracker

    r = Tracker(None).run(run_id)
    n, share = r.trainable
    return {
        "run_id": run_id,
        "metrics": {k: v for k, v in r.metrics.items() if k.startswith(("test/", "eval/"))},
        "trainable_params": n,
        "trainable_share_pct": float(share) if share != "?" else 0.0,
        "wall_s": (r.end_ms - r.start_ms) / 1000,
        "params": {
            k: r.params.get(k)
            for k in ("prompt.method", "prompt.length", "prompt.projection", "prompt.init")
            + ("train.lr", "train.head_lr", "train.max_steps", "train.seed")
        },
    }


def sweep_trials(sweep_id: str, metric: str, experiment: str = "quality") -> list[dict]:
    """Every trial of the sweep as MLflow recorded it: status, its seed and lr, the dev metric at
    each evaluation, the test metrics, parameters, wall time."""
    from ptv2.tracking import Tracker

    tracker = Tracker(None)
    out = []
    for r in tracker.runs(experiment, sweep_id=sweep_id):
        if r.is_sweep:
            continue
        res = results(r.run_id)
        history = tracker.history(r.run_id, f"eval/{metric}")
        res.update(
            status=r.status.lower(),
            seed=int(res["params"]["train.seed"] or 0),
            lr=float(res["params"]["train.lr"]),
            dev=[round(m.value, 4) for m in history],
            dev_final=history[-1].value if history else None,
        )
        out.append(res)
    return sorted(out, key=lambda t: (t["lr"], t["seed"]))


def task_spec(task: Task, data: Path, method: str, steps: int, lr: float | None) -> dict:
    spec = base_spec(
        f"{task.name}-{method}",
        data,
        task.name,
        task.model,
        task.kind,
        task.labels,
        steps,
        task.micro_batch,
        task.max_length,
        "quality",
    )
    spec = merge(spec, METHODS[method].settings)
    if task.kind == "causal-lm" and method == "ptv2":
        spec["prompt"]["init"] = GENERATION["ptv2_init"]
    spec["train"]["eval_every"] = max(1, steps // 4)  # the dev curve, recorded
    if lr is not None:
        spec["train"]["lr"] = lr
    return spec


def trainable_for(method: str, task: Task):
    if method == "lora-matched":
        return Lora(r=MATCHED_RANK[task.model])
    factory = METHODS[method].trainable
    return factory() if factory is not None else None


def seeds_of(
    task: Task, method: str, data: Path, workdir: Path, out: dict, save, wanted: tuple[int, ...] = SEEDS
) -> None:
    """`method` on `task` over the `wanted` seeds, each as a trial of one `ptv2 sweep` (ASHA off);
    first a learning-rate sweep at seed 0 where no rate was chosen before. `out[method]` is written
    as soon as it is known (the caller's `save` keeps it); seeds run earlier at the same rate and
    steps and not run again are kept."""
    m = METHODS[method]
    generation = task.kind == "causal-lm"
    steps = GENERATION["steps"] if generation else m.steps
    lr = (GENERATION["lrs"] if generation else m.lrs).get(method if generation else task.name)
    entry = {"steps": steps, "lr": lr, "chosen": "earlier one-seed run or sweep (QUALITY.md)", "seeds": []}
    if generation and method == "full-ft":
        entry["chosen"] = "a common rate, not swept"
    partner = out.get("lora-r8" if method == "lora-matched" else "lora-matched", {})
    if lr is None and method.startswith("lora") and partner.get("lr"):  # one LoRA sweep per task
        lr = partner["lr"]
        entry.update(lr=lr, chosen=f"the rate chosen for the other LoRA rank ({partner['chosen']})")
    if lr is None:
        spec = task_spec(task, data, method, steps, None)
        spec["train"]["seed"] = 0
        spec["sweep"] = {"parameters": {"train.lr": {"grid": m.sweep}}, "metric": task.metric, "early_stopping": None}
        tried = sweep_trials(sweep(spec, workdir, trainable_for(method, task)), task.metric)
        done = [t for t in tried if t["status"] == "finished" and t["dev_final"] is not None]
        if not done:
            raise RuntimeError(f"{task.name} {method}: no learning rate trial finished")
        best = (min if task.lower else max)(done, key=lambda t: t["dev_final"])
        entry.update(lr=best["lr"], chosen=f"swept {m.sweep} at seed 0, best on dev", lr_trials=tried)
        entry["seeds"].append(best)
        out[method] = entry
        save()
    seeds = [s for s in wanted if s not in {t["seed"] for t in entry["seeds"]}]
    if seeds:
        spec = task_spec(task, data, method, steps, entry["lr"])
        spec["sweep"] = {"parameters": {"train.seed": {"grid": seeds}}, "metric": task.metric, "early_stopping": None}
        entry["seeds"] += sweep_trials(sweep(spec, workdir, trainable_for(method, task)), task.metric)
    old = out.get(method, {})
    if (old.get("lr"), old.get("steps")) == (entry["lr"], steps):
        ran = {t["seed"] for t in entry["seeds"]}
        entry["seeds"] += [t for t in old.get("seeds", []) if t["seed"] not in ran]
    entry["seeds"].sort(key=lambda t: t["seed"])
    out[method] = entry
    save()


def sweep(spec: dict, workdir: Path, trainable=None) -> str:
    """`ptv2 sweep` on the spec (embedded Ray, one trial at a time on 2 cores); returns the sweep id."""
    return service("sweep", spec, workdir, "sweep", trainable)


def no_prompt(data: Path) -> dict:
    """SmolLM2 alone on the test replies: the loss every prompt should lower."""
    import torch
    from transformers import AutoTokenizer

    from ptv2.data import collator, load_examples
    from ptv2.evaluate import evaluate
    from ptv2.model import PromptedModel, load_base_model
    from ptv2.settings import DataSettings, PromptConfig

    model_dir = data / "models" / "smollm2-135m"
    tok = AutoTokenizer.from_pretrained(model_dir)
    settings = DataSettings(train_file="x", prompt_template="User: {prompt}\nAssistant:", max_length=64)
    test = load_examples(data / "chat" / "test.jsonl", settings, "causal-lm", None, tok)
    model = PromptedModel(load_base_model(model_dir, "causal-lm")[0], PromptConfig(length=0), "causal-lm").eval()
    metrics = evaluate(model, test, "causal-lm", None, 16, collator(tok, "causal-lm"), 0, 1, torch.device("cpu"))
    return {"test/loss": metrics["loss"], "test/accuracy": metrics["accuracy"]}


def check_splits(data: Path, task: Task) -> None:
    """Refuse splits that share an input: test scores on seen examples would overstate."""
    key = {"seq-cls": "text", "token-cls": "tokens", "causal-lm": "prompt"}[task.kind]
    seen: dict[str, str] = {}
    for split in ("train", "dev", "test"):
        for line in (data / task.name / f"{split}.jsonl").read_text().splitlines():
            value = json.dumps(json.loads(line)[key])
            if seen.setdefault(value, split) != split:
                raise SystemExit(f"{task.name}: an input of {split} is also in {seen[value]}: de-duplicate first")


def quick(data: Path, workdir: Path) -> int:
    """P-Tuning v2 against the linear probe on polarity, 120 steps each, asserted (`make test`)."""
    t0 = time.time()
    acc = {}
    for method, lr in QUICK.items():
        labels = ["negative", "positive"]
        spec = base_spec(f"polarity-{method}", data, "polarity", "minilm", "seq-cls", labels, 120, 16, 64, "quality")
        spec = merge(spec, merge(METHODS[method].settings, {"train": {"lr": lr}}))
        acc[method] = results(service("run", spec, workdir, "run id"))["metrics"]["test/accuracy"]
    a, b = acc["ptv2"], acc["linear-probe"]
    print(f"quick: polarity test accuracy ptv2 {a:.3f} vs linear probe {b:.3f} ({time.time() - t0:.0f} s)")
    if not a > b:
        print("FAILED: P-Tuning v2 did not beat the linear probe", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~4.5 min: ptv2 vs linear probe on polarity, asserted")
    ap.add_argument("--data", type=Path, default=ROOT / "data", help="prepared by python -m ptv2.assets")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "quality.json")
    ap.add_argument("--only", nargs="+", default=list(TASKS), choices=list(TASKS), help="tasks to run")
    ap.add_argument(
        "--methods", nargs="+", choices=list(METHODS), help="methods to (re)run; the task's other results are kept"
    )
    ap.add_argument(
        "--seeds", nargs="+", type=int, default=list(SEEDS), choices=SEEDS, help="seeds to run (the others are kept)"
    )
    ap.add_argument("--report", action="store_true", help="print the Markdown tables of --json and exit")
    args = ap.parse_args()
    if args.report:
        print(report(json.loads(args.json.read_text())))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.quick:  # a throwaway MLflow store; the full benchmark records into $PTV2_HOME
        os.environ.setdefault("PTV2_HOME", tempfile.mkdtemp(prefix="ptv2-quick-"))
    if not (args.data / "polarity" / "train.jsonl").is_file():
        subprocess.run([sys.executable, "-m", "ptv2.assets", "--out", str(args.data)], check=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="ptv2-quality-") as tmp:
        workdir = Path(tmp)
        if args.quick:
            return quick(args.data, workdir)
        # what earlier invocations measured is kept: results accumulate, a run at a time
        old = json.loads(args.json.read_text()) if args.json.is_file() else {}
        results: dict = old if old.get("_meta", {}).get("seeds") == list(SEEDS) else {"_previous": old}
        meta = results.setdefault("_meta", {"seeds": list(SEEDS)})

        def save() -> None:
            meta.update(cpu_count=os.cpu_count(), python=sys.version.split()[0], wall_s=round(time.time() - t0))
            args.json.write_text(json.dumps(results, indent=2) + "\n")

        for name in args.only:
            check_splits(args.data, TASKS[name])
            # the loss every prompt should lower: cheap (one evaluation), measured when missing
            if TASKS[name].kind == "causal-lm" and (not args.methods or "no-prompt" not in results.get(name, {})):
                base = {"metrics": no_prompt(args.data), "trainable_params": 0, "trainable_share_pct": 0.0}
                results.setdefault(name, {})["no-prompt"] = base
        for method in ORDER:
            if (method not in args.methods) if args.methods else method in OPT_IN:
                continue
            for name in args.only:
                if method in TASKS[name].methods:
                    print(f"{name}: {method}", flush=True)
                    out = results.setdefault(name, {})
                    seeds_of(TASKS[name], method, args.data, workdir, out, save, tuple(args.seeds))
    print(f"done in {time.time() - t0:.0f} s")
    figures = plot(results, args.json.parent)
    log_report(results, figures)
    print(report(results))
    return 0


def log_report(results: dict, figures: list[Path]) -> None:
    """The plots and quality.json, logged to a run of the quality experiment (beside the sweeps)."""
    from ptv2.tracking import Tracker

    tracker = Tracker(None)
    run_id = tracker.start_run("quality", "quality-report", {"seeds": len(SEEDS)}, {"ptv2.kind": "report"})
    for path in figures:
        tracker.log_file(run_id, path)
    tracker.log_text(run_id, json.dumps(results, indent=2), "quality.json")
    tracker.end(run_id, "FINISHED")


if __name__ == "__main__":
    sys.exit(main())
