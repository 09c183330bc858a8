"""The benchmark table as a bar chart: cupy_roi / torchvision per case and pass,
one bar per dtype, a line at 1.0 (below it cupy_roi is faster).

Reads the first ``bench.py`` table (columns ``case | dtype | pass | torchvision |
cupy_roi | cupy_roi / torchvision ...``) in a Markdown file: by default
``benchmarks/results_h100.md``, the newest results.

    python benchmarks/plot.py [--table FILE] [--column eager|graph] [--out docs/bench.png]
"""
import argparse
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
HEADER = re.compile(r"^\|\s*case\s*\|\s*dtype\s*\|\s*pass\s*\|\s*torchvision\s*\|")


def read_table(path):
    """(title line, rows) of the first bench.py table in ``path``; a row is
    (case, dtype, pass, eager ratio, graph ratio or None)."""
    lines = Path(path).read_text().splitlines()
    for start in (i for i, line in enumerate(lines) if HEADER.match(line)):
        title = next((line for line in reversed(lines[:start]) if line.startswith("GPU:")), "")
        rows = []
        for line in lines[start + 2:]:
            if not line.startswith("|"):
                break
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            graph = float(cells[8]) if len(cells) > 8 and cells[8] not in ("", "nan") else None
            rows.append((cells[0], cells[1].split(" ")[0], cells[2], float(cells[5]), graph))
        if rows:
            return title, rows
    raise SystemExit(f"{path}: no bench.py table (a '| case | dtype | pass | torchvision |' header and rows)")


def plot(title, rows, column, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = []
    for case, dtype, label, eager, graph in rows:
        key = f"{case.replace('(anchor: roi_align)', '(vs roi_align)')}: {label.replace(' (roi_align fwd+bwd)', '')}"
        if key not in [g[0] for g in groups]:
            groups.append((key, {}))
        value = eager if column == "eager" else graph
        dict(groups)[key][dtype] = value
    dtypes = ["float32", "float16", "bfloat16"]
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(groups) + 1.6))
    height = 0.8 / len(dtypes)
    for d, dtype in enumerate(dtypes):
        ys = [len(groups) - 1 - g + (1 - d) * height for g in range(len(groups))]
        vals = [groups[g][1].get(dtype) for g in range(len(groups))]
        ax.barh([y for y, v in zip(ys, vals) if v is not None], [v for v in vals if v is not None], height,
                label=dtype + (" (torchvision: float16)" if dtype == "bfloat16" else ""))
    ax.axvline(1.0, color="black", lw=1)
    ax.set_yticks(range(len(groups)))
    ax.set_yticklabels([g[0] for g in reversed(groups)], fontsize=8)
    ax.set_xlabel(f"cupy_roi / torchvision, {'eager' if column == 'eager' else 'CUDA-graph replay'} "
                  "(below 1: cupy_roi faster)")
    ax.set_title(title.split(";")[0].replace("GPU: ", "") + ": cupy_roi vs torchvision.ops", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--table", default=str(HERE / "results_h100.md"))
    parser.add_argument("--column", choices=("eager", "graph"), default="eager")
    parser.add_argument("--out", default=str(HERE.parent / "docs" / "bench.png"))
    args = parser.parse_args()
    title, rows = read_table(args.table)
    print(f"{len(rows)} rows from {args.table} -> {plot(title, rows, args.column, args.out)}")


if __name__ == "__main__":
    main()
