"""``pdbench transfer``: result table, same-run ratios and the GB/s plot."""

from __future__ import annotations

from typing import Any


def _fmt_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def format_table(rows: list[dict[str, Any]]) -> str:
    hdr = (f"{'backend':<10}{'op':<6}{'mem':<5}{'layers':>6}{'block':>9}{'blocks':>7}"
           f"{'size':>10}{'descs':>7}{'GB/s':>9}{'avg us':>10}{'p50 us':>10}{'p99 us':>10}"
           f"{'prep us':>9}{'post us':>9}{'dev us':>9}{'dev GB/s':>9}")
    out = [hdr, "-" * len(hdr)]
    for r in rows:
        if "gbps" not in r:
            out.append(f"{r['backend']:<10}{r['op']:<6}{r['mem']:<5}{r['layers']:>6}"
                       f"{_fmt_size(r['block_bytes']):>9}{r['blocks']:>7}  FAILED: {r['error']}")
            continue
        out.append(
            f"{r['backend']:<10}{r['op']:<6}{r['mem']:<5}{r['layers']:>6}"
            f"{_fmt_size(r['block_bytes']):>9}{r['blocks']:>7}{_fmt_size(r['bytes']):>10}"
            f"{r['descriptors']:>7}{r['gbps']:>9.2f}{r['avg_us']:>10.1f}{r['p50_us']:>10.1f}"
            f"{r['p99_us']:>10.1f}{r['prepare_us']:>9.1f}{r['post_us']:>9.1f}"
            + (f"{r['device_us']:>9.1f}{r['device_gbps']:>9.1f}" if "device_us" in r else ""))
    return "\n".join(out)


def ratios(rows: list[dict[str, Any]]) -> list[str]:
    """Same-run ratios: our backends against raw NIXL (and torch) on equal shapes."""
    by = {(r["op"], r["layers"], r["block_bytes"], r["blocks"], r["backend"]): r
          for r in rows if "gbps" in r}
    lines = []
    for (op, l, bb, n, b), r in sorted(by.items()):
        if b not in ("nixl", "ipc", "ipc-torch"):
            continue
        for base in ("raw-nixl", "nixl", "torch", "memcpy"):
            if base == b:
                continue
            o = by.get((op, l, bb, n, base))
            if o:
                lines.append(f"{b}/{base} {op} L{l} {n}x{_fmt_size(bb)}: "
                             f"{r['gbps'] / o['gbps']:.2f}x bandwidth, p50 "
                             f"{r['p50_us']:.1f} vs {o['p50_us']:.1f} us")
    return lines


def plot(rows: list[dict[str, Any]], path: str) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"--plot: matplotlib is not installed (pip install matplotlib); {path} not written"
    fig, ax = plt.subplots(figsize=(8, 5))
    groups: dict[tuple, list] = {}
    for r in rows:
        if "gbps" in r:
            groups.setdefault((r["backend"], r["op"], r["layers"], r["block_bytes"]), []).append(r)
    for (b, op, l, bb), rs in sorted(groups.items()):
        rs.sort(key=lambda r: r["bytes"])
        ax.plot([r["bytes"] / 2**20 for r in rs], [r["gbps"] for r in rs], marker="o",
                label=f"{b} {op} L{l} {_fmt_size(bb)}")
    ax.set_xscale("log")
    ax.set_xlabel("request size (MiB)")
    ax.set_ylabel("GB/s")
    ax.legend(fontsize=6)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"plot written to {path}"
