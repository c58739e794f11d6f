"""``PdConnectorWorker``: the worker half vLLM calls (one per TP rank), running the
pull (:mod:`.pull_worker`) and push (:mod:`.push_worker`) parts in each step."""

from __future__ import annotations

import time

from .metadata import PdConnectorMetadata
from .pull_worker import PullWorker
from .push_worker import PushWorker


class PdConnectorWorker(PullWorker, PushWorker):
    """Worker half of the PdConnector, on ``transfer.TransferEngine``."""

    def start_load_kv(self, meta: PdConnectorMetadata | None) -> None:
        if meta is not None:
            self._start_pull(meta, time.monotonic())
            self._start_push(meta)
        self._advance_handshakes()
        if self._grants:
            self._advance_grants()

    def get_transfer_results(self, finished_req_ids: set[str]
                             ) -> tuple[set[str], set[str], set[str]]:
        """``(finished sending, finished receiving, failed receiving)`` request ids."""
        self._advance_handshakes()
        self._poll_pull()
        sending: set[str] = set()
        if self._sending or self._notifs or self._push_waiting:
            self._take_notifs()
            sending = self._poll_sending()
        if self._push_writes:
            sending |= self._poll_push_writes()
        recving, failed = self._done_recv, self._failed_recv
        self._done_recv, self._failed_recv = set(), set()
        if recving:
            now = time.monotonic()
            for rid in recving:
                r = self._results.get(rid)
                st = r.get("stages_ms") if r else None
                if st is not None:
                    st["done_seen_to_reported"] = round((now - st.pop("_t_done")) * 1e3, 3)
                    r["t_reported"] = now
        return sending, recving, failed
