"""The NetworkPolicies open a fixed UCX TCP range; a real NIXL/UCX agent must stay in it.

``pdsidecar inject`` sets ``UCX_TCP_PORT_RANGE`` (default 14700-14799) on the vLLM
containers; ``deploy/base/networkpolicies.yaml`` opens exactly that range between the
prefill and decode pods. Without the variable UCX listens on random ports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pdsidecar.k8s.inject_options import DEFAULT_UCX_TCP_PORT_RANGE

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, numpy as np, psutil
from transfer.layout import Region
from transfer.nixl_engine import NixlTransferEngine
e = NixlTransferEngine('ucx-range-probe')
buf = np.zeros(4 * 4096, dtype=np.uint8)
e.register_regions([Region('l0', buf.ctypes.data, 4096, 4096, 4, layer=0)], 'DRAM')
print(json.dumps(sorted({c.laddr.port for c in psutil.Process().net_connections(kind='tcp')
                         if c.status == 'LISTEN'})))
e.close()
"""


def _listen_ports(env_extra: dict[str, str]) -> list[int]:
    env = dict(os.environ, UCX_TLS="tcp,self", PYTHONPATH=str(ROOT), **env_extra)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_ucx_tcp_listeners_stay_in_the_policy_range():
    lo, hi = (int(x) for x in DEFAULT_UCX_TCP_PORT_RANGE.split("-"))
    ports = _listen_ports({"UCX_TCP_PORT_RANGE": DEFAULT_UCX_TCP_PORT_RANGE})
    assert ports and all(lo <= p <= hi for p in ports), ports
    policy = (ROOT / "deploy" / "base" / "networkpolicies.yaml").read_text()
    assert f"port: {lo}\n          endPort: {hi}" in policy
