import torch

from shardps.worker.train import MixedPrecision


def test_fp16_overflow_zeroes_the_gradients_and_backs_the_loss_scale_off():
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mp = MixedPrecision("float16", torch.device("cpu"), opt)
    scale = mp.scaler.get_scale()
    with mp.autocast():
        loss = model(torch.ones(2, 4)).sum() * 1e30  # overflows fp16 once scaled
    assert mp.backward(loss) is True
    assert all(p.grad.eq(0).all() for p in model.parameters())  # the push will carry zeros, never inf
    mp.update()
    assert mp.scaler.get_scale() < scale
    opt.zero_grad()
    with mp.autocast():
        loss = model(torch.ones(2, 4)).sum() * 1e-3
    assert mp.backward(loss) is False
    assert abs(model.bias.grad.item() - 2e-3) < 1e-5  # unscaled: the true gradient


def test_a_train_config_round_trips_through_the_worker_command_line(monkeypatch):
    """`shardps run` starts workers with TrainConfig.to_args(): the worker must parse back the same config."""
    import typer.testing

    import shardps.worker.train as train_module
    from shardps.client.cli import app
    from shardps.worker.train import TrainConfig

    config = TrainConfig(cluster="h:1", mode="ssp", staleness=2, topk_ratio=0.1, amp="float16", slowdown=4.0,
                         metrics="m.jsonl", name="w0")
    parsed = []
    monkeypatch.setattr(train_module, "train", lambda c: parsed.append(c) or {})  # parse only; train nothing
    result = typer.testing.CliRunner().invoke(app, ["worker", *config.to_args()], env={"SHARDPS_MODE": "async"})
    assert result.exit_code == 0, result.output
    assert parsed == [config]  # every field arrived, and the flags beat the environment
