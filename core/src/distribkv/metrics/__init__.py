"""The node's metrics, ``GET /metrics`` in the Prometheus text format.

- :mod:`~distribkv.metrics.counts`: what the node counts while it serves (plain numbers, cheap
  enough for every request);
- :mod:`~distribkv.metrics.collector`: the ``prometheus_client`` collector that reads those
  counts and the node's state (roles, replication, storage, reshard) when it is scraped;
- :mod:`~distribkv.metrics.exposition`: the ``/metrics`` resource, and the optional listener
  of its own (``[server] metrics_port``).

Nothing here imports ``prometheus_client`` until a node builds its registry.
"""
