"""Same-host proof for the handshake: "same host" is proven, never claimed.

``host_id`` (hostname + boot id) in a handshake is only a claim. A peer is treated
as being on this host only if it proves knowledge of this host's *host key*: 32
random bytes in ``$PD_HOSTKEY_DIR`` (default ``/dev/shm``, else the temp dir),
file ``pd-hostkey-v1-<uid>``, mode 0600, created once (atomically) by the first
process that needs it. Only a process that can read that file (same machine, same
``/dev/shm`` mount, same user) can compute

    HMAC(host key, "pd-host-v1" | role | boot id | challenge | digest of its message)

where ``challenge`` is a fresh nonce chosen by the verifier (the initiator's
``host_challenge``; the target answers with a proof bound to it) and the digest
covers the rest of the sender's ``RankInfo``, so a proof cannot be moved to other
content. The boot id (``/proc/sys/kernel/random/boot_id``) binds it to this kernel
boot. In Kubernetes ``/dev/shm`` is per pod, so "same host" means "same pod" (or
pods sharing the host's ``/dev/shm``) — the scope in which CUDA IPC is used anyway.

The final check for CUDA IPC remains that the peer's IPC handle actually opens on
this device; this proof only decides whether to try.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import tempfile
import threading

ENV_DIR = "PD_HOSTKEY_DIR"
KEY_LEN = 32
CHALLENGE_LEN = 16
ROLE_INITIATOR = b"initiator"
ROLE_TARGET = b"target"

_lock = threading.Lock()
_cache: dict[str, bytes | None] = {}


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def key_dir() -> str:
    d = os.environ.get(ENV_DIR, "")
    if d:
        return d
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def host_key(directory: str | None = None) -> bytes | None:
    """This host's key (created on first use); None if it cannot be read or made."""
    d = directory or key_dir()
    with _lock:
        if d in _cache:
            return _cache[d]
        path = os.path.join(d, f"pd-hostkey-v1-{os.getuid()}")
        key = _load_or_create(path)
        if key is None:
            logging.getLogger("vllm.pdsidecar.connector").warning(
                "PdConnector: no usable host key at %s (unwritable dir, or a file of another "
                "size or owner): no peer is recognised as being on this host, so CUDA IPC is "
                "not used (set %s to a private writable directory)", path, ENV_DIR)
        _cache[d] = key
        return key


def _load_or_create(path: str) -> bytes | None:
    for _ in range(3):
        try:
            with open(path, "rb") as f:
                key = f.read()
            if len(key) == KEY_LEN and os.stat(path).st_uid == os.getuid():
                return key
            return None  # wrong size or owner: never trust it
        except FileNotFoundError:
            pass
        except OSError:
            return None
        # write a temp file, then link() it into place: readers never see a partial key
        tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(KEY_LEN))
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process won the race: read theirs
        except OSError:
            return None
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return None


def new_challenge() -> bytes:
    return secrets.token_bytes(CHALLENGE_LEN)


def prove(role: bytes, challenge: bytes, content_digest: bytes,
          directory: str | None = None) -> bytes:
    """Our proof for ``role`` bound to ``challenge`` and ``content_digest`` (b"" if no key)."""
    key = host_key(directory)
    if key is None or len(challenge) != CHALLENGE_LEN:
        return b""
    return _mac(key, role, challenge, content_digest)


def verify(proof: bytes, role: bytes, challenge: bytes, content_digest: bytes,
           directory: str | None = None) -> bool:
    """True only if ``proof`` was made with this host's key for exactly these inputs."""
    key = host_key(directory)
    if key is None or not proof or len(challenge) != CHALLENGE_LEN:
        return False
    return hmac.compare_digest(_mac(key, role, challenge, content_digest), bytes(proof))


def _mac(key: bytes, role: bytes, challenge: bytes, digest: bytes) -> bytes:
    msg = b"|".join((b"pd-host-v1", role, boot_id().encode(), challenge, digest))
    return hmac.new(key, msg, hashlib.sha256).digest()


def digest(serialized: bytes) -> bytes:
    return hashlib.sha256(serialized).digest()
