"""The summary of ``bench/independent_quality.py``'s loss table: each setting's mean, the
APE knobs chosen on the dev targets and reported on the test ones, and the defaults the
results support (``positions.DEFAULT_INDEPENDENT``)."""

from __future__ import annotations

import json
from pathlib import Path


def mean_over(results: list[dict], key: str) -> float:
    return round(sum(r["losses"][key] for r in results) / len(results), 4)


def summarize(table: dict, grid) -> dict:
    def m(k, split="all"):
        return table[k][split]

    out = {"none": m("none"), "prefix_all": m("prefix/all"), "prefix_top25": m("prefix/top25%")}
    for tag in ("fit", "long"):
        for label in ("all", "top25%", "top12.5%"):
            out[f"{tag}_independent_{label}"] = m(f"{tag}/independent/{label}")
            out[f"{tag}_independent_request_bos_{label}"] = m(
                f"{tag}/independent+request_bos/{label}"
            )
            out[f"{tag}_independent_chunk_sink_{label}"] = m(
                f"{tag}/independent+chunk_sink/{label}"
            )
    # APE knobs: chosen on dev (mean over fit+long, all settings), reported on test
    best, best_dev = None, None
    for t, b in [(1.0, 0.0)] + list(grid):

        def key(tag, label, t=t, b=b):
            if (t, b) == (1.0, 0.0):
                return f"{tag}/independent+chunk_sink/{label}"
            return f"{tag}/independent+chunk_sink+ape(T={t},logS={b})/{label}"

        keys = [key(tag, lab) for tag in ("fit", "long") for lab in ("all", "top25%", "top12.5%")]
        dev = sum(m(k, "dev") for k in keys) / len(keys)
        test = sum(m(k, "test") for k in keys) / len(keys)
        out[f"ape_T={t}_logS={b}_dev_mean"] = round(dev, 4)
        out[f"ape_T={t}_logS={b}_test_mean"] = round(test, 4)
        if best_dev is None or dev < best_dev:
            best, best_dev = (t, b), dev
    out["ape_best_on_dev"] = {"temperature": best[0], "log_scale": best[1]}
    # The defaults (positions.DEFAULT_INDEPENDENT): a fix is on when it lowers the test mean
    # over the independent settings (fit and long; all, 25 %, 12.5 % of the chunks).
    settings = [(t, lab) for t in ("fit", "long") for lab in ("all", "top25%", "top12.5%")]

    def test_mean(variant):
        return sum(m(f"{t}/{variant}/{lab}", "test") for t, lab in settings) / len(settings)

    plain, sink = test_mean("independent"), test_mean("independent+chunk_sink")
    ape_test = out[f"ape_T={best[0]}_logS={best[1]}_test_mean"]
    out["independent_test_mean"] = round(plain, 4)
    out["chunk_sink_test_mean"] = round(sink, 4)
    out["defaults"] = {
        "chunk_sink": sink < plain,
        "temperature": best[0] if ape_test < round(sink, 4) else 1.0,
        "log_scale": best[1] if ape_test < round(sink, 4) else 0.0,
        "why": f"chunk_sink test mean {sink:.4f} vs {plain:.4f} without; APE chosen on dev "
        f"(T={best[0]}, log S={best[1]}) test mean {ape_test:.4f} vs {sink:.4f} without",
    }
    return out


def resummarize(path: str) -> None:
    """Recompute the ``summary`` of a result file from its ``mean_loss`` table (the same
    function a run applies), e.g. after the summary's rules changed."""
    result = json.loads(Path(path).read_text())
    table = result["mean_loss"]
    grid = sorted(
        {
            tuple(float(x.split("=")[1]) for x in k.split("ape(")[1].split(")")[0].split(","))
            for k in table
            if "ape(" in k
        }
    )
    result["summary"] = summarize(table, grid)
    Path(path).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))
