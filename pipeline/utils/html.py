"""Reading artifacts without raising, and the HTML bits the offline report is made of."""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from pathlib import Path
from typing import Any

MIN_SHOWN_PX = 384  # a smaller picture (a tiny profile's sample grid) is shown scaled up


# ------------------------------------------------------------------------------ reading

def read_json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_csv_or_none(path: Path) -> list[dict[str, str]] | None:
    try:
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return None


def column(rows: list[dict[str, str]], name: str) -> list[float]:
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

def esc(x: Any) -> str:
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


def missing(what: str) -> str:
    return f'<p class="missing">{esc(what)}: not produced</p>'


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def png_width(data: bytes) -> int | None:
    """A PNG's width from its IHDR chunk."""
    return int.from_bytes(data[16:20], "big") if data[12:16] == b"IHDR" else None


def img(data: bytes, alt: str, caption: str | None = None, width: int | None = None) -> str:
    natural = png_width(data)
    if width is None and natural and natural < MIN_SHOWN_PX:  # small grids: scale up, crisp
        width = natural * -(-MIN_SHOWN_PX // natural)
    if width and natural and width > natural:
        w = f' width="{width}" style="image-rendering: pixelated"'
    else:
        w = f' width="{width}"' if width else ""
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{png_uri(data)}" alt="{esc(alt)}"{w}>{cap}</figure>'


def png_file(path: Path, caption: str | None = None, width: int | None = None) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return missing(str(path))
    if not data.startswith(b"\x89PNG"):
        return missing(f"{path} (not a PNG)")
    return img(data, path.name, caption, width)


def kv_table(d: dict[str, Any]) -> str:
    rows = "".join(f'<tr><td class="k">{esc(k)}</td><td>{esc(fmt(v))}</td></tr>'
                   for k, v in flatten(d).items())
    return f'<table><tr><th class="k">figure</th><th>value</th></tr>{rows}</table>'


__all__ = ["read_json_or_none", "read_csv_or_none", "column", "flatten", "esc", "fmt", "missing", "png_uri", "png_width", "img", "png_file", "kv_table"]
