"""The CUDA-IPC handle message: plain bytes, strictly checked, never unpickled."""

import pickle

import pytest

from transfer import ipc_handles as ih

UUID = bytes(range(16))


def _exports(n=3):
    return [ih.IpcExport(0x7f00_0000_0000 + i * 2 ** 30, 2 ** 30, 512 * i, bytes([i]) * 64)
            for i in range(n)]


def test_round_trip():
    raw = ih.encode(UUID, _exports())
    assert ih.decode(raw) == (UUID, _exports())


@pytest.mark.parametrize("mutate", [
    lambda r: r[:-1],                      # truncated
    lambda r: r + b"\0",                   # trailing bytes
    lambda r: b"XXXXX" + r[5:],            # magic
    lambda r: r[:5] + b"\x02\x00" + r[7:],  # version
    lambda r: r[:23] + b"\xff\xff" + r[25:],  # count beyond the data
    lambda r: r[:23] + b"\x00\x00" + r[25:],  # zero entries
    lambda r: b"",
])
def test_malformed_messages_are_refused(mutate):
    with pytest.raises(ih.IpcHandleError):
        ih.decode(mutate(ih.encode(UUID, _exports())))


def test_a_pickle_is_not_a_handle_message():
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('executed')",))
    with pytest.raises(ih.IpcHandleError):
        ih.decode(pickle.dumps([Boom()]))


def test_zero_length_export_refused():
    e = ih.IpcExport(0x1000, 1, 0, b"\0" * 64)
    raw = bytearray(ih.encode(UUID, [e]))
    raw[25 + 8:25 + 16] = b"\0" * 8  # nbytes = 0
    with pytest.raises(ih.IpcHandleError):
        ih.decode(bytes(raw))


def test_encode_checks_sizes():
    with pytest.raises(ValueError):
        ih.encode(b"short", _exports())
    with pytest.raises(ValueError):
        ih.encode(UUID, [ih.IpcExport(1, 1, 0, b"\0" * 63)])
    with pytest.raises(ValueError):
        ih.encode(UUID, [])
