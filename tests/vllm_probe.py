"""Run in a subprocess whose PYTHONPATH starts with one vLLM release's Python sources:
what of vLLM the connector needs imports there, and does ``transfer.connector`` load?

Prints one JSON object: ``{"vllm": version, "failures": {what: error line}, "hooks": [...]}``.
``tests/test_connector_vllm_versions.py`` drives it (no engine, no compiled vLLM code).
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys

# (module, name) pairs the connector modules import from vLLM, lazily or at load
# (KVConnectorTransferResults, 0.27+, is optional: transfer/vllm_compat.py stands in).
NEEDED = [
    ("vllm.distributed.kv_transfer.kv_connector.v1.base", "KVConnectorBase_V1"),
    ("vllm.distributed.kv_transfer.kv_connector.v1.base", "KVConnectorRole"),
    ("vllm.distributed.kv_transfer.kv_connector.v1.base", "KVConnectorMetadata"),
    ("vllm.distributed.kv_transfer.kv_connector.v1.base", "KVConnectorHandshakeMetadata"),
    ("vllm.distributed.kv_transfer.kv_connector.v1.base", "KVConnectorWorkerMetadata"),
    ("vllm.distributed.kv_transfer.kv_connector.v1.metrics", "KVConnectorStats"),
    ("vllm.distributed.kv_transfer.kv_connector.v1.metrics", "KVConnectorPromMetrics"),
    ("vllm.v1.metrics.utils", "create_metric_per_engine"),
    ("vllm.distributed.parallel_state", "get_tensor_model_parallel_rank"),
    ("vllm.distributed.parallel_state", "get_tensor_model_parallel_world_size"),
    ("vllm.v1.request", "Request"),
]


def _line(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:300]


def main() -> None:
    out: dict = {"failures": {}, "hooks": []}
    try:
        import vllm

        out["vllm_file"] = vllm.__file__
        try:
            from vllm._version import __version__ as version
        except Exception:  # noqa: BLE001
            version = getattr(vllm, "__version__", "?")
        out["vllm"] = version
    except Exception as e:  # noqa: BLE001
        out["failures"]["import vllm"] = _line(e)
        print(json.dumps(out))
        return
    for module, name in NEEDED:
        try:
            getattr(importlib.import_module(module), name)
        except Exception as e:  # noqa: BLE001
            out["failures"][f"from {module} import {name}"] = _line(e)
    try:
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

        out["hooks"] = sorted(n for n, _ in inspect.getmembers(KVConnectorBase_V1, inspect.isfunction)
                              if not n.startswith("_"))
    except Exception:  # noqa: BLE001 - reported above
        pass
    out["native_transfer_results"] = False
    try:
        from vllm.distributed.kv_transfer.kv_connector.v1 import base

        out["native_transfer_results"] = hasattr(base, "KVConnectorTransferResults")
    except Exception:  # noqa: BLE001 - reported above
        pass
    try:
        from transfer.vllm_compat import check_vllm_version

        check_vllm_version()  # the connector's own load-time range check, on vllm.__version__
    except ImportError:
        pass  # a tree without transfer/vllm_compat.py
    except Exception as e:  # noqa: BLE001
        out["failures"]["transfer.vllm_compat.check_vllm_version()"] = _line(e)
    try:
        import transfer.connector as connector

        missing = sorted(getattr(connector.PdConnector, "__abstractmethods__", ()))
        if missing:
            out["failures"]["PdConnector abstract methods"] = "not implemented: " + ", ".join(missing)
    except Exception as e:  # noqa: BLE001
        out["failures"]["import transfer.connector"] = _line(e)
    # the connector's metadata/stats modules fall back to stand-ins without vLLM: say so
    for module, name in (("transfer.connector.metadata", "KVConnectorMetadata"),
                         ("transfer.connector.stats", "KVConnectorStats")):
        try:
            cls = getattr(importlib.import_module(module), name)
            if not cls.__module__.startswith("vllm."):
                out["failures"][f"{module} uses vLLM's {name}"] = f"stand-in from {cls.__module__}"
        except Exception as e:  # noqa: BLE001
            out["failures"][f"import {module}"] = _line(e)
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
