"""The offline report (stage ``report``, ``cop report``): one HTML file, nothing external."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.utils.report import build_report, write_report

ORDER_ROWS = ("collapse", "random", "fixed", "centre", "pixel_variance", "token_saliency")


def _png(path: Path, color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 20, 3), color, np.uint8)).save(path)


def _row(auc: float) -> dict:
    return {"auc": auc, "auc_ci": 0.012, "top10": 0.31, "top25": 0.27, "top50": 0.2,
            "pos_auc": None if auc == 0.5 else auc - 0.05}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A small fake data folder: some stages ran, others (CMAR) did not."""
    d = tmp_path / "data"
    (d / "metrics").mkdir(parents=True)
    (d / "reports").mkdir()
    (d / "metrics" / "prepare.json").write_text(json.dumps(
        {"train_count": 24, "val_count": 12, "num_classes": 3, "crop_size": 32}))
    (d / "metrics" / "comae.json").write_text(json.dumps(
        {"L_r": 6.5612345, "L_c": 0.29, "H_mask": 9.66, "train_steps": 2000, "val_w_gain_ci": [0.1, 0.2]}))
    (d / "metrics" / "orders.json").write_text(json.dumps({"auc_collapse": 0.7123, "flip_tau": None}))
    table = {name: _row(0.5 + 0.03 * i) for i, name in enumerate(ORDER_ROWS)}
    (d / "reports" / "orders.json").write_text(json.dumps({
        "params": {"damping": 0.85}, "baselines": {
            "train": {"images": 24, "area_share": 0.12, "table": table, "specificity_tau": 0.4},
            "val": {"images": 12, "area_share": 0.121, "table": table, "specificity_tau": 0.41}}}))
    (d / "reports" / "prepare.json").write_text(json.dumps({"fingerprint": "ab" * 32}))
    (d / "plots").mkdir()
    (d / "plots" / "comae_train.csv").write_text(
        "step,L_r,L_c,H_mask,tau,w_mean\n2,9.0,1.5,11,0.1,0.4\n4,8.0,1.0,10,0.09,0.45\n6,7.5,,9.8,0.08,0.5\n")
    (d / "plots" / "comae_w_hist.csv").write_text("w,share\n0.25,0.7\n0.75,0.3\n")
    (d / "plots" / "cvit_accuracy.csv").write_text(
        "mask_ratio,ViT,ViT+C,RViT,CViT\n0.0,30,30,29,28\n0.78,20,25,22,26\n")
    (d / "cvit" / "cvit").mkdir(parents=True)
    (d / "cvit" / "cvit" / "train_log.csv").write_text("step,loss,acc\n2,1.1,0.3\n4,1.0,0.4\n")
    _png(d / "plots" / "orders" / "fig4_a_train_000000.png", (200, 30, 30))
    _png(d / "plots" / "orders" / "fig5_classes.png", (30, 200, 30))
    _png(d / "plots" / "cvit_fig8.png", (30, 30, 200))
    return d


def _no_external_reference(text: str) -> None:
    low = text.lower()
    for bad in ("http://", "https://", "//cdn", 'src="http', "src='http", "@import", "url("):
        assert bad not in low, bad
    assert "<script" not in low and "<link" not in low and "<iframe" not in low
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', text)
    assert srcs and len(srcs) == low.count("<img")
    assert all(s.startswith("data:image/png;base64,") for s in srcs), [s[:40] for s in srcs]
    hrefs = re.findall(r'href="([^"]*)"', text)
    assert all(h.startswith("#") for h in hrefs), hrefs


def test_report_is_self_contained_and_has_the_baseline_table(data: Path) -> None:
    out = write_report(data)
    assert out == data / "report.html"
    text = out.read_text()
    _no_external_reference(text)
    # the orders table, per split, val first, every baseline row with its columns
    assert text.index("<h3>val") < text.index("<h3>train")
    tables = re.findall(r'<table class="orders">(.*?)</table>', text, re.S)
    assert len(tables) == 2
    for name in ORDER_ROWS:
        assert f'<td class="k">{name}</td>' in tables[0]
    for col in ("object AUC", "top 10%", "top 25%", "top 50%", "position-stratified AUC"):
        assert col in tables[0]
    assert '<tr class="hl"><td class="k">collapse</td><td>0.5</td><td>0.012</td>' in tables[0]
    # headline figures, formatted; the pictures and curves inline
    assert "6.561" in text and "L_r" in text and "[0.1, 0.2]" in text
    assert text.count("<img") == 3 + 5  # orders x2, Fig. 8; five curves (no CMAR log)
    # what is missing says so instead of failing
    assert "data/plots/cmar_samples.png: not produced" in text
    assert "data/metrics/cmar.json: not produced" in text
    assert "MAR pretraining loss (random order) (data/plots/pretrain_mar_train.csv): not produced" in text


def test_report_of_an_empty_folder_says_not_produced(tmp_path: Path) -> None:
    text = build_report(tmp_path / "nothing-here")
    assert "data/reports/orders.json (baselines): not produced" in text
    assert "<img" not in text and "http" not in text.lower()


def test_report_survives_broken_artifacts(data: Path) -> None:
    (data / "reports" / "orders.json").write_text("{not json")
    (data / "plots" / "cvit_fig8.png").write_bytes(b"not a png")
    (data / "plots" / "comae_train.csv").write_text("")
    (data / "metrics" / "cvit.json").write_text("[1, 2]")
    text = build_report(data)
    _no_external_reference(text)
    assert "(not a PNG)" in text and "data/metrics/cvit.json: not produced" in text


def test_report_stage_and_cli(data: Path, monkeypatch, capsys) -> None:
    from pipeline.config import load_params
    from stages import report

    repo = Path(__file__).resolve().parents[1]
    path = report.run(load_params(repo / "params.yaml"), data_dir=data, out=data / "r" / "x.html")
    assert path.exists() and "[report]" in capsys.readouterr().out
    _no_external_reference(path.read_text())
