"""vLLM version range and the 0.26-style failure reporting of PdConnector."""

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from transfer import vllm_compat  # noqa: E402
from transfer.connector.base_scheduler import external_ids as _external_ids  # noqa: E402


@pytest.mark.parametrize("v,ok", [("0.26.0", True), ("0.32.0+cpu", True), ("0.34.9", True),
                                  ("0.26.0rc1", True), ("0.25.2", False), ("0.35.0", False),
                                  ("1.0.0", False), ("", False), ("dev", False)])
def test_version_range(v, ok, monkeypatch):
    monkeypatch.delenv(vllm_compat.ENV_SKIP_CHECK, raising=False)
    if ok:
        vllm_compat.check_vllm_version(v)
    else:
        with pytest.raises(vllm_compat.UnsupportedVllmError) as e:
            vllm_compat.check_vllm_version(v)
        assert "\n" not in str(e.value) and "0.26.0 - 0.34.x" in str(e.value)


def test_override_env(monkeypatch):
    monkeypatch.setenv(vllm_compat.ENV_SKIP_CHECK, "1")
    vllm_compat.check_vllm_version("9.9.9")


def test_installed_vllm_is_in_range():
    vllm_compat.check_vllm_version()


def _blocks(ids):
    return SimpleNamespace(blocks=[[SimpleNamespace(block_id=i) for i in ids]])


@pytest.mark.parametrize("prompt,external,want", [
    (40, 40, [0, 1, 2]),        # nothing local: all 3 blocks (16 tokens each)
    (40, 8, [2]),               # 2 local blocks hit, the partial last one is external
    (48, 16, [2]),              # exact multiple
    (40, 0, []),
])
def test_external_ids(prompt, external, want):
    req = SimpleNamespace(num_prompt_tokens=prompt)
    assert _external_ids(req, _blocks([0, 1, 2]), external, 16) == want


class _Worker:
    def __init__(self, results):
        self.results = results

    def get_transfer_results(self, finished):
        return self.results.pop(0)

    def start_load_kv(self, meta):
        pass


def test_legacy_get_finished_reports_failed_blocks(monkeypatch):
    """On vLLM < 0.27 a failed load is finished *and* its blocks are load errors in the
    same step; a good load's blocks are not."""
    from transfer.connector import connector as c
    from transfer.connector.metadata import PdConnectorMetadata, RecvJob, PushRecvJob
    monkeypatch.setattr(c, "LEGACY_FAILURE_REPORTING", True)
    conn = object.__new__(c.PdConnector)
    conn._recv_block_ids, conn._load_error_blocks = {}, set()
    conn.connector_worker = _Worker([(set(), {"a", "b", "p"}, {"b", "p"}), (set(), set(), set())])
    meta = PdConnectorMetadata(recv={"a": RecvJob("a", None, [1, 2], [5, 6]),
                                     "b": RecvJob("b", None, [3, 4], [7, 8])},
                               push_recv={"p": PushRecvJob("p", "x", 1, local_ids=[9])})
    conn._connector_metadata = meta
    conn.start_load_kv(None)
    assert conn.get_finished(set()) == (None, {"a", "b", "p"})
    assert conn.get_block_ids_with_load_errors() == {3, 4, 9}
    assert conn.get_block_ids_with_load_errors() == set()
    assert conn.get_finished(set()) == (None, None)
    assert conn._recv_block_ids == {}
