"""Start-up hook for the engines the harness starts: see ``sitecustomize.py`` here.

``pdsidecar.dev.engines`` puts this folder (not the package) first on each engine's
``PYTHONPATH``; Python then imports its ``sitecustomize`` in every engine process.
"""
