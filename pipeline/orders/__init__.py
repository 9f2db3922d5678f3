"""Collapse orders: dependency matrices -> PageRank -> orders, as reusable webdataset shards.

Modules: ``pagerank`` (the maths), ``export`` (the batched stage work), ``shards`` (format,
writer and the ``CollapseOrders`` reader), ``fetch`` (download + verify), ``viz`` (Fig. 4/5).
"""
