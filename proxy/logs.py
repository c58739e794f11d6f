"""Structured logs: one JSON object per line, with the request id.

Never log prompts, token ids, completions or secrets: callers pass only ids, sizes,
timings, statuses and peer addresses as `extra` fields.
"""

from __future__ import annotations

import json
import logging
import sys
import time

_STD = set(vars(logging.LogRecord("x", 0, "x", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in _STD and not k.startswith("_"):
                out[k] = v
        if record.exc_info and record.levelno >= logging.ERROR:
            out["exc"] = record.exc_info[0].__name__ if record.exc_info[0] else None
        return json.dumps(out, default=str)


def setup_logging(level: str = "info", fmt: str = "json", stream=None) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    h = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        h.setFormatter(JsonFormatter())
    else:
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root.addHandler(h)
    root.setLevel(level.upper())
    # aiohttp's own access log would print request lines with client addresses; ours is structured.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
