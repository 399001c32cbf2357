"""The byte link's two ends in-process: LinkHub (listener, tickets, handshakes) and LinkSocket frames."""
import socket
import time

import pytest
import torch

from shardps.proto.errors import NoLink
from shardps.runtime.link import ACK, FRAME, HELLO, MAGIC, LinkError, LinkSocket
from shardps.server.links import LinkHub

KEY = ("job", 0, 7)


@pytest.fixture
def hub():
    h = LinkHub("127.0.0.1", 0, idle_timeout=2.0, handshake_timeout=0.5, ticket_ttl=5.0, max_tickets=4,
                max_pending=2)
    yield h
    h.close()


def connect(hub: LinkHub, ticket: bytes, hello: bytes | None = None) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", hub.port), timeout=5)
    sock.sendall(HELLO.pack(MAGIC, ticket) if hello is None else hello)
    try:
        answer = sock.recv(1)
    except OSError:
        answer = b""
    return sock, answer


def bound(hub: LinkHub, key=KEY) -> LinkSocket:
    link = hub.take(key)
    hub.give(key, link)
    return link


def wait_for(what, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_a_ticket_binds_one_connection_to_its_key_and_frames_cross_both_ways(hub):
    sock, answer = connect(hub, hub.ticket(KEY))
    assert answer == ACK
    worker = LinkSocket(sock, 5.0)
    server = hub.take(KEY)
    grad = torch.arange(1000, dtype=torch.float32)
    worker.send(42, grad, time.monotonic() + 5)
    got = torch.empty(1000)
    server.receive(42, got, time.monotonic() + 5)
    assert torch.equal(got, grad)
    reply = torch.randn(1000).to(torch.bfloat16)
    server.send(43, reply, time.monotonic() + 5)
    back = torch.empty(1000, dtype=torch.bfloat16)
    worker.receive(43, back, time.monotonic() + 5)
    assert torch.equal(back, reply)
    hub.give(KEY, server)
    worker.close()


def test_a_ticket_is_good_once_and_an_unknown_or_malformed_hello_binds_nothing(hub):
    ticket = hub.ticket(KEY)
    first, ok = connect(hub, ticket)
    again, refused = connect(hub, ticket)
    forged, refused_too = connect(hub, b"\0" * 16)
    garbage, refused_three = connect(hub, b"", hello=b"GET / HTTP/1.1\r\n\r\n" + b"x" * 6)
    assert ok == ACK and refused == refused_too == refused_three == b""
    assert hub.links() == 1 and hub.refused >= 3
    for s in (first, again, forged, garbage):
        s.close()


def test_an_expired_ticket_is_refused():
    hub = LinkHub("127.0.0.1", 0, ticket_ttl=0.05)
    try:
        ticket = hub.ticket(KEY)
        time.sleep(0.2)
        sock, answer = connect(hub, ticket)
        assert answer == b"" and hub.links() == 0
        sock.close()
    finally:
        hub.close()


def test_a_hello_that_never_comes_is_dropped_after_the_handshake_timeout_and_holds_no_slot_for_ever(hub):
    silent = [socket.create_connection(("127.0.0.1", hub.port)) for _ in range(2)]  # both handshake slots
    trickle = socket.create_connection(("127.0.0.1", hub.port))
    trickle.settimeout(5)
    assert trickle.recv(1) == b""  # no slot left: closed at once
    for s in silent:  # closed by the server after its 0.5 s handshake timeout
        s.settimeout(5)
        assert s.recv(1) == b""
    sock, answer = connect(hub, hub.ticket(KEY))  # the slots are free again
    assert answer == ACK
    for s in (*silent, trickle, sock):
        s.close()


def test_at_most_max_tickets_wait_the_oldest_goes_first(hub):
    tickets = [hub.ticket(("job", 0, w)) for w in range(5)]  # max_tickets=4
    sock, answer = connect(hub, tickets[0])
    assert answer == b""
    sock2, answer2 = connect(hub, tickets[4])
    assert answer2 == ACK
    sock.close()
    sock2.close()


def test_a_new_link_for_a_key_replaces_and_closes_the_old_one(hub):
    old_sock, _ = connect(hub, hub.ticket(KEY))
    old = bound(hub)
    new_sock, answer = connect(hub, hub.ticket(KEY))
    assert answer == ACK
    wait_for(lambda: old.closed)
    assert bound(hub) is not old and hub.links() == 1
    old_sock.settimeout(5)
    assert old_sock.recv(1) == b""  # the worker sees its old link end
    old_sock.close()
    new_sock.close()


def test_a_link_serves_one_push_at_a_time_and_a_missing_one_is_no_link(hub):
    with pytest.raises(NoLink):
        hub.take(KEY)
    sock, _ = connect(hub, hub.ticket(KEY))
    link = hub.take(KEY)
    with pytest.raises(NoLink):  # a retry racing its first try does not share the socket
        hub.take(KEY)
    hub.give(KEY, link)
    hub.give(KEY, hub.take(KEY))
    hub.drop_where(lambda key: key[2] != 7)  # the worker left
    assert hub.links() == 0 and link.closed
    sock.close()


def test_a_frame_for_another_push_or_of_another_size_closes_the_link_instead_of_reading_on(hub):
    sock, _ = connect(hub, hub.ticket(KEY))
    worker = LinkSocket(sock, 5.0)
    server = hub.take(KEY)
    worker.send(1, torch.ones(10), time.monotonic() + 5)
    with pytest.raises(LinkError, match="out of step"):
        server.receive(2, torch.empty(10), time.monotonic() + 5)
    assert server.closed
    hub.give(KEY, server)
    assert hub.links() == 0

    sock2, _ = connect(hub, hub.ticket(KEY))
    worker2 = LinkSocket(sock2, 5.0)
    server2 = hub.take(KEY)
    sock2.sendall(FRAME.pack(MAGIC, 3, 1, 1 << 40))  # claims a terabyte
    with pytest.raises(LinkError, match="1099511627776 bytes"):
        server2.receive(3, torch.empty(10), time.monotonic() + 5)
    assert server2.closed
    worker.close()
    worker2.close()


def test_a_peer_that_stops_sending_mid_frame_fails_the_read_at_the_idle_limit_not_never(hub):
    sock, _ = connect(hub, hub.ticket(KEY))
    server = hub.take(KEY)
    server.idle_timeout = 0.3
    sock.sendall(FRAME.pack(MAGIC, 5, 1, 4000) + b"\0" * 100)  # 100 of 4000 bytes, then silence
    with pytest.raises(LinkError, match="failed"):
        server.receive(5, torch.empty(1000), time.monotonic() + 30)
    assert server.closed
    sock.close()


def test_a_read_past_the_push_deadline_fails_even_while_bytes_trickle_in(hub):
    sock, _ = connect(hub, hub.ticket(KEY))
    server = hub.take(KEY)
    sock.sendall(FRAME.pack(MAGIC, 5, 1, 4000))
    with pytest.raises(LinkError, match="timed out|deadline"):
        server.receive(5, torch.empty(1000), time.monotonic() + 0.3)
    sock.close()
