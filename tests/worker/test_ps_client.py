"""The worker's channel to one shard: following a replicated shard that moves to another server."""
import threading

import socket

import pytest

from shardps.proto.errors import ShardpsError, Unavailable
from shardps.proto.messages import ShardInfo
from shardps.proto.plan import ShardRange
from shardps.runtime.retry import Retrier
from shardps.worker.ps_client import Locator, ShardChannel


def channel(retry: Retrier) -> ShardChannel:
    # Nothing listens on these addresses: the calls below never dial; they only run ``attempt``.
    return ShardChannel(ShardInfo(ShardRange(0, 0, 8), "127.0.0.1:9"), "job", "fp", 1 << 16, retry)


def test_a_retry_waiting_out_its_backoff_goes_to_the_new_primary_as_soon_as_the_shard_moves():
    # A failover takes a few seconds, by which time a call's backoff has grown to seconds too: the
    # promoted backup would wait for it. The move (the plan watcher's) ends the wait.
    ch = channel(Retrier(budget=600, initial=100, maximum=200))  # the first pause is 50..150 s
    failed, addresses, done = threading.Event(), [], []

    def attempt():
        addresses.append(ch.info.address)
        if len(addresses) == 1:
            failed.set()
            raise Unavailable("connection refused")
        return "applied"

    caller = threading.Thread(target=lambda: done.append(ch._call("Push", attempt)), daemon=True)
    caller.start()
    assert failed.wait(30)
    assert ch.failing  # the watcher looks at the plan more often while a shard is failing
    assert ch.move("127.0.0.1:10")
    caller.join(30)
    assert done == ["applied"] and addresses == ["127.0.0.1:9", "127.0.0.1:10"]
    assert not ch.failing
    ch.close()


def test_the_plan_watcher_moves_a_failing_shard_without_waiting_for_its_slow_period():
    plans = [{0: "127.0.0.1:9"}]
    locator = Locator(lambda suspect: [ShardInfo(ShardRange(k, 0, 8), a) for k, a in plans[-1].items()], every=0)
    ch = channel(Retrier(budget=0))
    ch.failing = True
    stop = threading.Event()
    watcher = threading.Thread(target=locator.watch, args=([ch], stop), kwargs={"every": 600, "failing_every": 0.01},
                               daemon=True)
    watcher.start()
    plans.append({0: "127.0.0.1:10"})  # the coordinator promoted the backup on another server
    try:
        for _ in range(3000):
            if ch.info.address == "127.0.0.1:10":
                break
            stop.wait(0.01)
        assert ch.info.address == "127.0.0.1:10"
    finally:
        stop.set()
        watcher.join(10)
        ch.close()


def closed_port() -> str:
    with socket.socket() as s:  # nothing listens on it once this socket is closed
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def transport_failure(address: str) -> Unavailable:
    """What ``error_from_rpc`` makes of a status no shardps handler sent."""
    exc = Unavailable(f"Push to shard 0 at {address}: UNAVAILABLE: failed to connect to all addresses")
    exc.from_transport = True
    return exc


@pytest.mark.parametrize("port_is", ["closed", "open"])
def test_a_transport_failure_names_the_server_to_the_coordinator_only_when_its_port_refuses(port_is):
    # The plan is asked again at once (not after ``every``), naming the server whose port refused: the
    # coordinator checks it and answers with the shard already moved; the retry goes there. A port that
    # still accepts (a stuck or busy server) is not named: the call goes on retrying there.
    live = socket.socket()
    live.bind(("127.0.0.1", 0))
    live.listen()
    dead = closed_port() if port_is == "closed" else f"127.0.0.1:{live.getsockname()[1]}"
    asked = []

    def fetch(suspect):
        asked.append(list(suspect))
        return [ShardInfo(ShardRange(0, 0, 8), "127.0.0.1:10" if suspect else dead)]

    locator = Locator(fetch, every=600)
    locator.plan()  # the answer is fresh: without the report the next question would wait 600 s
    ch = ShardChannel(ShardInfo(ShardRange(0, 0, 8), dead), "job", "fp", 1 << 16, Retrier(budget=0),
                      locate=locator)
    addresses = []

    def attempt():
        addresses.append(ch.info.address)
        if len(addresses) == 1:
            raise transport_failure(dead)
        return "applied"

    try:
        if port_is == "closed":
            assert ch._call("Push", attempt) == "applied"
            assert asked == [[], [dead]] and addresses == [dead, "127.0.0.1:10"]
        else:
            with pytest.raises(Unavailable):
                ch._call("Push", attempt)
            assert asked == [[]] and addresses == [dead]
    finally:
        ch.close()
        live.close()


def test_a_timeout_is_not_reported_as_a_dead_server():
    asked = []
    locator = Locator(lambda suspect: asked.append(list(suspect)) or [ShardInfo(ShardRange(0, 0, 8), "127.0.0.1:9")],
                      every=0)
    ch = ShardChannel(ShardInfo(ShardRange(0, 0, 8), "127.0.0.1:9"), "job", "fp", 1 << 16, Retrier(budget=0),
                      locate=locator)

    def attempt():
        raise Unavailable("Push to shard 0 at 127.0.0.1:9: DEADLINE_EXCEEDED: Deadline Exceeded")

    try:
        ch._call("Push", attempt)
    except Unavailable:
        pass
    finally:
        ch.close()
    assert asked == [[]]  # asked where the shard is, naming nobody


def test_a_shard_that_moves_again_while_the_followed_retry_waits_is_retried_not_fatal():
    # Chaos with partitions made a shard flap between two servers: the retry that followed the first
    # move was on a channel the second move closed, and its CANCELLED ("Channel closed!") killed the
    # worker. It is retried like any call whose shard moved under it.
    dead = closed_port()
    locator = Locator(lambda suspect: [ShardInfo(ShardRange(0, 0, 8), "127.0.0.1:10" if suspect else dead)],
                      every=600)
    locator.plan()
    ch = ShardChannel(ShardInfo(ShardRange(0, 0, 8), dead), "job", "fp", 1 << 16,
                      Retrier(budget=30, initial=0.01, maximum=0.02), locate=locator)
    addresses = []

    def attempt():
        addresses.append(ch.info.address)
        if len(addresses) == 1:
            raise transport_failure(dead)
        if len(addresses) == 2:  # the followed retry, on :10, when the shard moves on to :11
            ch.move("127.0.0.1:11")
            err = ShardpsError("Push to shard 0 at 127.0.0.1:10: CANCELLED: Channel closed!")
            err.code = "CANCELLED"
            raise err
        return "applied"

    try:
        assert ch._call("Push", attempt) == "applied"
    finally:
        ch.close()
    assert addresses == [dead, "127.0.0.1:10", "127.0.0.1:11"]
