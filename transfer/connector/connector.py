"""``PdConnector``: pdsidecar's vLLM KV-transfer connector (vLLM 0.26-0.34, KVConnectorBase_V1).

Load it with::

    --kv-transfer-config '{"kv_connector":"PdConnector",
        "kv_connector_module_path":"transfer.connector", "kv_role":"kv_both",
        "kv_load_failure_policy":"recompute",
        "kv_connector_extra_config":{"control_port":0,"protocol":"auto","kv_lease_s":30}}'

Import-cheap: this module only imports vLLM's base classes and our pure-Python
metadata; the scheduler half (gRPC, :mod:`.scheduler`) and the worker half (NIXL,
:mod:`.worker`) are imported when vLLM builds the role-specific instance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1 import base as _vllm_base
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1,
                                                                KVConnectorRole)

from ..vllm_compat import LEGACY_FAILURE_REPORTING, TransferResults, check_vllm_version
from .config import PdConfig
from .metadata import CONNECTOR_NAME, PdHandshakeMetadata

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

__all__ = ["PdConnector"]


def _dp_rank(parallel_config: Any) -> int:
    for attr in ("data_parallel_index", "data_parallel_rank"):
        v = getattr(parallel_config, attr, None)
        if isinstance(v, int):
            return v
    return 0


def _compat(vllm_config: "VllmConfig") -> dict[str, Any]:
    mc = vllm_config.model_config
    cc = vllm_config.cache_config
    dtype = cc.cache_dtype if cc.cache_dtype != "auto" else str(mc.dtype).removeprefix("torch.")
    archs = getattr(mc.hf_config, "architectures", None) or []
    layout = "HND"  # CPU backend: [blocks, heads, tokens, K|V] (head-major)
    if not str(getattr(vllm_config.device_config, "device_type", "cpu")).startswith("cpu"):
        try:
            from vllm.v1.attention.backends.utils import get_kv_cache_layout
            layout = str(get_kv_cache_layout())
        except Exception:
            pass
    return {"block_size": cc.block_size, "kv_layout": layout, "num_kv_heads": mc.get_total_num_kv_heads(),
            "head_size": mc.get_head_size(), "dtype": dtype,
            "is_mla": bool(getattr(mc, "use_mla", False)), "model": ",".join(archs)}


class PdConnector(KVConnectorBase_V1):
    """Prefill/decode KV transfer over ``transfer.TransferEngine`` (NIXL): pull (default)
    or per-request push with layer-wise WRITEs (``transfer_mode: "push"``)."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig | None" = None) -> None:
        check_vllm_version()
        super().__init__(vllm_config, role, kv_cache_config)
        # vLLM < 0.27 learns of failed loads only from block ids (see vllm_compat)
        self._recv_block_ids: dict[str, list[int]] = {}
        self._load_error_blocks: set[int] = set()
        ktc = vllm_config.kv_transfer_config
        self.cfg = PdConfig.from_extra(ktc.kv_connector_extra_config, kv_role=ktc.kv_role)
        pc = vllm_config.parallel_config
        self.engine_id = str(ktc.engine_id)
        if pc.pipeline_parallel_size > 1:
            raise ValueError("PdConnector: pipeline parallelism is not supported "
                             "(pipeline_parallel_size > 1)")
        if getattr(pc, "decode_context_parallel_size", 1) > 1:
            raise ValueError("PdConnector: decode context parallelism is not supported")
        if kv_cache_config is not None and len(kv_cache_config.kv_cache_groups) > 1:
            raise ValueError("PdConnector: models with several KV-cache groups (hybrid "
                             "attention) are not supported")
        self.connector_scheduler = None
        self.connector_worker = None
        if role == KVConnectorRole.SCHEDULER:
            from .scheduler import PdConnectorScheduler
            self.connector_scheduler = PdConnectorScheduler(
                self.cfg, engine_id=self.engine_id, block_size=vllm_config.cache_config.block_size,
                tp_size=pc.tensor_parallel_size, dp_rank=_dp_rank(pc))
        else:
            from vllm.distributed.parallel_state import (get_tensor_model_parallel_rank,
                                                         get_tensor_model_parallel_world_size)
            from .worker import PdConnectorWorker
            self.connector_worker = PdConnectorWorker(
                self.cfg, engine_id=self.engine_id, tp_rank=get_tensor_model_parallel_rank(),
                tp_size=get_tensor_model_parallel_world_size(), compat=_compat(vllm_config),
                dp_rank=_dp_rank(pc))

    # ============================================================ worker side
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self.connector_worker.register_kv_caches(kv_caches)

    def get_handshake_metadata(self) -> PdHandshakeMetadata | None:
        if self.connector_worker is None or self.connector_worker.engine is None:
            return None
        return PdHandshakeMetadata(self.connector_worker.desc)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._connector_metadata if self.has_connector_metadata() else None
        if LEGACY_FAILURE_REPORTING and meta is not None:
            for jobs in (meta.recv, meta.push_recv):
                for rid, job in jobs.items():
                    self._recv_block_ids[rid] = list(job.local_ids)
        self.connector_worker.start_load_kv(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any,
                      **kwargs: Any) -> None:
        meta = self._connector_metadata if self.has_connector_metadata() else None
        self.connector_worker.save_layer(layer_name, meta)

    def wait_for_save(self) -> None:
        meta = self._connector_metadata if self.has_connector_metadata() else None
        self.connector_worker.end_step(meta)

    def get_transfer_results(self, finished_req_ids: set[str]) -> Any:
        """vLLM >= 0.27: finished sending / receiving and failed receiving, by request."""
        s, r, f = self.connector_worker.get_transfer_results(finished_req_ids)
        return TransferResults(finished_sending=s, finished_recving=r, failed_recving=f)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """vLLM < 0.27 (no ``get_transfer_results``): a failed load is reported as
        finished here and its blocks through :meth:`get_block_ids_with_load_errors`
        in the same step, so vLLM recomputes them (``kv_load_failure_policy``)."""
        s, r, f = self.connector_worker.get_transfer_results(finished_req_ids)
        for rid in r:
            ids = self._recv_block_ids.pop(rid, ())
            if rid in f:
                self._load_error_blocks.update(ids)
        return s or None, r or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self._load_error_blocks = self._load_error_blocks, set()
        return out

    def build_connector_worker_meta(self) -> Any:
        return self.connector_worker.take_worker_meta()

    def get_kv_connector_stats(self) -> Any:
        if self.connector_worker is not None:
            return self.connector_worker.take_stats()
        if self.connector_scheduler is not None:
            return self.connector_scheduler.get_stats()
        return None

    # ============================================================ scheduler side
    def on_new_request(self, request: Any) -> None:
        self.connector_scheduler.on_new_request(request)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int
                                   ) -> tuple[int | None, bool]:
        return self.connector_scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any,
                                 num_external_tokens: int) -> None:
        self.connector_scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> Any:
        return self.connector_scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: Any) -> None:
        self.connector_scheduler.update_connector_output(connector_output)

    def request_finished(self, request: Any, block_ids: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:
        return self.connector_scheduler.request_finished(request, block_ids)

    def set_xfer_handshake_metadata(self, metadata: dict[int, Any]) -> None:
        if self.connector_scheduler is None:
            return
        self.connector_scheduler.set_workers_metadata(
            {int(k): v.desc for k, v in metadata.items() if isinstance(v, PdHandshakeMetadata)})

    def shutdown(self) -> None:
        for half in (self.connector_scheduler, self.connector_worker):
            if half is not None:
                half.shutdown()

    # ============================================================ class hooks
    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: "VllmConfig") -> str | None:
        return None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> Any:
        from .stats import PdConnectorStats
        return PdConnectorStats(data=dict(data) if data else {})

    @classmethod
    def build_prom_metrics(cls, vllm_config: "VllmConfig", metric_types: dict,
                           labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> Any:
        from .stats import PdPromMetrics
        return PdPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


assert PdConnector.__name__ == CONNECTOR_NAME
