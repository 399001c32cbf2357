"""A small fixed regression/classification task shared by the worker script and the reference."""
import torch

IN, HIDDEN, OUT = 10, 32, 4


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT))


def global_batch(step: int, total: int, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """The union batch of ``step``: the same on every process."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    x = torch.randn(total, IN, generator=g)
    w = torch.linspace(-1, 1, IN * OUT).reshape(IN, OUT)
    y = torch.tanh(x @ w) + 0.05 * torch.randn(total, OUT, generator=g)
    return x, y


def loss_fn(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def make_scheduler(opt, use: bool):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5) if use else None


def reference(initial, optimizer, kwargs, sizes, scheduler, steps):
    """One process, plain torch.optim, on the union batch: what sync training must equal."""
    model = make_model(0)
    model.load_state_dict(initial)
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer]
    opt = cls(model.parameters(), **kwargs)
    sched = make_scheduler(opt, scheduler)
    for step in range(steps):
        x, y = global_batch(step, sum(sizes))
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
        if sched:
            sched.step()
    return model.state_dict(), opt.state_dict()
