"""The control channel (ipc/control.py): one message per packet with its
descriptors, EOF as ChannelClosed, and a message that cannot be read (the
two ends run different code) as BadMessage with its descriptors closed and
the channel still usable."""

from __future__ import annotations

import os
import pickle
import socket

import pytest

from ipc.control import BadMessage, Channel, ChannelClosed, pair


def test_messages_and_descriptors_arrive_whole_and_in_order():
    a, b = pair()
    ca, cb = Channel(a), Channel(b)
    r, w = os.pipe()
    try:
        ca.send({"cmd": "one", "n": 1})
        ca.send({"cmd": "two", "blob": b"x" * 100_000}, (r,))
        assert cb.recv() == ({"cmd": "one", "n": 1}, [])
        msg, fds = cb.recv()
        assert msg["cmd"] == "two" and len(msg["blob"]) == 100_000 and len(fds) == 1
        os.write(w, b"ok")
        assert os.read(fds[0], 2) == b"ok"  # the same pipe, received
        os.close(fds[0])
    finally:
        os.close(r)
        os.close(w)
        ca.close()
        cb.close()


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_message_that_cannot_be_read_is_skipped_and_the_channel_goes_on():
    a, b = pair()
    cb = Channel(b)
    r, w = os.pipe()
    try:
        # a pickle naming a module this process does not have, with a descriptor
        bad = b"cno_such_mod\nX\n."  # GLOBAL no_such_mod.X: ModuleNotFoundError
        before = open_fds()
        socket.send_fds(a, [bad], [r])
        with pytest.raises(BadMessage, match="same ringserve"):
            cb.recv()
        assert open_fds() == before  # the descriptor that came with it was closed
        a.send(pickle.dumps([1, 2]))
        with pytest.raises(BadMessage, match="not a dict"):
            cb.recv()
        Channel(a).send({"cmd": "after"})
        assert cb.recv() == ({"cmd": "after"}, [])
        a.close()
        with pytest.raises(ChannelClosed):
            cb.recv()
    finally:
        os.close(r)
        os.close(w)
        cb.close()
