from hypothesis import given, settings, strategies as st

from shardps.proto.plan import owner_of, plan_shards


@settings(max_examples=300, deadline=None)
@given(numel=st.integers(0, 10**9), shards=st.integers(1, 64), align=st.sampled_from([1, 7, 64, 1024]))
def test_shard_plan_covers_every_param_exactly_once(numel, shards, align):
    ranges = plan_shards(numel, shards, align)
    assert [r.shard_id for r in ranges] == list(range(shards))
    assert ranges[0].start == 0 and ranges[-1].stop == numel
    for a, b in zip(ranges, ranges[1:]):
        assert a.stop == b.start  # contiguous: no gap, no overlap
    assert all(r.start <= r.stop for r in ranges)
    assert sum(r.numel for r in ranges) == numel
    for r in ranges[:-1]:
        assert r.stop % align == 0 or r.stop == numel
    sizes = [r.numel for r in ranges]
    assert max(sizes) - min(sizes) <= align  # near-equal


@settings(max_examples=100, deadline=None)
@given(numel=st.integers(1, 5000), shards=st.integers(1, 9), data=st.data())
def test_owner_of_finds_the_range_holding_each_element(numel, shards, data):
    ranges = plan_shards(numel, shards, 64)
    index = data.draw(st.integers(0, numel - 1))
    owner = owner_of(ranges, index)
    assert owner.start <= index < owner.stop
    assert sum(r.start <= index < r.stop for r in ranges) == 1


def test_plan_rejects_nonsense():
    import pytest

    with pytest.raises(ValueError, match="num_shards"):
        plan_shards(10, 0)
    with pytest.raises(ValueError, match="numel"):
        plan_shards(-1, 2)
