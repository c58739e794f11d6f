"""``PdConnectorScheduler``: the scheduler half vLLM calls, dispatching each request to
its mode (pull: :mod:`.pull_scheduler`, push: :mod:`.push_scheduler`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..errors import FailureReason
from .metadata import is_push
from .pull_scheduler import PullScheduler
from .push_scheduler import PushScheduler

if TYPE_CHECKING:
    from vllm.v1.request import Request

log = logging.getLogger("vllm.pdsidecar.connector")


class PdConnectorScheduler(PullScheduler, PushScheduler):
    """Scheduler half of the PdConnector (engine-core process)."""

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int
                                   ) -> tuple[int | None, bool]:
        params = self._params(request)
        if params and params.get("do_remote_prefill"):
            return self._pull_matched_tokens(request, num_computed_tokens, params)
        if is_push(params) and params.get("do_remote_decode"):
            if self.cfg.transfer_mode != "push":
                log.warning("PdConnector: request %s asks for push mode, which this engine "
                            "does not accept (transfer_mode=%s)", request.request_id,
                            self.cfg.transfer_mode)
                params["do_remote_decode"] = False
                return 0, False
            return self._push_lookup_state(request)
        return 0, False

    def update_state_after_alloc(self, request: "Request", blocks: Any,
                                 num_external_tokens: int) -> None:
        params = self._params(request)
        if not params or not params.get("do_remote_prefill"):
            return
        params["do_remote_prefill"] = False  # one transfer per request
        if not is_push(params):
            self._pull_after_alloc(request, params, blocks, num_external_tokens)
        elif self.cfg.transfer_mode != "push":
            self._reject_load(request, blocks, num_external_tokens, None,
                              FailureReason.BAD_PARAMS,
                              "push mode not accepted (transfer_mode=pull)")
        else:
            self._register_push(request, params, blocks, num_external_tokens)

    def request_finished(self, request: "Request", block_ids: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:
        params = self._params(request)
        if not params:
            return False, None
        rid = request.request_id
        if is_push(params) and rid in self._push_out:
            return self._push_request_finished(request, params)
        if params.get("do_remote_prefill"):
            return False, self._pull_aborted_before_load(rid, params)
        if not params.get("do_remote_decode"):
            self._push_decode_finished(rid)  # a push still awaited: aborted
            return False, self._decode_finished(rid)
        return self._prefill_finished(request, block_ids)
