"""PNG plots for ``pdbench e2e`` (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = {"agg": "tab:blue", "agg-sc": "tab:cyan", "pd-ours": "tab:green", "pd-ours-ft": "tab:olive", "pd-stock": "tab:orange",
          "pd": "tab:purple"}


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'pdsidecar[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ok(result: dict[str, Any]):
    for name, c in result["configs"].items():
        if c.get("status") == "ok":
            yield name, c


def _all_requests(c: dict[str, Any]) -> list[dict[str, Any]]:
    rs = [r for r in c.get("requests", []) if r.get("error") is None]
    if c.get("sweep"):
        rs += [r for r in c["sweep"].get("requests", []) if r.get("error") is None]
    return rs


def _cdf(ax, values: list[float], label: str, color: str | None) -> None:
    import numpy as np

    if not values:
        return
    v = np.sort(np.asarray(values) * 1000)
    ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=label, color=color)


def write_plots(result: dict[str, Any], out_dir: str) -> list[str]:
    plt = _plt()
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    title = result.get("meta", {}).get("title", "pdbench e2e")
    files = []

    # 1. TTFT vs prompt tokens
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, c in _ok(result):
        rs = _all_requests(c)
        ax.scatter([r["prompt_tokens"] for r in rs], [r["ttft_s"] * 1000 for r in rs], s=14, alpha=0.7,
                   label=name, color=COLORS.get(name))
        fit = (c.get("sweep") or {}).get("fit_ttft")
        if fit:
            xs = [min(r["prompt_tokens"] for r in rs), max(r["prompt_tokens"] for r in rs)]
            ax.plot(xs, [(fit["slope"] * x + fit["intercept"]) * 1000 for x in xs], color=COLORS.get(name),
                    lw=1, ls="--")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title(f"TTFT vs prompt length — {title}", fontsize=9)
    ax.grid(alpha=0.3)
    _legend(ax)
    files.append(_save(fig, d / "ttft_vs_prompt.png", plt))

    # 2. transfer GB/s vs KV bytes (per request where measured alone; else the run's mean)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    any_pt = False
    from bench.e2e_report import is_push

    for name, c in _ok(result):
        if not name.startswith("pd") or is_push(name, c):  # our push's KV tail is not a transfer time
            continue
        pts = [(r["kv_bytes"], r["kv_bytes"] / r["kv_seconds"] / 1e9) for r in _all_requests(c)
               if r.get("kv_bytes") and r.get("kv_seconds")]
        marker = "o"
        if not pts:
            k = c.get("kv", {})
            if k.get("bytes_per_request") and k.get("gbps"):
                pts, marker = [(k["bytes_per_request"], k["gbps"])], "s"
        if pts:
            any_pt = True
            ax.scatter([p[0] / 1e6 for p in pts], [p[1] for p in pts], s=18, marker=marker, alpha=0.7,
                       label=name, color=COLORS.get(name))
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("KV bytes per request (MB, log)")
    ax.set_ylabel("transfer GB/s")
    ax.set_title(f"KV transfer throughput vs size — {title}", fontsize=9)
    ax.grid(alpha=0.3)
    if any_pt:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no KV transfer figures reported", ha="center", transform=ax.transAxes)
    files.append(_save(fig, d / "transfer_gbps_vs_bytes.png", plt))

    # 3. CDFs of TTFT and ITL (measured workload only; ITL of the short, decode-heavy requests)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, c in _ok(result):
        rs = [r for r in c.get("requests", []) if r.get("error") is None]
        _cdf(axes[0], [r["ttft_s"] for r in rs], name, COLORS.get(name))
        short = [r for r in rs if r["cls"] == "short"] or rs
        _cdf(axes[1], [x for r in short for x in r.get("itl_s", [])], name, COLORS.get(name))
    axes[0].set_xlabel("TTFT (ms)")
    axes[1].set_xlabel("inter-token latency of short requests (ms, log)")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel("fraction of requests / tokens")
        ax.grid(alpha=0.3)
        _legend(ax)
    fig.suptitle(f"CDFs — {title}", fontsize=9)
    files.append(_save(fig, d / "cdf_ttft_itl.png", plt))
    return files


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def _save(fig, path: Path, plt) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
