"""``fetch_orders`` from a folder, file:// and a loopback HTTP server; bad shards are named."""

from __future__ import annotations

import functools
import shutil
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


def _add_member(shard: Path, name: str, data: bytes) -> None:
    import io
    import tarfile

    buf = io.BytesIO(shard.read_bytes())
    with tarfile.open(fileobj=buf, mode="a") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    shard.write_bytes(buf.getvalue())


def test_manifest_written_only_after_every_shard_validated(published: Path, tmp_path: Path) -> None:
    """A shard whose sha256 matches the manifest but holds a forbidden member: the fetch fails
    and leaves no manifest, so the folder never opens as a finished set (issue 11)."""
    import json

    from pipeline.utils.io import sha256_file

    bad = tmp_path / "bad"
    shutil.copytree(published, bad)
    shard = bad / "orders-000002.tar"
    _add_member(shard, "../../evil.npy", b"x" * 10)
    m = json.loads((bad / "manifest.json").read_text())
    m["shards"][2].update(sha256=sha256_file(shard), bytes=shard.stat().st_size)
    (bad / "manifest.json").write_text(json.dumps(m))
    dest = tmp_path / "dest"
    fetch_orders(published, dest)  # a good, complete set there first
    with pytest.raises(ShardError, match=r"orders-000002\.tar.*unexpected member"):
        fetch_orders(bad, dest)
    assert not (dest / "manifest.json").exists()
    with pytest.raises(ShardError, match="no manifest.json"):
        CollapseOrders(dest)
    # the source fixed: the same destination resumes and completes
    lines: list[str] = []
    fetch_orders(published, dest, log=lines.append)
    assert set_bytes(dest) == set_bytes(published)
    text = "\n".join(lines)
    assert "fetched 1 and kept 4 already present of 5 files (3 shards, 2 class-order files" in text, text
    assert "9 keys" in text and "permutations of 0..15" in text and "manifest.json last" in text


def test_fetch_drops_files_of_an_earlier_set(published: Path, tmp_path: Path) -> None:
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "orders-000007.tar").write_bytes(b"stale")
    (dest / "notes.txt").write_text("mine")
    fetch_orders(published, dest)
    assert not (dest / "orders-000007.tar").exists() and (dest / "notes.txt").exists()
