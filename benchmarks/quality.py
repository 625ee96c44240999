"""Quality benchmark: does a deep prompt match fine-tuning on real models and real data?

Every training run goes through the service path: classification as one `ptv2 sweep` per method
(Ray Tune, each trial a ptv2 job with 2 DeepSpeed workers, ASHA), generation through `ptv2 run`
-> MLflow; the results are read back from MLflow (test metrics, trainable parameter counts, wall
time), and the generation scores from the prompts fetched out of MLflow.

    python benchmarks/quality.py            # polarity sweeps (~66 min on 2 cores), uncertainty (~50 min),
                                            # SmolLM2 + its ablation (~35 min); writes quality.json/.png
    python benchmarks/quality.py --only polarity   # a part (results accumulate in quality.json)
    python benchmarks/quality.py --only uncertainty --methods linear-probe   # one method's sweep again
    python benchmarks/quality.py --report          # the Markdown tables of quality.json
    python benchmarks/quality.py --quick    # ~4.5 min on 2 cores: P-Tuning v2 must beat the linear probe

Methods: ptv2 (deep prefix + head), ptv2-mlp (THUDM's MLP reparameterization), prompt-tuning
(Lester: input embeddings + head), full fine-tuning (every weight), linear probe (head only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import FullFineTuning  # noqa: E402
from quality_report import plot, report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PTV2 = Path(sys.executable).parent / "ptv2"
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
# Every method gets the same search (3 learning rates, a grid, chosen on dev) with the same ASHA
# settings; prompts get twice the steps of the weight-training methods, as THUDM trains prompts
# for many more epochs than fine-tuning (its scripts: 40-100 epochs against 3-10).
PROMPT_STEPS, WEIGHT_STEPS = 300, 150
EVALUATIONS = 4  # per trial; ASHA may stop a trial after the first 2 (grace period)
METHODS = {  # name -> (settings, steps, learning rates tried)
    "ptv2": ({"prompt": {"method": "ptv2", "length": 16}}, PROMPT_STEPS, [1e-2, 2e-2, 4e-2]),
    "prompt-tuning": ({"prompt": {"method": "prompt-tuning", "length": 16}}, PROMPT_STEPS, [1e-2, 3e-2, 1e-1]),
    "full-ft": ({"prompt": {"length": 0}}, WEIGHT_STEPS, [2e-5, 5e-5, 1e-4]),  # + FullFineTuning (TRAINABLES)
    "linear-probe": ({"prompt": {"length": 0}}, WEIGHT_STEPS, [1e-2, 3e-2, 1e-1]),
    # THUDM's reparameterization: an Adam step moves each MLP output by up to ~512·|tanh|·lr (a plain
    # table's by lr), so it needs a far lower prompt lr (1e-3..5e-3 collapsed to chance) while the
    # task head keeps a probe's lr (train.head_lr)
    "ptv2-mlp": (
        {"prompt": {"method": "ptv2", "length": 16, "projection": 512}, "train": {"head_lr": 3e-2}},
        PROMPT_STEPS,
        [5e-5, 1e-4, 3e-4],
    ),
}
QUICK = {"ptv2": 2e-2, "linear-probe": 3e-2}  # --quick: one run each, 120 steps


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
TRAINABLES = {"full-ft": FullFineTuning}


def service(command: str, spec: dict, workdir: Path, answer: str, trainable=None) -> str:
    """`ptv2 COMMAND` (run or sweep) on the spec; returns the value of its `ANSWER:` output line
    (the MLflow run id, or the sweep id). A method of TRAINABLES goes through the same service
    code in this process, with its Trainable."""
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


def run(spec: dict, workdir: Path, method: str | None = None) -> str:
    """`ptv2 run` on the spec; returns the MLflow run id."""
    return service("run", spec, workdir, "run id", TRAINABLES[method]() if method in TRAINABLES else None)


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
            + ("train.lr", "train.head_lr", "train.max_steps")
        },
    }


def sweep(spec: dict, workdir: Path, method: str | None = None) -> str:
    """`ptv2 sweep` on the spec (embedded Ray, one trial at a time on 2 cores); returns the sweep id."""
    return service("sweep", spec, workdir, "sweep", TRAINABLES[method]() if method in TRAINABLES else None)


def sweep_trials(sweep_id: str, metric: str, experiment: str = "quality") -> list[dict]:
    """Every trial of the sweep as MLflow recorded it: status, the swept lr, the dev metric at
    each evaluation, the test metrics (trials that ran to the end), parameters, wall time."""
    from ptv2.tracking import Tracker

    tracker = Tracker(None)
    out = []
    for r in tracker.runs(experiment, sweep_id=sweep_id):
        if r.is_sweep:
            continue
        res = results(r.run_id)
        history = tracker.history(r.run_id, f"eval/{metric}")
        res.update(
            status="stopped early" if r.early_stopped else r.status.lower(),
            dev=[round(m.value, 4) for m in history],
            dev_final=history[-1].value if history else None,
        )
        out.append(res)
    return sorted(out, key=lambda t: float(t["params"]["train.lr"]))


def classification(
    data: Path, workdir: Path, dataset: str, labels: list[str], methods, out: dict, save=lambda: None
) -> dict:
    """One sweep per method (same grid size and ASHA settings); the chosen trial is the completed
    one with the best final dev accuracy (the model its test score belongs to). `out` is filled
    as each method's sweep ends (the caller saves it: an interrupted run keeps what it measured)."""
    for method in methods:
        settings, steps, lrs = METHODS[method]
        spec = merge(
            base_spec(f"{dataset}-{method}", data, dataset, "minilm", "seq-cls", labels, steps, 16, 64, "quality"),
            settings,
        )
        spec["train"]["eval_every"] = steps // EVALUATIONS
        spec["sweep"] = {
            "parameters": {"train.lr": {"grid": lrs}},
            "metric": "accuracy",
            "early_stopping": {"grace_period": 2, "reduction_factor": 2},
        }
        sweep_id = sweep(spec, workdir, method)
        trials = sweep_trials(sweep_id, "accuracy")
        done = [t for t in trials if t["status"] == "finished" and "test/accuracy" in t["metrics"]]
        if not done:
            raise RuntimeError(f"sweep {sweep_id} ({dataset} {method}): no trial finished")
        best = max(done, key=lambda t: t["dev_final"])
        out[method] = {
            **best,
            "sweep_id": sweep_id,
            "steps": steps,
            "trials": trials,
            "sweep_wall_s": sum(t["wall_s"] for t in trials),
        }
        save()
    return out


def ner(data: Path, workdir: Path, steps: int) -> dict:
    out = {}
    for method in ("ptv2", "full-ft"):
        settings = merge(METHODS[method][0], {"train": {"lr": 3e-2 if method == "ptv2" else 5e-5}})
        spec = merge(
            base_spec(f"wnut16-{method}", data, "wnut16", "minilm", "token-cls", NER_TAGS, steps, 16, 96, "quality"),
            settings,
        )
        out[method] = results(run(spec, workdir, method))
    return out


GENERATION_STEPS = 120
GENERATION_PROMPTS = {  # name -> (prompt settings, lr)
    "prompt-tuning": ({"method": "prompt-tuning", "length": 16}, 3e-2),
    "ptv2": ({"method": "ptv2", "length": 16, "init": "text"}, 1e-2),  # init chosen in the ablation
}


def generation(
    data: Path, workdir: Path, steps: int, n_eval: int = 60, prompts: dict | None = None, baseline: bool = True
) -> dict:
    """SmolLM2 on chatterbot replies: eval loss and exact match, with no prompt, a Lester prompt
    and a P-Tuning v2 prompt. The prompts are fetched back from MLflow for generation."""
    import torch
    from transformers import AutoTokenizer

    from launcher.prompts import fetch
    from ptv2.artifact import load_prompt
    from ptv2.data import collator, load_examples
    from ptv2.evaluate import evaluate
    from ptv2.infer import generate
    from ptv2.model import PromptedModel, load_base_model
    from ptv2.settings import DataSettings, PromptConfig

    model_dir = data / "models" / "smollm2-135m"
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(x) for x in (data / "chat" / "test.jsonl").read_text().splitlines()][:n_eval]
    template = "User: {prompt}\nAssistant:"
    settings = DataSettings(train_file="x", prompt_template=template, max_length=64)
    test_ex = load_examples(data / "chat" / "test.jsonl", settings, "causal-lm", None, tok)

    def score(model) -> dict:
        loss = evaluate(
            lambda **b: model(**b).logits,
            test_ex,
            "causal-lm",
            None,
            16,
            collator(tok, "causal-lm"),
            0,
            1,
            torch.device("cpu"),
        )["loss"]
        outs = generate(model, tok, [template.replace("{prompt}", r["prompt"]) for r in rows], max_new_tokens=24)
        em = sum(o.strip() == r["response"].strip() for o, r in zip(outs, rows, strict=True)) / len(rows)
        return {"test/loss": loss, "test/exact_match": em}

    out = {}
    if baseline:
        base, _ = load_base_model(model_dir, "causal-lm")
        out["no-prompt"] = {
            "metrics": score(PromptedModel(base, PromptConfig(length=0), "causal-lm").eval()),
            "trainable_params": 0,
            "trainable_share_pct": 0.0,
            "wall_s": 0.0,
        }
    for name, (prompt, lr) in (prompts or GENERATION_PROMPTS).items():
        spec = base_spec(
            f"smollm2-chat-{name}", data, "chat", "smollm2-135m", "causal-lm", None, steps, 8, 64, "quality"
        )
        spec["prompt"] = prompt
        spec["train"]["lr"] = lr
        res = results(run(spec, workdir))
        with tempfile.TemporaryDirectory() as tmp:
            fetch(None, res["run_id"], Path(tmp) / "p")
            model = load_prompt(Path(tmp) / "p", load_base_model(model_dir, "causal-lm")[0]).eval()
            res["metrics"].update(score(model))
        res["params"]["prompt.init"] = PromptConfig(**prompt).resolved_init("decoder")
        out[name] = res
    return out


def ablations(data: Path, workdir: Path) -> dict:
    """Why the generation numbers (QUALITY.md): the prefix initialisation on SmolLM2."""
    inits = {f"ptv2-init-{i}": ({"method": "ptv2", "length": 16, "init": i}, 1e-2) for i in ("normal", "vocab")}
    return {"smollm2-init": generation(data, workdir, steps=GENERATION_STEPS, baseline=False, prompts=inits)}


def quick(data: Path, workdir: Path) -> int:
    """P-Tuning v2 against the linear probe on polarity, 120 steps each, asserted (`make test`)."""
    t0 = time.time()
    acc = {}
    for method, lr in QUICK.items():
        labels = ["negative", "positive"]
        spec = base_spec(f"polarity-{method}", data, "polarity", "minilm", "seq-cls", labels, 120, 16, 64, "quality")
        spec = merge(spec, merge(METHODS[method][0], {"train": {"lr": lr}}))
        acc[method] = results(run(spec, workdir, method))["metrics"]["test/accuracy"]
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
    ap.add_argument(
        "--only",
        nargs="+",
        default=["polarity", "uncertainty", "smollm2", "ablations"],
        choices=["polarity", "uncertainty", "smollm2", "ablations", "wnut16"],
        help="experiments to run (wnut16, ~10 min, is not in the default)",
    )
    ap.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        help="classification methods to (re)run; the results of the experiment's other methods are kept",
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
        # runs of earlier invocations (--only) are kept: the JSON accumulates the experiments
        results: dict = json.loads(args.json.read_text()) if args.json.is_file() else {}
        meta = results.setdefault("_meta", {})

        def save() -> None:  # after every experiment, so an interrupted run keeps what it measured
            meta.update(cpu_count=os.cpu_count(), python=sys.version.split()[0])
            args.json.write_text(json.dumps(results, indent=2) + "\n")

        def partial(name: str) -> dict:  # the experiment's entry, filled as it goes
            if not args.methods:  # a whole experiment starts afresh
                results[name] = {}
            return results.setdefault(name, {})

        def methods(names) -> list[str]:
            return [m for m in names if not args.methods or m in args.methods]

        experiments = {
            "polarity": lambda: classification(
                args.data, workdir, "polarity", ["negative", "positive"], methods(METHODS), partial("polarity"), save
            ),
            "uncertainty": lambda: classification(
                args.data,
                workdir,
                "uncertainty",
                ["certain", "uncertain"],
                methods(["ptv2", "full-ft", "prompt-tuning", "linear-probe"]),
                partial("uncertainty"),
                save,
            ),
            "wnut16": lambda: ner(args.data, workdir, steps=250),
            "smollm2": lambda: generation(args.data, workdir, steps=GENERATION_STEPS),
            "ablations": lambda: ablations(args.data, workdir),
        }
        for name in args.only:
            print(name, flush=True)
            t1 = time.time()
            results[name] = experiments[name]()
            walls = meta.setdefault("wall_s", {})
            walls[name] = round(time.time() - t1) + (walls.get(name, 0) if args.methods else 0)
            save()
    print(f"done in {time.time() - t0:.0f} s")
    try:
        plot(results, args.json.with_name("quality.png"))
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
