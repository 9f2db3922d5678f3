"""``fetch_orders`` from a folder, file:// and a loopback HTTP server; bad shards are named."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest

from pipeline.orders.export import export_split
from pipeline.orders.fetch import expand_braces, fetch_orders
from pipeline.orders.shards import CollapseOrders, ShardError
from tests.orders_data import CFG, COMAE_ID, make_store, set_bytes, tiny_comae


@pytest.fixture()
def published(tmp_path: Path) -> Path:
    store = make_store(tmp_path / "lat.zarr", n=9)
    model = tiny_comae(store.grid, store.dim)
    export_split(store, model, COMAE_ID, CFG, tmp_path / "pub", "train", class_orders=True)
    return tmp_path / "pub"


@pytest.fixture()
def server(published: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(published))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_expand_braces() -> None:
    assert expand_braces("a/orders-{000008..000010}.tar") == [
        "a/orders-000008.tar", "a/orders-000009.tar", "a/orders-000010.tar"]
    assert expand_braces("{x,y}{1..2}") == ["x1", "x2", "y1", "y2"]


def test_fetch_folder_and_file_url(published: Path, tmp_path: Path) -> None:
    got = fetch_orders(published, tmp_path / "a")
    assert set_bytes(got) == set_bytes(published)
    fetch_orders(published.as_uri() + "/manifest.json", tmp_path / "b")
    fetch_orders(published.as_uri() + "/orders-{000000..000002}.tar", tmp_path / "c")
    for d in "abc":
        co = CollapseOrders(tmp_path / d)
        assert np.array_equal(co.order(4), CollapseOrders(published).order(4))
        assert co.class_orders is not None


def test_fetch_http_and_resume(published: Path, server: str, tmp_path: Path) -> None:
    dest = fetch_orders(f"{server}/manifest.json", tmp_path / "h")
    assert set_bytes(dest) == set_bytes(published)
    before = (dest / "orders-000000.tar").stat().st_mtime_ns
    fetch_orders(f"{server}/orders-{{000000..000002}}.tar", dest)  # intact files are kept
    assert (dest / "orders-000000.tar").stat().st_mtime_ns == before


def test_truncated_and_tampered_named(published: Path, server: str, tmp_path: Path) -> None:
    p = published / "orders-000001.tar"
    good = p.read_bytes()
    p.write_bytes(good[:-1024])
    with pytest.raises(ShardError, match=r"orders-000001\.tar.*truncated"):
        fetch_orders(f"{server}/manifest.json", tmp_path / "t")
    assert not (tmp_path / "t" / "orders-000001.tar").exists()  # never left half-verified
    assert not (tmp_path / "t" / "manifest.json").exists()
    p.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    with pytest.raises(ShardError, match=r"orders-000001\.tar.*sha256"):
        fetch_orders(published.as_uri(), tmp_path / "u")


def test_pattern_must_match_manifest(published: Path, tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="lists 3"):
        fetch_orders(published.as_uri() + "/orders-{000000..000001}.tar", tmp_path / "p")
