"""Tables and plot of benchmarks/quality.py's results (QUALITY.md is generated from these)."""

from __future__ import annotations

from pathlib import Path

METHODS = ("ptv2", "ptv2-mlp", "prompt-tuning", "full-ft", "linear-probe")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for dataset, marker in (("polarity", "o"), ("uncertainty", "s")):
        for method, res in results.get(dataset, {}).items():
            if method.startswith("_"):
                continue
            x = max(res["trainable_params"], 1)
            y = 100 * res["metrics"].get("test/accuracy", 0)
            ax.scatter(x, y, marker=marker, s=60)
            ax.annotate(f"{dataset}: {method}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("MiniLM-L6: accuracy against trainable parameters")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _classification(res: dict, title: str) -> list[str]:
    lines = [
        f"### {title}",
        "",
        "| method | test accuracy | test macro-F1 | dev accuracy | trainable params | share | steps | chosen lr "
        "| trials (stopped early) | wall of the chosen trial (s) | wall of the sweep (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        r = res.get(method)
        if not r:
            continue
        m, p = r["metrics"], r["params"]
        stopped = sum(t["status"] == "stopped early" for t in r["trials"])
        lines.append(
            f"| {method} | {_pct(m.get('test/accuracy'))} | {_pct(m.get('test/macro_f1'))} | "
            f"{_pct(r['dev_final'])} | {r['trainable_params']:,} | {r['trainable_share_pct']:.3f}% | {r['steps']} | "
            f"{p['train.lr']} | {len(r['trials'])} ({stopped}) | {r['wall_s']:.0f} | {r['sweep_wall_s']:.0f} |"
        )
    lines += [
        "",
        "Every trial (dev accuracy at each evaluation; test accuracy for trials that ran to the end):",
        "",
        "| method | lr | status | dev accuracy per evaluation | test accuracy | wall (s) |",
        "|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        for t in (res.get(method) or {}).get("trials", []):
            dev = " → ".join(_pct(v) for v in t["dev"])
            lines.append(
                f"| {method} | {t['params']['train.lr']} | {t['status']} | {dev} | "
                f"{_pct(t['metrics'].get('test/accuracy'))} | {t['wall_s']:.0f} |"
            )
    return lines + [""]


def report(results: dict) -> str:
    """Markdown tables of the results (QUALITY.md's numbers are generated from quality.json)."""
    lines = []
    for dataset, title in (
        ("polarity", "Polarity (Pang & Lee sentences), MiniLM-L6"),
        ("uncertainty", "CoNLL-2010 uncertainty sentences, MiniLM-L6"),
    ):
        if results.get(dataset):
            lines += _classification(results[dataset], title)
    if results.get("wnut16"):
        lines += [
            "### WNUT-16 NER (tweets), MiniLM-L6",
            "",
            "| method | test entity F1 | precision | recall | trainable params | share | wall (s) |",
            "|---|---|---|---|---|---|---|",
        ]
        for method, r in results["wnut16"].items():
            m = r["metrics"]
            lines.append(
                f"| {method} | {_pct(m.get('test/entity_f1'))} | {_pct(m.get('test/entity_precision'))} | "
                f"{_pct(m.get('test/entity_recall'))} | {r['trainable_params']:,} | "
                f"{r['trainable_share_pct']:.3f}% | {r['wall_s']:.0f} |"
            )
        lines.append("")
    if results.get("smollm2"):
        lines += [
            "### SmolLM2-135M-Instruct, chatterbot replies (generation)",
            "",
            "| prompt | test loss (reply tokens) | exact match (greedy) | trainable params | wall (s) |",
            "|---|---|---|---|---|",
        ]
        for method, r in results["smollm2"].items():
            m = r["metrics"]
            lines.append(
                f"| {method} | {m['test/loss']:.3f} | {_pct(m['test/exact_match'])} | "
                f"{r['trainable_params']:,} | {r['wall_s']:.0f} |"
            )
        lines.append("")
    ab = results.get("ablations") or {}
    if ab.get("smollm2-init"):
        lines += [
            "### Ablation: P-Tuning v2 prefix initialisation on SmolLM2 (chatterbot replies, same steps)",
            "",
            "| init | test loss (reply tokens) | exact match (greedy) | wall (s) |",
            "|---|---|---|---|",
        ]
        for name, r in ab["smollm2-init"].items():
            m = r["metrics"]
            lines.append(f"| {name} | {m['test/loss']:.3f} | {_pct(m['test/exact_match'])} | {r['wall_s']:.0f} |")
        lines.append("")
    return "\n".join(lines)
