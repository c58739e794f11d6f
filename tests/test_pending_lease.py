"""One pending-KV lifetime: the prefill sidecar forgets handed-out KV at the engine's
lease (``pd_kv_lease_s`` in the params) when that ends before ``--kv-ttl`` (issue 16)."""

from proxy.prefill import Pending, PendingKV, lease_hint


def test_lease_hint_reads_only_sane_numbers():
    assert lease_hint({"pd_kv_lease_s": 30}) == 30.0
    for bad in (None, True, "30", -1, 0, float("nan"), 1e9):
        assert lease_hint({"pd_kv_lease_s": bad}) is None
    assert lease_hint({}) is None


def test_pending_expires_at_the_engine_lease_or_the_ttl():
    kv = PendingKV()
    kv.add("short", Pending("peer", 10, 1, 100, created=0.0, lease_s=30.0))
    kv.add("plain", Pending("peer", 10, 1, 100, created=0.0))
    kv.add("long", Pending("peer", 10, 1, 100, created=0.0, lease_s=500.0))
    assert kv.expire(120.0, now=29.0) == 0
    assert kv.expire(120.0, now=31.0) == 1 and "short" not in kv.items
    assert kv.expire(120.0, now=121.0) == 2 and not kv.items
