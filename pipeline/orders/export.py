"""Batched export of collapse orders: latents → dependency matrices → PageRank → shards.

The matrices come from CoMAE (the paper) or another estimator (:mod:`pipeline.orders.estimators`);
the set's identity names which, with the exact weights that made them.

Work unit = one output shard (``samples_per_shard`` consecutive store rows). Batches never
straddle a shard, so a row's numbers do not depend on the world size or on where a killed
run stopped: 1 process, N ``torchrun`` ranks (unit u → rank u % world) and a resumed run give
the same bytes. Resume skips shards that exist and validate. A fingerprint of (latents
identity, estimator and its identity, params, device type) decides whether existing shards are reused or
the folder is rebuilt; the manifest is written last, by rank 0, after a barrier.

Per-shard side statistics (flip agreement, top-k agreement, timing) go to ``.work/`` so the
metrics survive a resume; ``fetch`` and the reader only ever look at manifest-listed files.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from pipeline.config import OrdersConfig, params_dict
from pipeline.orders.pagerank import (
    collapse_order,
    flip_permutation,
    kendall_tau,
    pagerank_scipy,
    pagerank_torch,
)
from pipeline.orders.shards import (
    CLASS_ORDERS,
    CLASS_SCORES,
    FORMAT,
    MANIFEST,
    OrderSample,
    ShardError,
    order_dtype,
    parse_shard,
    shard_name,
    write_shard,
)
from pipeline.utils.device import resolve_precision
from pipeline.utils.dist import DistInfo, barrier, get_dist, units_for_rank
from pipeline.utils.io import atomic_path, atomic_write_json, read_json, sha256_file, sha256_json
from pipeline.utils.progress import progress

WORK = ".work"


class DependencyModel(Protocol):
    """What the export needs of an estimator (CoMAE, :class:`~pipeline.orders.estimators.CriticGraph`)."""

    def dependency_matrices(self, tokens: torch.Tensor, chunk: int = ...,
                            dtype: torch.dtype = ...) -> torch.Tensor: ...


@dataclass
class SplitResult:
    split: str
    count: int
    shards: int
    computed: int  # shards computed by this run on this rank (others were reused)
    images_computed: int = 0
    seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float | None:
        return self.images_computed / self.seconds if self.seconds > 0 else None

    def summary(self) -> str:
        """One line for a person: what this run did for the split, and how fast."""
        rate = (f", {self.images_computed} images at {self.images_per_s:.1f} images/s"
                if self.images_per_s else "")
        return (f"orders {self.split}: {self.count} images in {self.shards} shards "
                f"({self.computed} computed by this run{rate})")


# ----------------------------------------------------------------------------- maths


def to_sequences(grids: torch.Tensor) -> torch.Tensor:
    """``[B, dim, h, w]`` → ``[B, N, dim]`` (row-major tokens)."""
    return grids.flatten(2).transpose(1, 2).contiguous()


@torch.no_grad()
def dependency_matrices(model: DependencyModel, tokens: torch.Tensor, device: torch.device,
                        amp: torch.dtype) -> torch.Tensor:
    """All N selection vectors of every image in one batched call → float32 ``A[B, N, N]``."""
    B, N, _ = tokens.shape
    # One pass over all B*N (image, target) sequences; the model autocasts to ``amp`` itself.
    A = model.dependency_matrices(tokens.to(device), chunk=B * N, dtype=amp).float().cpu()
    # A_ii = 0 by contract; enforce it rather than let bf16 rounding leave a self-loop.
    A.diagonal(dim1=1, dim2=2).zero_()
    return A


def pagerank_batch(A: torch.Tensor, cfg: OrdersConfig, topk: int | None) -> torch.Tensor:
    """float64 scores ``[B, N]`` with the configured backend."""
    kw = dict(damping=cfg.damping, tol=cfg.tol, max_iter=cfg.max_iter, topk=topk)
    if cfg.backend == "torch":
        return pagerank_torch(A, **kw)
    return torch.from_numpy(np.stack([pagerank_scipy(a.double().numpy(), **kw) for a in A]))


@dataclass
class Computed:
    scores: np.ndarray  # float64 [B, N]
    orders: np.ndarray  # int64 [B, N]
    matrix: np.ndarray  # float32 [B, N, N]
    topk_tau: list[float]  # sparsified vs dense, per image (empty when topk is off)

    def take(self, rows: slice) -> "Computed":
        return Computed(self.scores[rows], self.orders[rows], self.matrix[rows], self.topk_tau[rows])


def compute(model: DependencyModel, tokens: torch.Tensor, cfg: OrdersConfig, device: torch.device,
            amp: torch.dtype) -> Computed:
    A = dependency_matrices(model, tokens, device, amp)
    scores = pagerank_batch(A, cfg, cfg.topk).numpy()
    orders = collapse_order(scores)
    taus: list[float] = []
    if cfg.topk is not None:
        dense = collapse_order(pagerank_batch(A, cfg, None).numpy())
        taus = [kendall_tau(o, d) for o, d in zip(orders, dense)]
    return Computed(scores, orders, A.numpy(), taus)


# ----------------------------------------------------------------------------- one shard


def unit_rows(unit: int, n: int, per_shard: int) -> tuple[int, int]:
    return unit * per_shard, min(n, (unit + 1) * per_shard)


def export_unit(store: Any, model: DependencyModel, cfg: OrdersConfig, unit: int, out: Path,
                device: torch.device, amp: torch.dtype) -> dict[str, Any]:
    """Compute and atomically write shard ``unit``; returns its side statistics."""
    start, stop = unit_rows(unit, len(store), cfg.samples_per_shard)
    fperm = flip_permutation(store.grid)
    odt = order_dtype(store.num_tokens)
    samples: list[OrderSample] = []
    flip_tau: list[float] = []
    topk_tau: list[float] = []
    t0 = time.perf_counter()
    for b0 in range(start, stop, cfg.images_per_batch):
        rows = list(range(b0, min(stop, b0 + cfg.images_per_batch)))
        k = len(rows)
        # In "map" mode the first batch of every shard still computes the flips, so the
        # metrics show how far "map" is from "compute" on this model (evidence for the choice).
        with_flips = cfg.flip == "compute" or b0 == start
        grids = store.tokens(rows)
        if with_flips:  # images and their flips share one CoMAE pass
            grids = torch.cat([grids, store.tokens(rows, flip=True)])
        both = compute(model, to_sequences(grids), cfg, device, amp)
        c, f = both.take(slice(0, k)), both.take(slice(k, 2 * k))
        topk_tau += c.topk_tau
        # The flipped image's token n is the original's token fperm[n]: mapping an order
        # through fperm gives the flipped image's order if the model were flip-equivariant.
        mapped = fperm[c.orders]
        if with_flips:
            flip_tau += [kendall_tau(a, b) for a, b in zip(f.orders, mapped)]
        for j, r in enumerate(rows):
            arrays = {"order": c.orders[j].astype(odt), "scores": c.scores[j].astype(np.float32)}
            if cfg.flip == "compute":
                arrays["flip_order"] = f.orders[j].astype(odt)
                arrays["flip_scores"] = f.scores[j].astype(np.float32)
            else:
                arrays["flip_order"] = mapped[j].astype(odt)
                arrays["flip_scores"] = c.scores[j][fperm].astype(np.float32)
            if cfg.save_matrix:
                arrays["matrix"] = c.matrix[j].astype(np.float16)
                if cfg.flip == "compute":
                    arrays["flip_matrix"] = f.matrix[j].astype(np.float16)
            samples.append(OrderSample(store.keys[r], arrays))
    write_shard(out / shard_name(unit), samples)
    stats = {"unit": unit, "images": stop - start, "seconds": time.perf_counter() - t0,
             "flip_tau": flip_tau, "topk_tau": topk_tau}
    atomic_write_json(out / WORK / f"{shard_name(unit)}.json", stats)
    return stats


# ----------------------------------------------------------------------------- the split


def fields_for(cfg: OrdersConfig) -> list[str]:
    f = ["order", "scores", "flip_order", "flip_scores"]
    if cfg.save_matrix:
        f += ["matrix"] + (["flip_matrix"] if cfg.flip == "compute" else [])
    return f


# Keys that shape only the stage's report, not a byte of the shards: left out of the
# fingerprint and the manifest, so changing them never recomputes or re-identifies a set.
REPORT_ONLY = ("report_images",)


def shard_params(cfg: OrdersConfig) -> dict[str, Any]:
    return {k: v for k, v in params_dict(cfg).items() if k not in REPORT_ONLY}


def export_fingerprint(store: Any, made_by: Any, cfg: OrdersConfig, device: torch.device,
                       amp: torch.dtype, estimator: str = "comae") -> str:
    """Everything that decides the shard bytes; a change means rebuilding, not resuming.

    The thread count is not in it: the bytes do not depend on it (tests/test_orders_threads.py).
    Kernels do differ between torch builds and CPU instruction sets, so a run resumed on
    another build or CPU kind starts over instead of mixing shards.
    """
    kernels = {"torch": torch.__version__,
               "cpu": torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else None}
    return sha256_json({"format": FORMAT, "latents": store.identity, estimator: made_by,
                        "params": shard_params(cfg), "device": device.type, "amp": str(amp),
                        "kernels": kernels})


def _shard_ok(path: Path, keys: Sequence[str], fields: Sequence[str], N: int) -> bool:
    if not path.exists():
        return False
    try:
        parse_shard(path.read_bytes(), keys, fields, N, order_dtype(N), path.name)
        return True
    except ShardError:
        return False


def _reset(out: Path) -> None:
    """Remove what an export of other inputs left (only names this module writes)."""
    for p in out.glob("orders-*.tar"):
        p.unlink()
    for name in (MANIFEST, CLASS_ORDERS, CLASS_SCORES):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / WORK, ignore_errors=True)


def export_split(store: Any, model: DependencyModel, made_by: Any, cfg: OrdersConfig,
                 out: str | Path, split: str, device: torch.device | None = None,
                 class_orders: bool = False, info: DistInfo | None = None,
                 estimator: str = "comae") -> SplitResult:
    """Export one split of the latent store into ``out`` (resumable, torchrun-aware).

    ``made_by``: the identity of ``model`` (weights, config), recorded in the manifest under
    the ``estimator``'s name."""
    out = Path(out)
    info = info or get_dist()
    device = device or torch.device("cpu")
    # 'auto': bf16 where the device runs it natively, else fp32 (emulated bf16 on an AVX2
    # CPU made a CoMAE pass ~3x slower here).
    amp = resolve_precision(cfg.precision, device)
    fp = export_fingerprint(store, made_by, cfg, device, amp, estimator)
    n, N = len(store), store.num_tokens
    units = -(-n // cfg.samples_per_shard)
    fields = fields_for(cfg)

    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        fp_path = out / WORK / "fingerprint.json"
        old = read_json(fp_path).get("fingerprint") if fp_path.exists() else None
        if old != fp:
            _reset(out)
            atomic_write_json(fp_path, {"fingerprint": fp})
        if not all((out / shard_name(u)).exists() for u in range(units)):
            # The set is about to change: it is unfinished until the new manifest is written.
            (out / MANIFEST).unlink(missing_ok=True)
    barrier()

    mine = units_for_rank(units, info)
    todo = [u for u in mine if not _shard_ok(out / shard_name(u), _keys(store, u, cfg), fields, N)]
    result = SplitResult(split, n, units, len(todo))
    if todo:
        was_training = getattr(model, "training", False)
        if hasattr(model, "eval"):
            model.eval()
        bar = progress(total=sum(len(_keys(store, u, cfg)) for u in todo), desc=f"orders {split}",
                       unit="img")
        for u in todo:
            st = export_unit(store, model, cfg, u, out, device, amp)
            result.images_computed += st["images"]
            result.seconds += st["seconds"]
            bar.update(st["images"])
        bar.close()
        if was_training and hasattr(model, "train"):
            model.train()
    barrier()

    if info.is_main:
        class_meta = write_class_orders(out, store, cfg, fields, units) if class_orders else None
        write_manifest(out, store, {"estimator": estimator, estimator: made_by}, cfg, split, fp,
                       fields, units, class_meta)
    barrier()
    result.stats = collect_stats(out, units)
    return result


def _keys(store: Any, unit: int, cfg: OrdersConfig) -> list[str]:
    a, b = unit_rows(unit, len(store), cfg.samples_per_shard)
    return list(store.keys[a:b])


def write_manifest(out: Path, store: Any, made_by: dict[str, Any], cfg: OrdersConfig, split: str,
                   fp: str, fields: list[str], units: int, class_meta: dict | None) -> dict:
    shards = []
    for u in range(units):
        a, b = unit_rows(u, len(store), cfg.samples_per_shard)
        p = out / shard_name(u)
        if not p.exists():
            raise ShardError(f"shard {p.name} is missing after every rank finished")
        shards.append({"name": p.name, "start": a, "count": b - a, "bytes": p.stat().st_size,
                       "sha256": sha256_file(p)})
    ident = store.identity
    manifest = {
        "format": FORMAT,
        "split": split,
        "count": len(store),
        "grid": store.grid,
        "num_tokens": store.num_tokens,
        "order_dtype": order_dtype(store.num_tokens).name,
        "fields": fields,
        "flip": cfg.flip,
        "samples_per_shard": cfg.samples_per_shard,
        "keys": list(store.keys),
        "labels": [int(x) for x in store.labels],
        "classes": list(store.classes),
        "shards": shards,
        "identity": {"latents": ident, "tokenizer": ident.get("tokenizer"), **made_by},
        "params": shard_params(cfg),
        "fingerprint": fp,
        "class_orders": class_meta,
    }
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def write_class_orders(out: Path, store: Any, cfg: OrdersConfig, fields: list[str],
                       units: int) -> dict[str, Any]:
    """Each class's mean PageRank scores over its images (unflipped) → a class-level order.

    Read back from the finished shards, so every rank's work counts. A class with no images
    gets uniform scores, hence the identity order (ties → lower index).
    """
    N, C = store.num_tokens, len(store.classes)
    odt = order_dtype(N)
    total = np.zeros((C, N), np.float64)
    count = np.zeros(C, np.int64)
    for u in range(units):
        a, b = unit_rows(u, len(store), cfg.samples_per_shard)
        name = shard_name(u)
        parsed = parse_shard((out / name).read_bytes(), store.keys[a:b], fields, N, odt, name)
        for r in range(a, b):
            c = int(store.labels[r])
            total[c] += parsed[store.keys[r]]["scores"]
            count[c] += 1
    mean = np.where(count[:, None] > 0, total / np.maximum(count, 1)[:, None], 1.0 / N)
    for name, arr in ((CLASS_ORDERS, collapse_order(mean).astype(odt)),
                      (CLASS_SCORES, mean.astype(np.float32))):
        with atomic_path(out / name) as tmp, open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
    return {"orders": CLASS_ORDERS, "orders_sha256": sha256_file(out / CLASS_ORDERS),
            "scores": CLASS_SCORES, "scores_sha256": sha256_file(out / CLASS_SCORES),
            "images_per_class": count.tolist()}


def collect_stats(out: Path, units: int) -> dict[str, Any]:
    """Aggregate the per-shard side statistics (whichever run or rank wrote them)."""
    flip, topk, secs, imgs = [], [], 0.0, 0
    for u in range(units):
        p = out / WORK / f"{shard_name(u)}.json"
        if not p.exists():  # a shard made by another tool or copied in: no side stats
            continue
        st = read_json(p)
        flip += st["flip_tau"]
        topk += st["topk_tau"]
        secs += st["seconds"]
        imgs += st["images"]

    def summary(v: list[float]) -> dict[str, float] | None:
        return {"mean": float(np.mean(v)), "min": float(np.min(v)), "n": len(v)} if v else None

    return {"flip_tau_computed_vs_mapped": summary(flip), "topk_tau_vs_dense": summary(topk),
            "images_per_s_when_computed": imgs / secs if secs > 0 else None}
