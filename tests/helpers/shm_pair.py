"""Two same-host workers (threads) of a sync job through a LocalCluster: the shared-memory
tests' training run, with an optional hook (an attack) run by rank 1 at one step."""
import threading

from shardps import ShardedOptimizer
from shardps.client.sdk import shard_status

from task import global_batch, loss_fn, make_model

SIZES = [24, 40]


def train_pair(cluster, transport, steps=6, sabotage=False, hook=None, hook_step=2):
    """Returns rank 0's final parameters and each worker's per-shard shared-memory flags (by rank),
    and each server's worker_transport. ``sabotage``: unlink each segment's name before the first
    push. ``hook(opts, step)``: run by rank 1 before its push of ``hook_step`` (``opts``: rank ->
    ShardedOptimizer, both workers')."""
    results, opts, errors = {}, {}, []
    models = [make_model(0) for _ in SIZES]  # here: the global RNG is not for threads to race on

    def worker(model):
        try:
            train(model)
        except BaseException as exc:  # the test fails with it, not with a missing result
            errors.append(exc)

    def train(model):
        opt = ShardedOptimizer(model, cluster=cluster.address, optimizer="adam", lr=0.01, min_workers=2,
                               transport=transport)
        opts[opt.rank] = opt
        if sabotage:
            opt.flat.segment.unlink()  # as if the servers ran on another host: they cannot open it
        for step in range(steps):
            lo = sum(SIZES[:opt.rank])
            x, y = global_batch(step, sum(SIZES))
            opt.zero_grad()
            loss_fn(model, x[lo:lo + SIZES[opt.rank]], y[lo:lo + SIZES[opt.rank]]).backward()
            if step % 2:
                opt.clip_grad_norm_(0.5, batch_size=SIZES[opt.rank])
            if hook is not None and opt.rank == 1 and step == hook_step:
                hook(opts, step)
            opt.step(batch_size=SIZES[opt.rank])
        results[opt.rank] = ({k: v.clone() for k, v in model.state_dict().items()}, list(opt.ps.shm_ok))
        opt.close()

    threads = [threading.Thread(target=worker, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads), "a worker did not finish its steps within 120 s"
    transports = [dict(shard_status(a).worker_transport) for a in cluster.server_addresses.values()]
    return results, transports
