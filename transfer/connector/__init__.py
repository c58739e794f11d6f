"""pdsidecar's vLLM KV connector (``kv_connector_module_path: transfer.connector``,
``kv_connector: PdConnector``), one module per role and mode:

==================  ==========================================================
``connector``       ``PdConnector``: the class vLLM loads; dispatches to a half
``scheduler``       scheduler half (engine core): ``base_`` / ``pull_`` / ``push_scheduler``
``worker``          worker half (one per TP rank): ``base_`` / ``pull_`` / ``push_worker``
``config``          ``PdConfig`` (``kv_connector_extra_config``)
``metadata``        request params, scheduler <-> worker metadata, handshake payload
``stats``           connector stats and ``pd_connector_*`` Prometheus families
``control_client``  control-plane client side: auth, notifications, server start
``tp_mapping``      heterogeneous TP: which remote heads/bytes each rank reads
==================  ==========================================================

Import-cheap: ``PdConnector`` (and with it vLLM) is imported on first access.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PdConnector"]


def __getattr__(name: str) -> Any:
    if name == "PdConnector":
        from .connector import PdConnector
        return PdConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
