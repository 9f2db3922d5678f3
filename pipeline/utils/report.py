"""The offline report: one self-contained HTML file with what the pipeline produced.

``dvc plots show`` writes HTML that loads its chart library (Vega) from a CDN, so it is blank
offline. :func:`write_report` reads only files (``data/metrics/*.json``,
``data/reports/*.json``, ``data/plots/``, the CViT training logs) and writes one HTML file
with no external reference of any kind: tables as HTML, curves drawn with matplotlib and every
picture inlined as a ``data:image/png;base64`` URI, no script, no stylesheet link, no font.
Whatever has not been produced yet is shown as "not produced"; nothing here raises on a
missing or unreadable artifact.

Sections: the collapse order against its baselines (``data/reports/orders.json``,
``baselines`` -> split -> ``table``), the headline figures of every stage, the training
curves, the collapse-order pictures (Fig. 4/5), Fig. 8 and the CMAR sample grid, then the full
records of ``data/reports/`` folded away.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable

from pipeline.utils.io import atomic_write_text

# Stages in pipeline order: (metrics file stem, title). Other metrics files follow, sorted.
STAGE_METRICS = (
    ("prepare", "prepare: the image set"),
    ("extract_latents", "extract_latents: the latent store"),
    ("comae", "train_comae: CoMAE"),
    ("comae_probe", "probe_comae: copy-mechanism probe"),
    ("orders", "export_orders: collapse orders (val)"),
    ("judge", "train_judge: the judge (val accuracy, raw and as the tokenizer renders them)"),
    ("pretrain_vit", "pretrain_vit: the ViT every CViT variant starts from"),
    ("cvit_train_*", "train_cvit@"),  # one per variant and seed: every file the pattern finds
    ("cvit", "eval_cvit: accuracy vs patches dropped (Tab. 5)"),
    ("pretrain_mar", "pretrain_mar: MAR in random order on the pretrain pool"),
    ("cmar_train_cmar", "train_cmar@cmar (collapse order)"),
    ("cmar_train_mar", "train_cmar@mar (random order, the baseline)"),
    ("cmar_train_cmar_asc", "train_cmar@cmar_asc (ascending collapse order)"),
    ("cmar", "eval_cmar: CMAR samples"),
)
ORDER_ROWS = ("collapse", "random", "fixed", "centre", "pixel_variance", "token_saliency")
ORDER_COLS = (("auc", "object AUC"), ("auc_ci", "± 95% CI"), ("top10", "top 10%"),
              ("top25", "top 25%"), ("top50", "top 50%"), ("pos_auc", "position-stratified AUC"))
# (title, csv path relative to data/, x column, y columns)
CURVES = (
    ("CoMAE losses", "plots/comae_train.csv", "step", ("L_r", "L_c", "H_mask")),
    ("CoMAE temperature and mean selection weight", "plots/comae_train.csv", "step",
     ("tau", "w_mean")),
    ("CoMAE selection weights on val (histogram of w)", "plots/comae_w_hist.csv", "w", ("share",)),
    ("ViT pretraining (judge-distilled): val top-1", "plots/pretrain_vit_val.csv", "step",
     ("val_top1",)),
    ("CViT training loss", None, "step", ("loss",)),  # one line per run, see _cvit_logs
    ("Judge training loss and accuracy", "plots/judge_train.csv", "step", ("loss", "acc")),
    ("MAR pretraining loss (random order)", "plots/pretrain_mar_train.csv", "step", ("loss",)),
    ("CViT top-1 (%) vs mask ratio (mean over seeds)", "plots/cvit_accuracy.csv", "mask_ratio",
     ("ViT", "ViT+C", "RViT", "CViT", "CViT-fixed", "CViT-centre", "CViT-pixvar", "CViT-other")),
)
MIN_SHOWN_PX = 384  # a smaller picture (a tiny profile's sample grid) is shown scaled up
MAX_RECORD_CHARS = 60_000  # a full record longer than this is cut in the folded section

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f;
       max-width: 1100px; margin: 24px auto; padding: 0 16px; }
h1 { font-size: 24px; margin-bottom: 4px; } h2 { font-size: 19px; margin-top: 32px;
  border-bottom: 1px solid #ccc; padding-bottom: 4px; } h3 { font-size: 15px; margin: 18px 0 6px; }
p.note, .missing { color: #666; } .missing { font-style: italic; }
table { border-collapse: collapse; margin: 6px 0 12px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d0d0; padding: 3px 9px; text-align: right; }
th { background: #f2f2f2; } td.k, th.k { text-align: left; font-family: ui-monospace, monospace; }
tr.hl td { background: #fff4d6; font-weight: 600; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
.grid figure { margin: 0; } figcaption { font-size: 12px; color: #555; max-width: 420px; }
img { max-width: 100%; border: 1px solid #ddd; }
.metrics { display: flex; flex-wrap: wrap; gap: 0 24px; align-items: flex-start; }
details pre { font-size: 12px; background: #f7f7f7; padding: 8px; overflow-x: auto; }
nav a { margin-right: 12px; }
"""


# ------------------------------------------------------------------------------ reading

def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_csv(path: Path) -> list[dict[str, str]] | None:
    try:
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return None


def _column(rows: list[dict[str, str]], name: str) -> list[float]:
    out = []
    for r in rows:
        try:
            out.append(float(r.get(name) or "nan"))
        except ValueError:
            out.append(float("nan"))
    return out


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b": value}``; lists stay values."""
    if not isinstance(d, dict):
        return {prefix or "value": d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


# ----------------------------------------------------------------------------- HTML bits

def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def fmt(v: Any) -> str:
    """A value for a table cell: 4 significant digits, integers whole, lists inline."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.1f}"
    if isinstance(v, (list, tuple)):
        inner = ", ".join(fmt(x) for x in v[:8])
        return f"[{inner}{', …' if len(v) > 8 else ''}]"
    return str(v)


def _missing(what: str) -> str:
    return f'<p class="missing">{_e(what)}: not produced</p>'


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _png_width(data: bytes) -> int | None:
    """A PNG's width from its IHDR chunk."""
    return int.from_bytes(data[16:20], "big") if data[12:16] == b"IHDR" else None


def _img(data: bytes, alt: str, caption: str | None = None, width: int | None = None) -> str:
    natural = _png_width(data)
    if width is None and natural and natural < MIN_SHOWN_PX:  # small grids: scale up, crisp
        width = natural * -(-MIN_SHOWN_PX // natural)
    if width and natural and width > natural:
        w = f' width="{width}" style="image-rendering: pixelated"'
    else:
        w = f' width="{width}"' if width else ""
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{_png_uri(data)}" alt="{_e(alt)}"{w}>{cap}</figure>'


def _png_file(path: Path, caption: str | None = None, width: int | None = None) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return _missing(str(path))
    if not data.startswith(b"\x89PNG"):
        return _missing(f"{path} (not a PNG)")
    return _img(data, path.name, caption, width)


def kv_table(d: dict[str, Any]) -> str:
    rows = "".join(f'<tr><td class="k">{_e(k)}</td><td>{_e(fmt(v))}</td></tr>'
                   for k, v in flatten(d).items())
    return f'<table><tr><th class="k">figure</th><th>value</th></tr>{rows}</table>'


# ---------------------------------------------------------------------------- sections

def orders_section(data_dir: Path) -> str:
    """The collapse order against its five baselines, per split (val first)."""
    out = ['<h2 id="orders">Collapse order vs baselines</h2>',
           '<p class="note">Does the collapse order rank object patches first? Object AUC: ROC '
           'AUC of each order\'s patch scores against the ground-truth object mask (0.5 = '
           'chance); top k%: share of object patches among the first k% of the order; '
           'position-stratified AUC: the same AUC within each grid position, so a fixed '
           'position prior scores 0.5. From <code>data/reports/orders.json</code>.</p>']
    report = _read_json(data_dir / "reports" / "orders.json")
    baselines = report.get("baselines") if isinstance(report, dict) else None
    if not isinstance(baselines, dict) or not baselines:
        return "".join(out) + _missing("data/reports/orders.json (baselines)")
    splits = sorted(baselines, key=lambda s: (s != "val", s))
    for split in splits:
        rep = baselines[split]
        if not isinstance(rep, dict) or not isinstance(rep.get("table"), dict):
            out.append(f"<h3>{_e(split)}</h3>" + _missing(f"baseline table of {split} "
                                                           "(no object masks?)"))
            continue
        table = rep["table"]
        head = "".join(f"<th>{_e(label)}</th>" for _, label in ORDER_COLS)
        names = [n for n in ORDER_ROWS if n in table] + [n for n in table if n not in ORDER_ROWS]
        body = ""
        for name in names:
            row = table[name] if isinstance(table[name], dict) else {}
            cells = "".join(f"<td>{_e(fmt(row.get(k)))}</td>" for k, _ in ORDER_COLS)
            cls = ' class="hl"' if name == "collapse" else ""
            body += f'<tr{cls}><td class="k">{_e(name)}</td>{cells}</tr>'
        info = []
        if "images" in rep:
            info.append(f"{fmt(rep['images'])} images")
        if isinstance(rep.get("area_share"), (int, float)):
            info.append(f"object area {rep['area_share']:.1%}")
        if "specificity_tau" in rep:
            info.append(f"mean Kendall τ to the fixed order {fmt(rep['specificity_tau'])} "
                        "(1 = the collapse order is a position prior)")
        out.append(f"<h3>{_e(split)}" + (f" — {_e('; '.join(info))}" if info else "") + "</h3>")
        out.append(f'<table class="orders"><tr><th class="k">order</th>{head}</tr>{body}</table>')
    return "".join(out)


def metrics_section(data_dir: Path) -> str:
    out = ['<h2 id="metrics">Headline figures of every stage</h2>',
           '<p class="note">The declared DVC metrics (<code>data/metrics/*.json</code>, what '
           '<code>dvc metrics show</code> prints).</p><div class="metrics">']
    mdir = data_dir / "metrics"
    entries = []
    for stem, title in STAGE_METRICS:
        if "*" in stem:  # a family of runs (train_cvit: variant x seed), each under its name
            entries += [(p.stem, title + p.stem[len(stem) - 1:])
                        for p in sorted(mdir.glob(f"{stem}.json"))] if mdir.is_dir() else []
        else:
            entries.append((stem, title))
    known = {s for s, _ in entries}
    extra = sorted(p.stem for p in mdir.glob("*.json") if p.stem not in known) \
        if mdir.is_dir() else []
    for stem, title in [*entries, *((s, s) for s in extra)]:
        path = mdir / f"{stem}.json"
        d = _read_json(path)
        body = kv_table(d) if isinstance(d, dict) else _missing(f"data/metrics/{stem}.json")
        out.append(f"<div><h3>{_e(title)}</h3>{body}</div>")
    return "".join(out) + "</div>"


def _figure(title: str, series: Iterable[tuple[str, list[float], list[float]]], xlabel: str
            ) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.2), dpi=100)
    for label, x, y in series:
        ax.plot(x, y, label=label, marker="o" if len(x) <= 20 else None, markersize=3)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _cvit_logs(data_dir: Path) -> dict[str, list[dict[str, str]]]:
    """The training log of every train_cvit run (data/cvit/<variant>_s<seed>), by run name."""
    logs = {}
    for path in sorted((data_dir / "cvit").glob("*/train_log.csv")):
        rows = _read_csv(path)
        if rows:
            logs[path.parent.name] = rows
    return logs


def curves_section(data_dir: Path) -> str:
    out = ['<h2 id="curves">Training curves</h2><div class="grid">']
    missing = []
    for title, rel, x, ys in CURVES:
        if rel is None:  # CViT: one line per variant
            logs = _cvit_logs(data_dir)
            series = [(v, _column(r, x), _column(r, ys[0])) for v, r in logs.items()
                      if x in r[0] and ys[0] in r[0]]
            source = "data/cvit/<variant>_s<seed>/train_log.csv"
        else:
            rows = _read_csv(data_dir / rel)
            series = [(y, _column(rows, x), _column(rows, y)) for y in ys
                      if rows and x in rows[0] and y in rows[0]]
            source = f"data/{rel}"
        if not series:
            missing.append(_missing(f"{title} ({source})"))
            continue
        try:
            png = _figure(title, series, x)
        except Exception as err:  # a figure that cannot be drawn must not cost the report
            missing.append(_missing(f"{title} ({source}; {type(err).__name__}: {err})"))
            continue
        out.append(_img(png, title, source))
    return "".join(out) + "</div>" + "".join(missing)


def pictures_section(data_dir: Path) -> str:
    plots = data_dir / "plots"
    out = ['<h2 id="orders-pictures">Collapse orders (Fig. 4/5)</h2>',
           '<p class="note">From <code>data/plots/orders/</code>: per image the patches in '
           'collapse order; per class the class-level order.</p>']
    pngs = sorted((plots / "orders").glob("*.png")) if (plots / "orders").is_dir() else []
    if pngs:
        out.append('<div class="grid">' + "".join(_png_file(p, p.name, 520) for p in pngs)
                   + "</div>")
    else:
        out.append(_missing("data/plots/orders/*.png"))
    for anchor, title, name, note in (
            ("fig8", "CViT: accuracy vs patches dropped (Fig. 8)", "cvit_fig8.png", ""),
            ("samples", "CMAR samples beside real images", "cmar_samples.png", ": one row per class")):
        out.append(f'<h2 id="{anchor}">{_e(title)}</h2>')
        out.append(_png_file(plots / name, f"data/plots/{name}{note}") if (plots / name).exists()
                   else _missing(f"data/plots/{name}"))
    return "".join(out)


def records_section(data_dir: Path) -> str:
    out = ['<h2 id="records">Full records</h2>',
           '<p class="note">Everything else each stage recorded (params, fingerprints, timings, '
           'per-ratio tables): <code>data/reports/*.json</code>.</p>']
    rdir = data_dir / "reports"
    paths = sorted(rdir.glob("*.json")) if rdir.is_dir() else []
    if not paths:
        return "".join(out) + _missing("data/reports/*.json")
    for p in paths:
        d = _read_json(p)
        text = json.dumps(d, indent=1, sort_keys=False) if d is not None else "(unreadable)"
        if len(text) > MAX_RECORD_CHARS:
            text = text[:MAX_RECORD_CHARS] + f"\n… ({len(text) - MAX_RECORD_CHARS} more characters "\
                                              f"in data/reports/{p.name})"
        out.append(f"<details><summary>data/reports/{_e(p.name)}</summary><pre>{_e(text)}</pre>"
                   "</details>")
    return "".join(out)


# ---------------------------------------------------------------------------------- API

def build_report(data_dir: str | Path = "data", title: str = "The Collapse of Patches: pipeline report"
                 ) -> str:
    """The whole report as one HTML string (no external reference, every image inline)."""
    data_dir = Path(data_dir)
    nav = "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t in (
        ("orders", "orders vs baselines"), ("metrics", "metrics"), ("curves", "curves"),
        ("orders-pictures", "order pictures"), ("fig8", "Fig. 8"), ("samples", "samples"),
        ("records", "full records")))
    body = "".join(section(data_dir) for section in (
        orders_section, metrics_section, curves_section, pictures_section, records_section))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{_e(title)}</h1><p class=\"note\">Built from <code>{_e(data_dir)}/</code> by "
            "<code>cop report</code> (DVC stage <code>report</code>). Self-contained: no "
            f"external reference, readable offline.</p><nav>{nav}</nav>{body}</body></html>\n")


def write_report(data_dir: str | Path = "data", out: str | Path | None = None) -> Path:
    """Write :func:`build_report` of ``data_dir`` to ``out`` (default ``data_dir/report.html``)."""
    data_dir = Path(data_dir)
    out = Path(out) if out is not None else data_dir / "report.html"
    atomic_write_text(out, build_report(data_dir))
    return out


__all__ = ["build_report", "flatten", "fmt", "kv_table", "write_report"]
