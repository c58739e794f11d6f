"""Exceptions raised by the KV-transfer layer.

Every error derives from :class:`TransferError`, so callers can catch the family.
Messages name the offending peer, block id, field or timeout.
"""

from __future__ import annotations


class TransferError(Exception):
    """Base class of all transfer-layer errors."""


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


class UnregisteredMemoryError(TransferError):
    """A transfer touches memory that no region registration covers."""


class TransferFailedError(TransferError):
    """The backend reported a failed transfer (peer gone, backend error, ...)."""


class TransferTimeoutError(TransferError, TimeoutError):
    """A wait ran past its explicit timeout."""


class HandshakeError(TransferError):
    """The control-plane handshake failed (peer unreachable, bad reply)."""


class HandshakeMismatchError(HandshakeError):
    """The peers disagree on a field that must match (model, dtype, block size, ...)."""

    def __init__(self, field: str, local: object, remote: object) -> None:
        self.field = field
        self.local = local
        self.remote = remote
        super().__init__(
            f"handshake mismatch on field {field!r}: local={local!r} remote={remote!r}"
        )


class BackendUnavailableError(TransferError):
    """The requested backend (NIXL, CUDA IPC, Triton) cannot be used here."""
