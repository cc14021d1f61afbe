"""Reports of a pipeline artifact: one self-contained HTML page and its markdown twin.

Runs last (after :func:`graphprune.app.pipeline.run`, or later via ``graphprune report ARTIFACT``)
and reads only files in the artifact: ``summary.json`` (per-layer rows, verify numbers),
``manifest.json`` (kernels chosen, file sizes), ``recipe.json``, ``run.json`` (step times) and,
when ``graphprune bench`` was run, ``bench.json`` (latency). Charts are drawn with matplotlib's
Agg backend and embedded as base64 PNG, so the page has no external resource and no script.

Kernels are listed per TVM PrimFunc (fused kernels have no one-to-one mapping to parameters);
their measured time vs dense is shown when the manifest records it (any ``*time*``, ``*_ms``,
``*_us`` or ``speedup`` field of a kernel entry).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from graphprune.app.atomic import write_text_atomic
from graphprune.ir.errors import ArtifactError

__all__ = ["render", "write_report"]


def _load(art: Path, name: str, required: bool = False) -> Any:
    p = art / name
    if not p.is_file():
        if required:
            raise ArtifactError(f"{art} has no {name}: it was not written by `graphprune run` "
                                f"(a plain `graphprune compile` artifact has no report data)")  # fmt: skip
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{p} is unreadable or truncated: {e}") from e


def _short(name: str, width: int = 34) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _charts(summary: dict, bench: dict | None) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    charts = []
    layers = summary["layers"]

    def bars(title, key_b, key_a, rows, unit):
        rows = [r for r in rows if r.get(key_a) is not None]
        if not rows:
            return
        fig, ax = plt.subplots(figsize=(8, 0.28 * len(rows) + 1.2))
        ys = range(len(rows))
        if key_b:
            ax.barh([y + 0.2 for y in ys], [r.get(key_b, 0) for r in rows], 0.4, label="before",
                    color="#b0b7c3")  # fmt: skip
        ax.barh([y - 0.2 for y in ys] if key_b else ys, [r[key_a] for r in rows],
                0.4 if key_b else 0.6, label="after" if key_b else None, color="#3b6fb6")  # fmt: skip
        ax.set_yticks(list(ys), [_short(r["param"]) for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(unit)
        ax.set_title(title)
        if key_b:
            ax.legend(loc="lower right", fontsize=8)
        charts.append((title, _png(fig)))

    bars("Parameters per layer", "params_before", "params_after", layers, "parameters")
    bars("MACs per layer", "macs_before", "macs_after", layers, "multiply-accumulates")
    bars("Sparsity per layer", None, "sparsity", layers, "fraction of weights zero")
    if summary.get("sensitivity"):
        sens = summary["sensitivity"]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, pts in sens.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=_short(name, 24))
        ax.set_xlabel("ratio")
        ax.set_ylabel("metric")
        ax.set_title("Sensitivity")
        ax.legend(fontsize=6)
        charts.append(("Sensitivity", _png(fig)))
    if bench:
        fig, ax = plt.subplots(figsize=(6, 2.2))
        names = [r["name"] for r in bench["rows"]]
        ax.barh(names, [r["median_ms"] for r in bench["rows"]], color="#3b6fb6")
        ax.invert_yaxis()
        ax.set_xlabel("median latency (ms)")
        ax.set_title("Latency")
        charts.append(("Latency", _png(fig)))
    return charts


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, list):
        return "×".join(map(str, v))
    return str(v)


def _tables(art: Path, summary: dict, manifest: dict, recipe: dict, run: dict | None,
            bench: dict | None) -> list[tuple[str, list[str], list[list[Any]]]]:  # fmt: skip
    t = summary["totals"]
    size = sum((art / f).stat().st_size for f in manifest.get("files", {}) if (art / f).exists())
    totals = [
        ["model", recipe["model"]],
        ["frontend", summary.get("frontend")],
        ["parameters", f"{_fmt(t.get('params_before'))} → {_fmt(t.get('params_after'))}"],
        ["MACs", f"{_fmt(t.get('macs_before'))} → {_fmt(t.get('macs_after'))}"],
        ["sparsified fraction", _fmt(t.get("sparsified_fraction"))],
        ["artifact size (model.so + weights)", f"{size / 1e6:.2f} MB"],
        ["target", " ".join(str(manifest.get("target", {}).get(k, "")) for k in ("kind", "mcpu"))],
    ]
    if bench:
        for r in bench["rows"]:
            totals.append([f"latency: {r['name']}", f"{r['median_ms']:.3f} ms (median of "
                                                     f"{r['runs']})"])  # fmt: skip
    if run:
        totals.append(["step times", ", ".join(f"{k} {v:.1f}s" for k, v in
                                                run.get("timings_s", {}).items())])  # fmt: skip
    out = [("Totals", ["", ""], totals)]
    v = summary["verify"]
    vrows = []
    for label, key in (("artifact vs compiled model", "vs_compiled_model"),
                       ("artifact vs source model", "vs_source_model")):  # fmt: skip
        for r in v.get(key, []):
            vrows.append([label, r["output"], _fmt(r["shape"]), _fmt(r.get("max_abs_diff")),
                          _fmt(r.get("rel_l2")), _fmt(r.get("top1_agreement")),
                          r.get("error", "")])  # fmt: skip
    out.append((f"Verify (atol {v['atol']:g}, rtol {v['rtol']:g}: "
                f"{'passed' if v.get('passed') else 'FAILED'})",
                ["comparison", "output", "shape", "max |diff|", "rel. L2", "top-1 agree", ""],
                vrows))  # fmt: skip
    lrows = [
        [r["param"], _fmt(r.get("shape_before")), _fmt(r.get("shape_after")),
         f"{_fmt(r.get('channels_before'))} → {_fmt(r.get('channels_after'))}",
         f"{_fmt(r.get('params_before'))} → {_fmt(r.get('params_after'))}",
         f"{_fmt(r.get('macs_before'))} → {_fmt(r.get('macs_after'))}",
         _fmt(r.get("sparsity")), r.get("pattern") or r.get("sparsity_note", "dense")]
        for r in summary["layers"]
    ]  # fmt: skip
    out.append(("Layers", ["parameter", "shape before", "shape after", "channels", "params",
                           "MACs", "sparsity", "pattern"], lrows))  # fmt: skip
    kernels = summary.get("kernels") or manifest.get("kernels", {})
    timed = sorted({k for e in kernels.values() for k, x in e.items()
                    if isinstance(x, (int, float)) and ("time" in k or k.endswith(("_ms", "_us"))
                                                        or k == "speedup")})  # fmt: skip
    krows = [[name, e.get("rule"), e.get("sparsity", "dense")] + [_fmt(e.get(k)) for k in timed]
             for name, e in sorted(kernels.items())]  # fmt: skip
    out.append(("Kernels chosen", ["PrimFunc", "rule", "sparsity"] + timed, krows))
    return out


def render(artifact: str | Path) -> tuple[str, str]:
    """``(html, markdown)`` for an artifact written by ``graphprune run``.

    Examples
    --------
    >>> html, md = render("build/demo")      # doctest: +SKIP
    """
    art = Path(artifact)
    if not art.is_dir():
        raise ArtifactError(f"artifact directory {art} not found")
    summary = _load(art, "summary.json", required=True)
    manifest = _load(art, "manifest.json", required=True)
    recipe = _load(art, "recipe.json") or {"model": summary.get("model")}
    run, bench = _load(art, "run.json"), _load(art, "bench.json")
    tables = _tables(art, summary, manifest, recipe, run, bench)
    charts = _charts(summary, bench)
    title = f"graphprune report: {recipe['model'].rsplit('/', 1)[-1]}"
    return _html(title, tables, charts), _markdown(title, tables, charts)


def _html(title: str, tables, charts) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<link rel="icon" href="data:,">',  # no favicon request (a console error in a browser)
        f"<title>{e(title)}</title>",
        "<style>body{font:14px/1.4 system-ui,sans-serif;margin:2em;max-width:70em;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;"
        "padding:2px 8px;text-align:left;font-size:12px}th{background:#eef}"
        "img{max-width:100%;display:block;margin:0.5em 0 1.5em}</style>",
        f"</head><body><h1>{e(title)}</h1>",
    ]
    for name, header, rows in tables:
        parts.append(f"<h2>{e(name)}</h2><table>")
        if any(header):
            parts.append("<tr>" + "".join(f"<th>{e(str(h))}</th>" for h in header) + "</tr>")
        for r in rows:
            parts.append("<tr>" + "".join(f"<td>{e(_fmt(c))}</td>" for c in r) + "</tr>")
        parts.append("</table>")
        if name == "Totals" and charts:
            parts.append("<h2>Charts</h2>")
            for ctitle, b64 in charts:
                parts.append(f'<img class="chart" alt="{e(ctitle)}" '
                             f'src="data:image/png;base64,{b64}">')  # fmt: skip
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _markdown(title: str, tables, charts) -> str:
    def cell(c):
        return _fmt(c).replace("|", "\\|")

    out = [f"# {title}", ""]
    for name, header, rows in tables:
        out += [f"## {name}", ""]
        hdr = header if any(header) else ["", ""]
        out.append("| " + " | ".join(map(str, hdr)) + " |")
        out.append("|" + "---|" * len(hdr))
        out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
        out.append("")
    if charts:
        out.append("Charts (" + ", ".join(t for t, _ in charts) + ") are in report.html.")
    return "\n".join(out) + "\n"


def write_report(artifact: str | Path, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` for ``artifact`` (into it unless ``out_dir``)."""
    art = Path(artifact)
    page, md = render(art)
    dest = Path(out_dir) if out_dir is not None else art
    dest.mkdir(parents=True, exist_ok=True)
    paths = dest / "report.html", dest / "report.md"
    for p, text in zip(paths, (page, md)):
        write_text_atomic(p, text)
    return paths
