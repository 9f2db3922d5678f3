"""Latents joined with their collapse orders: the training data of CMAR (``train_cmar``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.orders.shards import CollapseOrders, ShardError


class OrderedTokenDataset(torch.utils.data.Dataset):
    """Latents joined with their collapse orders by key (row order = the latent store's).

    item → ``"tokens"``, ``"tokens_flip"`` (float32 tensors [dim, h, w], scaled posterior
    means, as ``TokenGridDataset``), ``"order"``, ``"order_flip"`` (int64 tensors [N]),
    ``"label"`` (int), ``"index"`` (the store row). Refuses orders of another grid, and of
    another tokenizer unless ``allow_mismatch``.
    """

    def __init__(self, store: Any, orders: CollapseOrders, allow_mismatch: bool = False) -> None:
        orders.check_compatible(store, allow_mismatch=allow_mismatch)
        if "flip_order" not in orders.fields:
            raise ShardError(f"{orders.path} holds no flipped orders")
        self.store, self.orders = store, orders
        missing = [k for k in store.keys if k not in orders._index]
        if missing:
            raise ShardError(f"{len(missing)} latent keys have no collapse order in {orders.path} "
                             f"(first: {missing[0]!r})")
        self._rows = np.array([orders._index[k] for k in store.keys], dtype=np.int64)
        self._order = orders.order_table()[self._rows]  # [n, N], store row order
        self._order_flip = orders.order_table(flip=True)[self._rows]

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "tokens": self.store.tokens([i])[0],
            "tokens_flip": self.store.tokens([i], flip=True)[0],
            "order": torch.from_numpy(self._order[i].astype(np.int64)),
            "order_flip": torch.from_numpy(self._order_flip[i].astype(np.int64)),
            "label": int(self.store.labels[i]),
            "index": int(i),
        }
