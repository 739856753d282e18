"""Pictures logged with a run: a step's loss curve and the pipeline's DAG (matplotlib, no display)."""
from __future__ import annotations

import json
from pathlib import Path

STATUS_COLOURS = {"ran": "#9fd49f", "cached": "#d9d9d9", "failed": "#f08c8c"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curve(history_path: Path, title: str, png: Path) -> bool:
    """Training and validation loss from a step's train_log.jsonl; False when there is no log."""
    if not history_path.exists():
        return False
    plt = _pyplot()
    rows = [json.loads(line) for line in history_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 4))
    trained = [r for r in rows if "loss" in r]  # a window of only skipped steps has no loss
    ax.plot([r["step"] for r in trained], [r["loss"] for r in trained], label="train loss")
    val = [r for r in rows if "val_loss" in r]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set(xlabel="optimizer step", ylabel="loss (nats/token)", title=title)
    ax.legend()
    fig.savefig(png, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return True


def depths(deps: dict[str, list[str]]) -> dict[str, int]:
    """Each step's column: the length of the longest chain of upstream steps before it."""
    found: dict[str, int] = {}

    def depth(name: str) -> int:
        if name not in found:
            found[name] = 1 + max((depth(d) for d in deps[name] if d in deps), default=-1)
        return found[name]

    for name in deps:
        depth(name)
    return found


def dag_picture(steps: list[dict], png: Path) -> None:
    """Boxes for the steps (name, status, seconds) in columns by depth, arrows from their inputs.
    `steps`: dicts with name, deps, status and seconds, in plan order."""
    plt = _pyplot()
    deps = {s["name"]: list(s["deps"]) for s in steps}
    column = depths(deps)
    rows: dict[int, int] = {}
    where = {}
    for s in steps:
        rows[column[s["name"]]] = rows.get(column[s["name"]], 0) + 1
        where[s["name"]] = (column[s["name"]] * 3.0, -(rows[column[s["name"]]] - 1) * 1.4)
    fig, ax = plt.subplots(figsize=(3 + 2.6 * max(column.values(), default=0), 1.5 + 1.2 * max(rows.values())))
    for s in steps:
        for dep in deps[s["name"]]:
            if dep in where:  # an edge that skips a column bends, so it does not hide behind others
                bend = 0.25 if column[s["name"]] - column[dep] > 1 else 0.0
                ax.annotate("", xy=where[s["name"]], xytext=where[dep],
                            arrowprops=dict(arrowstyle="->", color="#555555", shrinkA=38, shrinkB=38,
                                            connectionstyle=f"arc3,rad={bend}"))
    for s in steps:
        x, y = where[s["name"]]
        ax.text(x, y, f"{s['name']}\n{s['status']}, {s['seconds']:.0f} s", ha="center", va="center", fontsize=9,
                bbox=dict(boxstyle="round,pad=0.5", facecolor=STATUS_COLOURS.get(s["status"], "white")))
    xs = [p[0] for p in where.values()] or [0]
    ys = [p[1] for p in where.values()] or [0]
    ax.set_xlim(min(xs) - 1.5, max(xs) + 1.5)
    ax.set_ylim(min(ys) - 1, max(ys) + 1)
    ax.axis("off")
    fig.savefig(png, dpi=100, bbox_inches="tight")
    plt.close(fig)
