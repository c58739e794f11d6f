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


@pytest.mark.parametrize("extra", [{"kv_lease_s": 1}, "expiry"], ids=["lease-field", "expiry-field"])
async def test_prefill_sidecar_forgets_pending_kv_at_the_engines_lease(extra):
    """A real prefill sidecar: the pending entry (what routers read in /pd/v1/stats) ends
    at the lease the engine's params name, counted in pd_kv_expired_total."""
    import asyncio
    import json
    import time

    import aiohttp

    from proxy import auth
    from test_proxy_unit import TOKEN, post, stack, val

    if extra == "expiry":
        extra = {"remote_blocks_expiry_time": time.time() + 1.0}
    st = await stack(p_kw={"prefill_kv_extra": extra})
    try:
        me = f"127.0.0.1:{st.dec.port}"
        body = {"model": "m", "prompt": "x", "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
        s, _, _ = await post(st.pre.url + "/v1/completions", body,
                             {"x-request-id": "leg-1",
                              **auth.sign(TOKEN, me, "leg-1", "/v1/completions", json.dumps(body).encode())})
        assert s == 200

        async def pending() -> int:
            async with aiohttp.ClientSession() as c:
                async with c.get(st.pre.url + "/pd/v1/stats") as r:
                    return (await r.json())["pending"]["requests"]

        assert await pending() == 1
        assert st.pre.role.pending.items[(me, "leg-1")].lease_s <= 1.0
        for _ in range(150):  # bounded wait for the housekeeping loop (1 s period)
            if await pending() == 0:
                break
            await asyncio.sleep(0.1)
        assert await pending() == 0
        assert val(st.pre, "pd_kv_expired_total") == 1
    finally:
        await st.stop()
