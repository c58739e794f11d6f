"""Exceptions raised by the KV-transfer layer.

Every error derives from :class:`TransferError`, so callers can catch the family.
Messages name the offending peer, block id, field or timeout. Each class carries a
:class:`FailureReason` (``reason``): callers branch on it, never on message text.
"""

from __future__ import annotations

from enum import StrEnum


class FailureReason(StrEnum):
    """Why a KV load or push failed; the values are the ``reason`` label values of
    ``pd_connector_failures_total`` and the ``pd_transfer.error`` of a decode answer."""

    BAD_PARAMS = "bad_params"
    FOREIGN_HOST = "foreign_host"
    EXPIRED = "expired"
    MISMATCH = "mismatch"
    UNREACHABLE = "unreachable"
    UNKNOWN_ENGINE = "unknown_engine"
    BLOCK_RANGE = "block_range"
    TRANSFER = "transfer_failed"
    TIMEOUT = "timeout"
    ABORTED = "aborted"

    @classmethod
    def parse(cls, text: str, default: "FailureReason | None" = None) -> "FailureReason":
        """The reason named ``text`` (e.g. from a peer's notification); ``default``
        (``TRANSFER``) for anything else, so the label set stays bounded."""
        try:
            return cls(text)
        except ValueError:
            return default or cls.TRANSFER


def reason_of(exc: BaseException) -> FailureReason:
    """The :class:`FailureReason` an exception carries (``TRANSFER`` if none)."""
    r = getattr(exc, "reason", None)
    return r if isinstance(r, FailureReason) else FailureReason.TRANSFER


class TransferError(Exception):
    """Base class of all transfer-layer errors."""

    reason: FailureReason = FailureReason.TRANSFER


class ReasonError(TransferError, ValueError):
    """A refusal with an explicit ``reason`` (bad params, a peer we cannot use)."""

    def __init__(self, reason: FailureReason, msg: str) -> None:
        self.reason = FailureReason(reason)
        super().__init__(msg)


class ParamsError(ReasonError):
    """Invalid or unusable ``kv_transfer_params``."""

    def __init__(self, reason: FailureReason, msg: str) -> None:
        super().__init__(reason, f"{FailureReason(reason)}: {msg}")


class PeerRefused(ReasonError):
    """A handshake answer this worker cannot use (other engine, unsliceable TP)."""


class UnknownPeerError(TransferError, KeyError):
    """A transfer or lookup named a peer that was never added (or was removed)."""

    def __init__(self, peer: str, known: list[str] | None = None) -> None:
        self.peer = peer
        msg = f"unknown peer {peer!r}"
        if known is not None:
            msg += f" (known peers: {sorted(known)})"
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class BlockIdError(TransferError, ValueError):
    """Block ids out of range, duplicated, or local/remote lists of different length."""

    reason = FailureReason.BLOCK_RANGE


class UnregisteredMemoryError(TransferError):
    """A transfer touches memory that no region registration covers."""


class TransferFailedError(TransferError):
    """The backend reported a failed transfer (peer gone, backend error, ...)."""


class TransferTimeoutError(TransferError, TimeoutError):
    """A wait ran past its explicit timeout."""

    reason = FailureReason.TIMEOUT


class HandshakeError(TransferError):
    """The control-plane handshake failed (peer unreachable, bad reply)."""

    reason = FailureReason.UNREACHABLE


class HandshakeMismatchError(HandshakeError):
    """The peers disagree on a field that must match (model, dtype, block size, ...)."""

    reason = FailureReason.MISMATCH

    def __init__(self, field: str, local: object, remote: object) -> None:
        self.field = field
        self.local = local
        self.remote = remote
        super().__init__(
            f"handshake mismatch on field {field!r}: local={local!r} remote={remote!r}"
        )


class BackendUnavailableError(TransferError):
    """The requested backend (NIXL, CUDA IPC, Triton) cannot be used here."""
