"""Test-only: a progress-thread delay for every NIXL agent in the test's subprocesses.

NIXL's Python API creates agents with ``pthrDelay = 0``, so each agent's UCX progress
thread busy-polls a core even when idle. Our connector sets a delay itself
(``transfer.nixl_engine``); vLLM's stock NixlConnector cannot be told to. On the
2-core CI machine two idle stock engines would keep both cores busy and starve
every other test, so ``tests/conftest.py`` puts this folder on ``PYTHONPATH`` with
``PDSIDECAR_TEST_NIXL_DELAY_US`` set. It changes how often the progress thread
polls, nothing about what the connector does. Benchmarks run stock as shipped.
"""

import importlib.abc
import importlib.machinery
import os
import sys

_DELAY = os.environ.get("PDSIDECAR_TEST_NIXL_DELAY_US", "")
_TARGETS = {"nixl_cu12._api", "nixl_cu13._api"}


class _PatchNixlAgent(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """After ``nixl_cu1x._api`` is imported, wrap its agent constructor."""

    def find_spec(self, name, path, target=None):
        if name not in _TARGETS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        self._inner = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        bind = module.nixlBind
        original = bind.nixlAgent
        delay = int(_DELAY)

        def make_agent(name, cfg):
            if getattr(cfg, "pthrDelay", 1) == 0:
                cfg.pthrDelay = delay
            return original(name, cfg)

        bind.nixlAgent = make_agent


if _DELAY.isdigit() and int(_DELAY) > 0:
    import importlib.util  # noqa: F401  (used by find_spec)

    sys.meta_path.insert(0, _PatchNixlAgent())
