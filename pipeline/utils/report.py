"""The offline report: one self-contained HTML file with what the pipeline produced.

``dvc plots show`` writes HTML that loads its chart library (Vega) from a CDN, so it is blank
offline. :func:`write_report` reads only files (``data/metrics/*.json``,
``data/reports/*.json``, ``data/plots/``, the CViT training logs) and writes one HTML file
with no external reference of any kind: tables as HTML, curves drawn with matplotlib and every
picture inlined as a ``data:image/png;base64`` URI, no script, no stylesheet link, no font.
Whatever has not been produced yet is shown as "not produced"; nothing here raises on a
missing or unreadable artifact.

Sections: the collapse order against its baselines (``data/reports/orders.json``,
``baselines`` -> split -> ``table``), every order by the collapse criterion, the CViT table
with its contrasts and costs (``data/reports/cvit.json``), the headline figures of every stage, the training
curves, the collapse-order pictures (Fig. 4/5), Fig. 8 and the CMAR sample grid, then the full
records of ``data/reports/`` folded away.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterable

from pipeline.utils.html import (
    column, esc, flatten, fmt, img, kv_table, missing, png_file, read_csv_or_none, read_json_or_none,
)
from pipeline.utils.io import atomic_write_text

# Stages in pipeline order: (metrics file stem, title). Other metrics files follow, sorted.
STAGE_METRICS = (
    ("prepare", "prepare: the image set"),
    ("extract_latents", "extract_latents: the latent store"),
    ("comae", "train_comae: CoMAE"),
    ("comae_probe", "probe_comae: copy-mechanism probe"),
    ("orders", "export_orders: collapse orders (val)"),
    ("critic_scorer", "train_critic@scorer: the critic that scores orders"),
    ("critic_builder", "train_critic@builder: the critic that builds orders"),
    ("order_scores", "score_orders: every order by the collapse criterion (val)"),
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
# eval_cvit's rows in the order of its table (Tab. 5, then the controls); others follow
CVIT_ROWS = ("ViT", "ViT+C", "RViT", "CViT", "CViT-fixed", "CViT-centre", "CViT-pixvar", "CViT-pss",
             "CViT-halton", "CViT-other", "CViT[pss]", "CViT[pss]-other")
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
     CVIT_ROWS),
)
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


# ---------------------------------------------------------------------------- sections

def _record(data_dir: Path, stem: str, key: str) -> dict | None:
    """``data/reports/<stem>.json`` when it is a record with ``key``; None otherwise."""
    rec = read_json_or_none(data_dir / "reports" / f"{stem}.json")
    return rec if isinstance(rec, dict) and key in rec else None


def _table(head: Iterable[str], rows: list[tuple[str, Iterable[str]]], highlight: str | None = None
           ) -> str:
    """An HTML table: a header row, then per row its name (first column) and its cells."""
    hl = ' class="hl"'
    body = "".join(f'<tr{hl if name == highlight else ""}><td class="k">{esc(name)}</td>'
                   + "".join(f"<td>{esc(x)}</td>" for x in cells) + "</tr>" for name, cells in rows)
    return ('<table class="orders"><tr>' + "".join(f"<th>{esc(h)}</th>" for h in head)
            + f"</tr>{body}</table>")


def orders_section(data_dir: Path) -> str:
    """The collapse order against its five baselines, per split (val first)."""
    out = ['<h2 id="orders">Collapse order vs baselines</h2>',
           '<p class="note">Does the collapse order rank object patches first? Object AUC: ROC '
           'AUC of each order\'s patch scores against the ground-truth object mask (0.5 = '
           'chance); top k%: share of object patches among the first k% of the order; '
           'position-stratified AUC: the same AUC within each grid position, so a fixed '
           'position prior scores 0.5. From <code>data/reports/orders.json</code>.</p>']
    report = read_json_or_none(data_dir / "reports" / "orders.json")
    baselines = report.get("baselines") if isinstance(report, dict) else None
    if not isinstance(baselines, dict) or not baselines:
        return "".join(out) + missing("data/reports/orders.json (baselines)")
    splits = sorted(baselines, key=lambda s: (s != "val", s))
    for split in splits:
        rep = baselines[split]
        if not isinstance(rep, dict) or not isinstance(rep.get("table"), dict):
            out.append(f"<h3>{esc(split)}</h3>" + missing(f"baseline table of {split} "
                                                           "(no object masks?)"))
            continue
        table = rep["table"]
        head = "".join(f"<th>{esc(label)}</th>" for _, label in ORDER_COLS)
        names = [n for n in ORDER_ROWS if n in table] + [n for n in table if n not in ORDER_ROWS]
        body = ""
        for name in names:
            row = table[name] if isinstance(table[name], dict) else {}
            cells = "".join(f"<td>{esc(fmt(row.get(k)))}</td>" for k, _ in ORDER_COLS)
            cls = ' class="hl"' if name == "collapse" else ""
            body += f'<tr{cls}><td class="k">{esc(name)}</td>{cells}</tr>'
        info = []
        if "images" in rep:
            info.append(f"{fmt(rep['images'])} images")
        if isinstance(rep.get("area_share"), (int, float)):
            info.append(f"object area {rep['area_share']:.1%}")
        if "specificity_tau" in rep:
            info.append(f"mean Kendall τ to the fixed order {fmt(rep['specificity_tau'])} "
                        "(1 = the collapse order is a position prior)")
        out.append(f"<h3>{esc(split)}" + (f" — {esc('; '.join(info))}" if info else "") + "</h3>")
        out.append(f'<table class="orders"><tr><th class="k">order</th>{head}</tr>{body}</table>')
    return "".join(out)


def criterion_section(data_dir: Path) -> str:
    """Every order by the paper's criterion (stage score_orders), best area first."""
    out = ['<h2 id="criterion">Orders by the collapse criterion</h2>',
           '<p class="note">Reveal an order\'s first k patches; the scoring critic (an any-order '
           'masked token predictor that built no order) measures the NLL of the patches still '
           'hidden, nats per channel. Area: the mean over the reveal range (lower = the order '
           'collapses the image faster). Δ: paired difference, 95% bootstrap interval over '
           'images. Adjusted: each hidden token against its own NLL with nothing revealed (an '
           'order cannot score by leaving easy tokens hidden). L1: the critic\'s prediction error '
           'summed over channels, L_r\'s units. Greedy gain: the share of the greedy reference\'s '
           'gain over random each order reaches. From <code>data/reports/order_scores.json</code>.</p>']
    rec = _record(data_dir, "order_scores", "summary")
    if rec is None:
        return "".join(out) + missing("data/reports/order_scores.json")
    summ, costs, auc = rec["summary"], rec.get("costs", {}), rec.get("object_auc", {})
    adj, l1 = rec.get("adjusted", {}).get("area", {}), rec.get("l1", {}).get("area", {})
    share = summ.get("greedy_subset", {}).get("share_of_greedy_gain", {})
    ci = (lambda d: f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]" if d else "")
    head = ("order", "area [95% CI]", "Δ vs random", f"Δ vs {summ['best_cheap']} (best cheap)",
            "@22%", "@50%", "greedy gain", "adjusted Δ vs random", "L1 Δ vs random",
            "object AUC", "s / image", "MFLOP / image")
    body = []
    for name in sorted(summ["area"], key=lambda n: summ["area"][n]["mean"]):
        r, c = summ["area"][name], costs.get(name, {})
        cells = (f"{r['mean']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]", ci(r.get("vs_random")),
                 ci(r.get("vs_best_cheap")), fmt(summ["at22"][name]["mean"]),
                 fmt(summ["at50"][name]["mean"]),
                 "" if share.get(name) is None else f"{share[name]:.0%}",
                 ci(adj.get(name, {}).get("vs_random")), ci(l1.get(name, {}).get("vs_random")),
                 fmt(auc.get(name)),
                 fmt(c.get("seconds")), "" if c.get("flops") is None else f"{c['flops'] / 1e6:.2f}")
        body.append((name, cells))
    out.append(_table(head, body, highlight="collapse"))
    agree = rec.get("agreement", {})
    made = costs.get("collapse", {}).get("built_by") or "comae"
    out.append(f'<p class="note">{fmt(rec.get("images"))} val images; the exported order '
               f'(<code>collapse</code>) was made by the estimator <code>{esc(made)}</code> '
               '(<code>orders.estimator</code>); the two critics rank the '
               f'{len(agree.get("orders", []))} orders neither built with Spearman ρ = '
               f'{fmt(agree.get("spearman"))}.</p>')
    png = data_dir / "plots" / "collapse_curves.png"
    out.append(png_file(png, "data/plots/collapse_curves.png") if png.exists()
               else missing("data/plots/collapse_curves.png"))
    return "".join(out)


def cvit_section(data_dir: Path) -> str:
    """Tab. 5 with its controls and paired contrasts, and each row's cost (stage eval_cvit)."""
    out = ['<h2 id="cvit">CViT: top-1 with patches dropped (Tab. 5)</h2>',
           '<p class="note">Mean over fine-tuning seeds, 95% bootstrap interval over val images. '
           'Cost: FLOPs per image at 78% dropped (the ViT on the kept patches, plus making the '
           'order, plus the tokenizer when the order reads tokens) against the full ViT\'s '
           'forward; "—": another image\'s order, a control no method computes. From '
           '<code>data/reports/cvit.json</code>.</p>']
    rec = _record(data_dir, "cvit", "contrasts")
    if rec is None:
        return "".join(out) + missing("data/reports/cvit.json")
    ci = (lambda e, k, sign="": f"{e[k]:{sign}.1f} [{e[k + '_ci'][0]:{sign}.1f}, {e[k + '_ci'][1]:{sign}.1f}]")
    cost = rec.get("order_cost", {}).get("rows", {})
    head = ("row", "top-1 @0% [95% CI]", "top-1 @78% [95% CI]", "AuC [95% CI]", "order",
            "cost × full ViT")
    rows = [r for r, e in rec.items() if isinstance(e, dict) and "top1@78_ci" in e and "top1@0" in e]
    body = []
    for row in sorted(rows, key=lambda r: (CVIT_ROWS.index(r) if r in CVIT_ROWS else len(CVIT_ROWS), r)):
        e, c = rec[row], cost.get(row, {})
        cells = (ci(e, "top1@0"), ci(e, "top1@78"), ci(e, "AuC"), c.get("order") or "",
                 "" if not c else "—" if c.get("vs_full_vit") is None else f"{c['vs_full_vit']:.2f}")
        body.append((row, cells))
    out.append(_table(head, body, highlight="CViT"))
    out.append(_table(("paired contrast", "Δ top-1 @78%", "Δ AuC"),
                      [(n, (ci(e, "top1@78", "+"), ci(e, "AuC", "+"))) for n, e in rec["contrasts"].items()]))
    q = rec.get("order_quality", {})
    if q.get("rows"):
        lo, hi = q["spearman_ci"]
        out.append(f'<p class="note">Order quality against CViT top-1 over {len(q["rows"])} '
                   f'orders: Spearman ρ = {q["spearman"]:+.2f} [{lo:+.2f}, {hi:+.2f}] (the '
                   'paper\'s claim predicts &lt; 0; the figure is below, under Fig. 8).</p>')
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
        d = read_json_or_none(path)
        body = kv_table(d) if isinstance(d, dict) else missing(f"data/metrics/{stem}.json")
        out.append(f"<div><h3>{esc(title)}</h3>{body}</div>")
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
        rows = read_csv_or_none(path)
        if rows:
            logs[path.parent.name] = rows
    return logs


def curves_section(data_dir: Path) -> str:
    out = ['<h2 id="curves">Training curves</h2><div class="grid">']
    absent = []
    for title, rel, x, ys in CURVES:
        if rel is None:  # CViT: one line per variant
            logs = _cvit_logs(data_dir)
            series = [(v, column(r, x), column(r, ys[0])) for v, r in logs.items()
                      if x in r[0] and ys[0] in r[0]]
            source = "data/cvit/<variant>_s<seed>/train_log.csv"
        else:
            rows = read_csv_or_none(data_dir / rel)
            series = [(y, column(rows, x), column(rows, y)) for y in ys
                      if rows and x in rows[0] and y in rows[0]]
            source = f"data/{rel}"
        if not series:
            absent.append(missing(f"{title} ({source})"))
            continue
        try:
            png = _figure(title, series, x)
        except Exception as err:  # a figure that cannot be drawn must not cost the report
            absent.append(missing(f"{title} ({source}; {type(err).__name__}: {err})"))
            continue
        out.append(img(png, title, source))
    return "".join(out) + "</div>" + "".join(absent)


def pictures_section(data_dir: Path) -> str:
    plots = data_dir / "plots"
    out = ['<h2 id="orders-pictures">Collapse orders (Fig. 4/5)</h2>',
           '<p class="note">From <code>data/plots/orders/</code>: per image the patches in '
           'collapse order; per class the class-level order.</p>']
    pngs = sorted((plots / "orders").glob("*.png")) if (plots / "orders").is_dir() else []
    if pngs:
        out.append('<div class="grid">' + "".join(png_file(p, p.name, 520) for p in pngs)
                   + "</div>")
    else:
        out.append(missing("data/plots/orders/*.png"))
    for anchor, title, name, note in (
            ("fig8", "CViT: accuracy vs patches dropped (Fig. 8)", "cvit_fig8.png", ""),
            ("order-quality", "Does a faster-collapsing order give a better CViT?",
             "cvit_order_quality.png", ": CViT top-1 at 78% dropped against the order's "
             "collapse-curve value at 22% revealed"),
            ("samples", "CMAR samples beside real images", "cmar_samples.png", ": one row per class")):
        out.append(f'<h2 id="{anchor}">{esc(title)}</h2>')
        out.append(png_file(plots / name, f"data/plots/{name}{note}") if (plots / name).exists()
                   else missing(f"data/plots/{name}"))
    return "".join(out)


def records_section(data_dir: Path) -> str:
    out = ['<h2 id="records">Full records</h2>',
           '<p class="note">Everything else each stage recorded (params, fingerprints, timings, '
           'per-ratio tables): <code>data/reports/*.json</code>.</p>']
    rdir = data_dir / "reports"
    paths = sorted(rdir.glob("*.json")) if rdir.is_dir() else []
    if not paths:
        return "".join(out) + missing("data/reports/*.json")
    for p in paths:
        d = read_json_or_none(p)
        text = json.dumps(d, indent=1, sort_keys=False) if d is not None else "(unreadable)"
        if len(text) > MAX_RECORD_CHARS:
            text = text[:MAX_RECORD_CHARS] + f"\n… ({len(text) - MAX_RECORD_CHARS} more characters "\
                                              f"in data/reports/{p.name})"
        out.append(f"<details><summary>data/reports/{esc(p.name)}</summary><pre>{esc(text)}</pre>"
                   "</details>")
    return "".join(out)


# ---------------------------------------------------------------------------------- API

def build_report(data_dir: str | Path = "data", title: str = "The Collapse of Patches: pipeline report"
                 ) -> str:
    """The whole report as one HTML string (no external reference, every image inline)."""
    data_dir = Path(data_dir)
    nav = "".join(f'<a href="#{a}">{esc(t)}</a>' for a, t in (
        ("orders", "orders vs baselines"), ("criterion", "collapse criterion"), ("cvit", "CViT table"),
        ("metrics", "metrics"), ("curves", "curves"),
        ("orders-pictures", "order pictures"), ("fig8", "Fig. 8"), ("samples", "samples"),
        ("records", "full records")))
    body = "".join(section(data_dir) for section in (
        orders_section, criterion_section, cvit_section, metrics_section, curves_section,
        pictures_section, records_section))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{esc(title)}</h1><p class=\"note\">Built from <code>{esc(data_dir)}/</code> by "
            "<code>cop report</code> (DVC stage <code>report</code>). Self-contained: no "
            f"external reference, readable offline.</p><nav>{nav}</nav>{body}</body></html>\n")


def write_report(data_dir: str | Path = "data", out: str | Path | None = None) -> Path:
    """Write :func:`build_report` of ``data_dir`` to ``out`` (default ``data_dir/report.html``)."""
    data_dir = Path(data_dir)
    out = Path(out) if out is not None else data_dir / "report.html"
    atomic_write_text(out, build_report(data_dir))
    return out


__all__ = ["build_report", "flatten", "fmt", "kv_table", "write_report"]
