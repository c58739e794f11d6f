"""Shared fixtures: tiny models built once, real vLLM engines shared across the suite."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from pdsidecar.dev.engines import EnginePool, pd_pair_configs, stock_nixl_config, vllm_available
from pdsidecar.dev.tiny_models import ensure_model

# Every NIXL agent in the suite's subprocesses (stock vLLM engines included) polls with a
# delay instead of busy-polling a core: see tests/nixl_quiet/sitecustomize.py.
os.environ.setdefault("PDSIDECAR_TEST_NIXL_DELAY_US", "100")
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(Path(__file__).parent / "nixl_quiet")]
    + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


def pytest_collection_modifyitems(config, items):
    """Real-engine tests get one retry: on a 2-core machine an engine can be starved for
    seconds by its neighbour. A test that fails twice fails the suite."""
    if not config.pluginmanager.hasplugin("rerunfailures"):
        return
    for item in items:
        if item.get_closest_marker("engines") and not item.get_closest_marker("flaky"):
            item.add_marker(pytest.mark.flaky(reruns=1, reruns_delay=5))


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


CACHE = Path(os.environ.get("PDSIDECAR_CACHE", Path.home() / ".cache" / "pdsidecar"))


@pytest.fixture(scope="session")
def llama_dir() -> str:
    return str(ensure_model("llama", CACHE / "models" / "tiny-llama"))


@pytest.fixture(scope="session")
def mixtral_dir() -> str:
    return str(ensure_model("mixtral", CACHE / "models" / "tiny-mixtral"))


@pytest.fixture(scope="session")
def engine_pool(tmp_path_factory):
    if not vllm_available():
        pytest.skip("vLLM is not installed")
    # A SIGTERM (e.g. a CI timeout) becomes KeyboardInterrupt, so pytest still tears the
    # pool down: engines run in their own sessions and would outlive pytest otherwise.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    pool = EnginePool(max_groups=2)
    pool.log_dir = str(tmp_path_factory.mktemp("engine-logs"))
    yield pool
    pool.close()


@pytest.fixture
def stock_pair(engine_pool, llama_dir):
    """(prefill, decode) vLLM engines with the stock NixlConnector, tiny Llama.

    The prefill engine also serves as the aggregated reference (no kv_transfer_params).
    """
    return engine_pool.get(
        "stock-llama",
        lambda: pd_pair_configs(llama_dir, stock_nixl_config(), stock=True, log_dir=engine_pool.log_dir),
    )


@pytest.fixture(scope="session")
def vllm_parse():
    """vLLM's own `serve` argument parser (skips where vLLM is not installed)."""
    from pdsidecar.k8s import validate as k8s_validate

    pytest.importorskip("vllm", reason="vllm not installed")
    try:
        k8s_validate._vllm_parser()
    except ImportError as e:  # pragma: no cover
        pytest.skip(f"vllm argument parser not importable: {e}")
    return k8s_validate.parse_vllm_args
