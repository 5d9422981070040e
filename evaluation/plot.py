"""Accuracy against problem length, for one evaluation or several overlaid (the paper's figure).

    python evaluation/plot.py results/add_baseline results/add_scratchpad results/add_rt -o addition.png

Each argument is a results directory (holding ``results.json``) or a results.json file. Lines are
labelled by method (``--labels`` overrides); the lengths each model was trained on are shaded.
``--pool`` draws one line per task and method instead, the accuracy pooled over the runs given
(seeds, say) with the lowest and highest run shaded around it:

    python evaluation/plot.py --pool results/addition{,_small_tiny_seed*}/retuning results/addition/baseline -o seeds.png
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

METHOD_NAMES = {"baseline": "Baseline", "scratchpad": "Scratchpad", "retuning": "Re-Tuning"}


def load_results(path: str | os.PathLike) -> dict:
    """A results dict from a results directory or a results.json file."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise SystemExit(f"error: {path}: no results.json there")
    try:
        with open(file) as handle:
            results = json.load(handle)
    except json.JSONDecodeError as error:
        raise SystemExit(f"error: {file}: not valid JSON ({error})")
    if not isinstance(results, dict) or "lengths" not in results:
        raise SystemExit(f"error: {file}: not a results.json (no 'lengths' field)")
    return results


def pooled_by_method(all_results: list[dict]) -> list[dict]:
    """One results dict per (task, method), in order of first appearance: at each length the
    problems of every run pooled (``correct`` and ``problems`` summed), and the lowest and highest
    run's accuracy as ``low`` and ``high``; ``runs`` counts the runs pooled."""
    groups: dict[tuple, list[dict]] = {}
    for results in all_results:
        groups.setdefault((results.get("task"), results.get("method")), []).append(results)
    pooled = []
    for (task, method), runs in groups.items():
        lengths = {}
        for n in sorted({n for run in runs for n in run["lengths"]}, key=int):
            rows = [run["lengths"][n] for run in runs if n in run["lengths"]]
            correct, problems = sum(r["correct"] for r in rows), sum(r["problems"] for r in rows)
            lengths[n] = {"correct": correct, "problems": problems, "accuracy": correct / problems,
                          "low": min(r["accuracy"] for r in rows), "high": max(r["accuracy"] for r in rows)}
        pooled.append({"task": task, "method": method, "runs": len(runs), "lengths": lengths,
                       "settings": runs[0].get("settings", {})})
    return pooled


def _trained_span(results: dict) -> tuple[int, int] | None:
    lengths = results.get("settings", {}).get("train_lengths")
    return (min(lengths), max(lengths)) if lengths else None


def plot_accuracy(all_results: list[dict], out_path: str | os.PathLike, labels: list[str] | None = None,
                  title: str | None = None) -> None:
    """Accuracy (%) against problem length, one line per results dict, written to ``out_path``
    (atomically); the trained length range of each run is shaded."""
    figure, axes = plt.subplots(figsize=(7, 4.2))
    shaded = set()
    for index, results in enumerate(all_results):
        span = _trained_span(results)
        if span and span not in shaded:
            axes.axvspan(span[0] - 0.5, span[1] + 0.5, color="0.85", zorder=0,
                         label="trained lengths" if not shaded else None)
            shaded.add(span)
    # Each line its own marker and dash, so that methods with the same scores (0% past the
    # trained lengths, say) stay visible on top of one another.
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-.")]
    for index, results in enumerate(all_results):
        lengths = sorted(results["lengths"], key=int)
        label = labels[index] if labels else METHOD_NAMES.get(results.get("method"), results.get("method"))
        pooled = results.get("runs", 1) > 1
        if pooled:
            label = f"{label} ({results['runs']} runs)"
        marker, dash = styles[index % len(styles)]
        xs, rows = [int(n) for n in lengths], [results["lengths"][n] for n in lengths]
        line, = axes.plot(xs, [100 * row["accuracy"] for row in rows],
                          marker=marker, markersize=4, linestyle=dash, fillstyle="none", label=label)
        if pooled:  # the lowest and highest of the runs around the line
            axes.fill_between(xs, [100 * row["low"] for row in rows], [100 * row["high"] for row in rows],
                              color=line.get_color(), alpha=0.15, linewidth=0)
    first = all_results[0]
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # lengths are whole numbers
    axes.set_xlabel(first.get("settings", {}).get("length_label") or "problem length")
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(-3, 103)
    axes.set_title(title or f"{first.get('task', '')}: accuracy by problem length")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    out_path = Path(out_path)
    temporary = out_path.with_name(out_path.name + ".tmp")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(temporary, dpi=120, format=out_path.suffix.lstrip(".") or "png")
        os.replace(temporary, out_path)
    finally:
        plt.close(figure)
        temporary.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="results directories or results.json files")
    parser.add_argument("-o", "--out", required=True, help="the image to write, e.g. addition.png")
    parser.add_argument("--labels", nargs="+", help="one legend label per results (default: method)")
    parser.add_argument("--title")
    parser.add_argument("--pool", action="store_true",
                        help="one line per task and method: the runs given pooled, lowest to highest shaded")
    args = parser.parse_args(argv)
    all_results = [load_results(path) for path in args.results]
    if args.pool:
        all_results = pooled_by_method(all_results)
    if args.labels and len(args.labels) != len(all_results):
        parser.error(f"--labels has {len(args.labels)} labels for {len(all_results)} lines")
    tasks = {results.get("task") for results in all_results}
    if len(tasks) > 1:
        print(f"warning: overlaying different tasks: {', '.join(sorted(map(str, tasks)))}", file=sys.stderr)
    try:
        plot_accuracy(all_results, args.out, args.labels, args.title)
    except (OSError, ValueError) as error:  # an unwritable folder, or a suffix matplotlib cannot write
        parser.error(f"-o {args.out}: cannot write the image ({getattr(error, 'strerror', None) or error})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
