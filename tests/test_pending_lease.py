"""One pending-KV lifetime: the prefill sidecar forgets handed-out KV at the engine's
lease, learnt per request from the params (a duration field, else the params' own
expiry time); no sidecar-side TTL (issues 15 and 16)."""

import pytest

from pdsidecar.config import ConfigError, load_config
from proxy.pending import UNREPORTED_LEASE_S, Pending, PendingKV, lease_hint


def test_lease_hint_reads_only_sane_numbers():
    assert lease_hint({"pd_kv_lease_s": 30}) == 30.0
    assert lease_hint({"kv_lease_s": 12.5, "pd_kv_lease_s": 30}) == 12.5
    for bad in (None, True, "30", -1, 0, float("nan"), 1e9):
        assert lease_hint({"pd_kv_lease_s": bad}) is None
    assert lease_hint({}) is None


def test_lease_hint_from_the_expiry_time_in_the_params():
    assert lease_hint({"remote_blocks_expiry_time": 1030.0}, now_wall=1000.0) == 30.0
    for bad in (999.0, None, "1030", float("inf"), True):
        assert lease_hint({"remote_blocks_expiry_time": bad}, now_wall=1000.0) is None
    # a duration field wins over the expiry time
    assert lease_hint({"pd_kv_lease_s": 6, "remote_blocks_expiry_time": 1030.0}, now_wall=1000.0) == 6.0


def test_pending_expires_at_the_engine_lease():
    kv = PendingKV()
    kv.add("short", Pending.from_params("peer", 10, {"pd_kv_lease_s": 20}, now=0.0))
    kv.add("plain", Pending.from_params("peer", 10, {}, now=0.0))  # a connector that says nothing
    kv.add("long", Pending.from_params("peer", 10, {"pd_kv_lease_s": 500}, now=0.0))
    assert kv.items[("peer", "plain")].lease_s == UNREPORTED_LEASE_S
    assert kv.expire(now=19.0) == 0
    assert kv.expire(now=21.0) == 1 and ("peer", "short") not in kv.items
    assert kv.expire(now=UNREPORTED_LEASE_S + 1) == 1 and ("peer", "plain") not in kv.items
    assert kv.expire(now=499.0) == 0 and ("peer", "long") in kv.items
    assert kv.expire(now=501.0) == 1 and not kv.items


def test_no_second_ttl_flag():
    with pytest.raises(ConfigError):
        load_config(["--role", "prefill", "--allow-unauthenticated", "--kv-ttl", "120"], {})
    cfg, _ = load_config(["--role", "prefill", "--allow-unauthenticated"], {"PDSIDECAR_KV_TTL": "120"})
    assert not hasattr(cfg, "kv_ttl_s")
