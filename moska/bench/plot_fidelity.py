"""The fidelity benchmark's plot: per setting (signal, package, mode, chunk size), accuracy
(retrieval) or the share of the library's loss gain kept (code, `recovered`) against the
fraction of chunks kept, one line per routing policy, with the issue's targets drawn in.

    python -m moska.bench.plot_fidelity bench/results/fidelity_retrieval_h200_bfloat16_triton.json \
        --out bench/results/fidelity_retrieval_h200.png

Reads only the JSON's `summary` (`moska.bench.fidelity`: summary[signal][policy][fraction]
[setting]; a `--combine` file's summary has no signal level: code); several files are drawn side by side, a panel per (file, signal, setting).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# the routing issue's targets per signal: retrieval, the share of dense accuracy kept at
# 12.5% and 25% of chunks; code, the share of the library's loss gain kept at 25%
TARGETS = {"retrieval": {0.125: 0.90, 0.25: 0.95}, "code": {0.25: 0.90}}


def panels(summary: dict) -> dict[tuple[str, str], dict[str, list[tuple[float, float]]]]:
    """(signal, setting) -> policy -> sorted (fraction, value) points; 'all' settings and
    the all-chunks row (fraction 1.0) are left out (all-chunks is the 1.0 line)."""
    out: dict[tuple[str, str], dict[str, list[tuple[float, float]]]] = {}
    if not {"code", "retrieval"} & set(summary):  # a --combine file: the code signal alone
        summary = {"code": summary}
    for signal, by_policy in summary.items():
        if not isinstance(by_policy, dict):
            continue  # a refused signal keeps its reason here
        for policy, by_fraction in by_policy.items():
            if policy == "all_chunks" or not isinstance(by_fraction, dict):
                continue
            for fraction, by_setting in by_fraction.items():
                for setting, value in by_setting.items():
                    if setting == "all" or value is None:
                        continue
                    pts = out.setdefault((signal, setting), {}).setdefault(policy, [])
                    pts.append((float(fraction), float(value)))
    for lines in out.values():
        for pts in lines.values():
            pts.sort()
    return out


def plot(paths: list[str], out: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    for path in paths:
        summary = json.loads(Path(path).read_text()).get("summary", {})
        figs += [(Path(path).stem, key, lines) for key, lines in panels(summary).items()]
    if not figs:
        raise SystemExit(f"no routed results in {paths}")
    names = sorted({policy for _, _, lines in figs for policy in lines})
    color = {n: plt.get_cmap("tab20")(i % 20) for i, n in enumerate(names)}
    cols = min(3, len(figs))
    rows = -(-len(figs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.4 * rows + 0.8), squeeze=False)
    for ax in axes.flat[len(figs) :]:
        ax.set_visible(False)
    for ax, (stem, (signal, setting), lines) in zip(axes.flat, figs, strict=False):
        for policy, pts in sorted(lines.items()):
            xs, ys = zip(*pts, strict=True)
            wide = policy == "default"
            ax.plot(xs, ys, marker="o", color=color[policy], lw=2.4 if wide else 1.0)
        ax.axhline(1.0, color="grey", ls=":", lw=1)
        for x, y in TARGETS[signal].items():
            ax.plot([x], [y], marker="_", color="red", ms=14, mew=2)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("fraction of chunks kept")
        ax.set_ylabel("accuracy / dense" if signal == "retrieval" else "loss gain kept")
        ax.set_title(f"{setting} ({stem})", fontsize=8)
        ax.set_ylim(0, 1.1)
    handles = [plt.Line2D([], [], color=color[n], marker="o", lw=2.4 if n == "default" else 1)
               for n in names]  # fmt: skip
    handles.append(plt.Line2D([], [], color="red", marker="_", ls="", ms=14, mew=2))
    fig.legend(handles, [*names, "target"], loc="lower center", ncol=min(6, len(names) + 1),
               fontsize=7)  # fmt: skip
    fig.tight_layout(rect=(0, 0.9 / (3.4 * rows + 0.8) + 0.05, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="fidelity JSONs")
    ap.add_argument("--out", required=True, help="the PNG to write")
    args = ap.parse_args(argv)
    print(f"wrote {plot(args.paths, args.out)}")


if __name__ == "__main__":
    main()
