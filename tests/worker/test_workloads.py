import sysconfig

import torch

from shardps.worker.workloads import get_workload


def test_digits_uses_the_bundled_dataset_with_a_fixed_held_out_split():
    wl = get_workload("digits")
    assert wl.train_size + len(wl.y_test) == 1797
    assert set(wl.y_test.tolist()) == set(range(10))


def test_ranks_take_disjoint_rows_of_the_same_global_batch():
    for name in ("digits", "charlm"):
        wl = get_workload(name)
        x, y = wl.global_batch(3, 12)
        parts = [wl.rows(3, 12, lo, hi) for lo, hi in [(0, 3), (3, 8), (8, 12)]]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
        assert not torch.equal(wl.global_batch(4, 12)[0], x)  # the next step reads other rows


def test_charlm_trains_on_the_standard_library_sources():
    wl = get_workload("charlm")
    model = wl.model()
    assert sum(p.numel() for p in model.parameters()) > 2_000_000
    stdlib = sysconfig.get_paths()["stdlib"]
    first = sorted(__import__("pathlib").Path(stdlib).glob("*.py"))[0].read_bytes()[:200]
    assert bytes(wl.train[:200].tolist()) == first
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = wl.global_batch(0, 4)
    losses = []
    for _ in range(6):
        loss = wl.loss(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert wl.evaluate(model)["bits_per_char"] > 0
