"""Latent store: format round trip, reader, resume, fingerprint rebuild, errors.

Tiny sizes: 12 random 32x32 images in a real prepared image set (two tar shards), the real
patch tokenizer (p=8, dim 16: a 4x4 grid), 3 work units of 4 rows (chunks of 2 rows).
The multi-process check lives in test_latents_dist.py.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.config import LatentsConfig, TokenizerConfig
from pipeline.data.crop import to_model_input
from pipeline.data.imageset import ImageSet
from pipeline.latents import writer
from pipeline.latents.store import (FORMAT, LatentStore, LatentStoreError, TokenGridDataset,
                                    memory_budget, sample_posterior, spaced_rows)
from pipeline.latents.writer import extract_latents
from pipeline.tokenizers import PatchTokenizer
from tests.support import write_imageset

N, SIZE, CLASSES = 12, 32, ("a", "b", "c")
LAYOUT = LatentsConfig(rows_per_chunk=2, rows_per_shard=4, compression_level=3)
ENCODE = TokenizerConfig(kind="patch", patch_size=8, dim=16, batch_size=3, precision="fp32",
                         channels_last=False)


def make_imageset(split_dir: Path, n: int = N, seed: int = 0, split: str = "train") -> ImageSet:
    """A real prepared split: random crops, labels cycling over CLASSES, shards of 6."""
    rng = np.random.default_rng(seed)
    images = [(f"{CLASSES[i % len(CLASSES)]}/img_{i:03d}", i % len(CLASSES),
               rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for i in range(n)]
    return write_imageset(split_dir, split, images, list(CLASSES), SIZE, per_shard=6,
                          source={"kind": "test", "seed": seed}, fingerprint=f"test-{seed}-{n}")


def fit_tokenizer(imageset: ImageSet, dim: int = 16) -> PatchTokenizer:
    images = np.stack([imageset.image(i) for i in range(len(imageset))])
    return PatchTokenizer(8, dim).fit(images)


def shard_bytes(store: Path) -> dict[str, bytes]:
    """Every file of the arrays (shards, chunk files, array metadata), by relative path."""
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p.parent != store}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> ImageSet:
    return make_imageset(tmp_path_factory.mktemp("images") / "train")


@pytest.fixture(scope="module")
def tok(images) -> PatchTokenizer:
    return fit_tokenizer(images)


@pytest.fixture(scope="module")
def reference(images, tok, tmp_path_factory) -> Path:
    """An uninterrupted extraction, the yardstick for resumed and rebuilt stores."""
    out = tmp_path_factory.mktemp("ref") / "train.zarr"
    result = extract_latents(images, tok, out, LAYOUT, ENCODE)
    assert (result.rows, result.units, result.rows_encoded, result.units_resumed) == (N, 3, N, 0)
    return out


# ----------------------------------------------------------------------------- format


def test_round_trip(reference, images, tok):
    store = LatentStore(reference)
    assert len(store) == N and store.keys == images.keys
    assert store.labels.tolist() == images.labels.tolist()
    assert store.classes == list(CLASSES)
    assert (store.grid, store.dim, store.num_tokens) == (4, 16, 16)
    assert store.scale_factor == pytest.approx(tok.scale_factor)
    assert store.attrs["format"] == FORMAT and store.attrs["crop_size"] == SIZE
    assert store.identity["tokenizer"] == tok.identity()
    assert store.identity["source"] == images.identity

    x = to_model_input(np.stack([images.image(i) for i in range(N)]))
    want = tok.encode_moments(x)
    want_flip = tok.encode_moments(x.flip(dims=[3]))
    # the store holds the same fp32 encode, batched another way: summation order only (~1e-6)
    torch.testing.assert_close(store.moments(slice(None)), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(store.moments(range(N), flip=True), want_flip, rtol=0, atol=1e-5)
    assert not torch.equal(store.moments(0), store.moments(0, flip=True))

    idx = [5, 0, 11, 5]
    tokens = store.tokens(idx)
    assert tokens.shape == (4, 16, 4, 4) and tokens.dtype == torch.float32
    torch.testing.assert_close(tokens, store.moments(idx)[:, :16] * store.scale_factor)
    # one flip flag per row
    mixed = store.tokens(idx, flip=[False, True, False, True])
    torch.testing.assert_close(mixed[1], store.tokens(0, flip=True)[0])
    torch.testing.assert_close(mixed[0], tokens[0])
    assert store.tokens(-1).shape == (1, 16, 4, 4)
    torch.testing.assert_close(store.tokens(-1), store.tokens(N - 1))
    with pytest.raises(IndexError):
        store.tokens([N])


def test_posterior_sample(reference):
    store = LatentStore(reference)
    m = store.moments([1, 2])
    got = store.tokens([1, 2], sample=True, generator=torch.Generator().manual_seed(7))
    eps = torch.randn(m[:, :16].shape, generator=torch.Generator().manual_seed(7))
    want = (m[:, :16] + torch.exp(0.5 * m[:, 16:]) * eps) * store.scale_factor
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, store.tokens([1, 2]))
    torch.testing.assert_close(sample_posterior(m, store.scale_factor,
                                                torch.Generator().manual_seed(7)), want)


def test_zarr_layout(reference):
    root = zarr.open_group(str(reference), mode="r")
    mom = root["moments"]
    assert mom.shape == (N, 2, 32, 4, 4) and mom.dtype == np.float32
    assert mom.chunks[0] == 2 and mom.shards[0] == 4
    assert "zstd" in str(mom.compressors).lower()
    assert root["labels"].dtype == np.int32
    assert [str(k) for k in root["keys"][:]] == LatentStore(reference).keys
    assert root["done"][:].tolist() == [1, 1, 1]
    # one shard file per unit, nothing else in the moments array
    assert len(list((reference / "moments").rglob("c/*/0/0/0/0"))) == 3


def test_memory_and_zarr_paths_agree(reference):
    mem, direct = LatentStore(reference, in_memory=True), LatentStore(reference, in_memory=False,
                                                                      cache_bytes=0)
    rng = np.random.default_rng(0)
    for _ in range(3):
        idx = rng.integers(0, N, 7)
        flips = rng.integers(0, 2, 7).astype(bool)
        assert torch.equal(mem.moments(idx, flips), direct.moments(idx, flips))


@pytest.mark.parametrize("with_moments", [False, True])
def test_dataset_items_agree_in_memory_and_streamed(reference, with_moments):
    rows = [5, 0, 9, 5]
    mem = TokenGridDataset(LatentStore(reference), in_memory=True, with_moments=with_moments)
    streamed = TokenGridDataset(LatentStore(reference), in_memory=False, with_moments=with_moments)
    for a, b in zip(mem.__getitems__(rows), streamed.__getitems__(rows)):
        assert a.keys() == b.keys() and a["tokens"].shape[0] == LatentStore(reference).dim
        assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_memory_budget_decides_and_guards(reference, monkeypatch):
    store = LatentStore(reference)
    monkeypatch.setenv("COP_MEMORY_BUDGET", str(store.nbytes))
    assert memory_budget() == store.nbytes and LatentStore(reference, in_memory=None).in_memory
    monkeypatch.setenv("COP_MEMORY_BUDGET", "1.5K")
    assert memory_budget() == 1536
    auto = TokenGridDataset(LatentStore(reference), in_memory=None)
    assert not auto.store.in_memory and auto.store._mem is None  # streamed, never decompressed
    with pytest.raises(LatentStoreError, match="refusing to decompress"):
        LatentStore(reference, in_memory=True).tokens(0)
    monkeypatch.setenv("COP_MEMORY_BUDGET", "lots")
    with pytest.raises(ValueError, match="COP_MEMORY_BUDGET"):
        memory_budget()
    monkeypatch.delenv("COP_MEMORY_BUDGET")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    one = memory_budget()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert memory_budget() == one // 8  # torchrun's processes on a machine share its RAM


def test_spaced_rows():
    assert spaced_rows(3, 5).tolist() == [0, 1, 2]
    assert spaced_rows(10, 4).tolist() == [0, 3, 6, 9]


# In memory: forked workers share the parent's copy. From Zarr: spawned workers get a
# pickled store and reopen it lazily.
@pytest.mark.parametrize("in_memory,context", [(True, "fork"), (False, "spawn")])
def test_dataset_with_workers(reference, in_memory, context):
    store = LatentStore(reference)
    ds = TokenGridDataset(reference, in_memory=in_memory, with_moments=True)
    item = ds[3]
    assert set(item) == {"tokens", "tokens_flip", "label", "index", "moments", "moments_flip"}
    assert torch.equal(item["tokens"], store.tokens(3)[0])
    assert torch.equal(item["tokens_flip"], store.tokens(3, flip=True)[0])
    assert item["label"] == int(store.labels[3]) and item["index"] == 3
    assert pickle.loads(pickle.dumps(ds))[3]["tokens"].equal(item["tokens"])

    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2, shuffle=False,
                                         multiprocessing_context=context)
    batches = list(loader)
    assert [b["tokens"].shape[0] for b in batches] == [5, 5, 2]
    assert torch.equal(torch.cat([b["tokens"] for b in batches]), store.tokens(slice(None)))
    assert torch.equal(torch.cat([b["tokens_flip"] for b in batches]),
                       store.tokens(slice(None), flip=True))
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(N))
    assert torch.cat([b["label"] for b in batches]).tolist() == store.labels.tolist()


# ----------------------------------------------------------------------------- resume


class Killed(RuntimeError):
    pass


def _die_after(monkeypatch, name: str, calls: int) -> None:
    """Make writer.<name> raise on call number ``calls + 1`` (a simulated kill)."""
    real, count = getattr(writer, name), {"n": 0}

    def wrapped(*args, **kwargs):
        if count["n"] == calls:
            raise Killed(f"killed in {name}")
        count["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, name, wrapped)


def test_resume_after_kill_equals_uninterrupted(images, tok, reference, tmp_path, monkeypatch):
    out = tmp_path / "train.zarr"
    with monkeypatch.context() as m:
        _die_after(m, "_write_unit", 1)
        with pytest.raises(Killed):
            extract_latents(images, tok, out, LAYOUT, ENCODE)
    with pytest.raises(LatentStoreError, match="not finished"):
        LatentStore(out)
    result = extract_latents(images, tok, out, LAYOUT, ENCODE)
    assert (result.rebuilt, result.units_resumed, result.rows_encoded) == (False, 1, 8)
    assert shard_bytes(out) == shard_bytes(reference)
    assert torch.equal(LatentStore(out).moments(slice(None)),
                       LatentStore(reference).moments(slice(None)))

    again = extract_latents(images, tok, out, LAYOUT, ENCODE)  # complete: nothing to do
    assert (again.units_resumed, again.rows_encoded) == (3, 0)

    (out / "moments" / "c" / "2" / "0" / "0" / "0" / "0").unlink()  # a shard lost by hand
    repaired = extract_latents(images, tok, out, LAYOUT, ENCODE)
    assert (repaired.units_resumed, repaired.rows_encoded) == (2, 4)
    assert shard_bytes(out) == shard_bytes(reference)


def test_unit_without_done_flag_is_redone(images, tok, reference, tmp_path, monkeypatch):
    out = tmp_path / "train.zarr"
    with monkeypatch.context() as m:
        # unit 0 completes; unit 1's shard is written but the run dies before its flag
        _die_after(m, "_mark_done", 1)
        with pytest.raises(Killed):
            extract_latents(images, tok, out, LAYOUT, ENCODE)
    assert zarr.open_group(str(out))["done"][:].tolist() == [1, 0, 0]
    shard1 = out / "moments" / "c" / "1" / "0" / "0" / "0" / "0"
    shard1.write_bytes(shard1.read_bytes()[:50])  # and it was torn half-way
    (shard1.parent / "0.deadbeef.partial").write_bytes(b"junk")  # Zarr's temp file of a kill
    result = extract_latents(images, tok, out, LAYOUT, ENCODE)
    assert (result.units_resumed, result.rows_encoded) == (1, 8)
    assert shard_bytes(out) == shard_bytes(reference)


def test_fingerprint_mismatch_rebuilds(images, tok, reference, tmp_path):
    out = tmp_path / "train.zarr"
    other = fit_tokenizer(images, dim=8)
    first = extract_latents(images, other, out, LAYOUT, ENCODE)
    assert first.rebuilt and LatentStore(out).dim == 8
    result = extract_latents(images, tok, out, LAYOUT, ENCODE)  # another tokenizer
    assert result.rebuilt and result.rows_encoded == N
    assert shard_bytes(out) == shard_bytes(reference)
    relaid = extract_latents(images, tok, out, LatentsConfig(rows_per_chunk=4, rows_per_shard=8),
                             ENCODE)  # another layout
    assert relaid.rebuilt and relaid.units == 2
    assert torch.equal(LatentStore(out).moments(slice(None)),
                       LatentStore(reference).moments(slice(None)))


def test_other_image_set_rebuilds(tok, tmp_path):
    a = make_imageset(tmp_path / "a" / "train", n=8, seed=1)
    b = make_imageset(tmp_path / "b" / "train", n=8, seed=2)
    out = tmp_path / "train.zarr"
    extract_latents(a, tok, out, LAYOUT, ENCODE)
    result = extract_latents(b, tok, out, LAYOUT, ENCODE)
    assert result.rebuilt and LatentStore(out).identity["source"] == b.identity


# ----------------------------------------------------------------------------- errors


def test_unknown_format_and_incompatible(reference, tmp_path):
    store = LatentStore(reference)
    store.check_compatible(expected_grid=4, expected_dim=16)
    with pytest.raises(LatentStoreError, match=r"grid 4x4 \(expected 16x16\)"):
        store.check_compatible(expected_grid=16)
    with pytest.raises(LatentStoreError, match=r"token dim 16 \(expected 32\)"):
        store.check_compatible(expected_grid=4, expected_dim=32)

    import shutil
    copy = tmp_path / "copy.zarr"
    shutil.copytree(reference, copy)
    zarr.open_group(str(copy), mode="r+").attrs["format"] = "cop-latents/999"
    with pytest.raises(LatentStoreError, match="unknown latent store format 'cop-latents/999'"):
        LatentStore(copy)
    with pytest.raises(LatentStoreError, match="no latent store"):
        LatentStore(tmp_path / "missing.zarr")


def test_layout_must_nest():
    with pytest.raises(ValueError, match="multiple of"):
        LatentsConfig(rows_per_chunk=3, rows_per_shard=4)


def test_fast_path_bf16_channels_last(images, tok, reference, tmp_path):
    fast = ENCODE.model_copy(update={"precision": "bf16", "channels_last": True})
    out = tmp_path / "train.zarr"
    result = extract_latents(images, tok, out, LAYOUT, fast)
    store, ref = LatentStore(out), LatentStore(reference)
    assert store.attrs["encoding"]["dtype"] == "bfloat16" and store.attrs["encoding"]["channels_last"]
    assert result.fingerprint != ref.attrs["fingerprint"]  # a resume never mixes precisions
    a, b = store.moments(slice(None)), ref.moments(slice(None))
    assert not torch.equal(a, b)
    # bf16 keeps 8 mantissa bits (0.4% per op) through a few layers: a few % of the range
    torch.testing.assert_close(a, b, rtol=0.05, atol=0.05 * float(b.abs().max()))
    tok.set_precision("fp32", False)  # the module-scoped tokenizer goes back to the exact path
