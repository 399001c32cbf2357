"""Training loops as users write them, each written once and run two ways.

``Env(sharded=True)`` runs it as one worker of a shardps job (its rows of every
union batch, ``ShardedOptimizer``, ``opt.clip_grad_norm_``, ``step(batch_size=n)``);
``Env(sharded=False)`` runs it as plain torch in one process on the union batch.
A scenario returns what the test compares. The sharded run's union batch is cut
into unequal per-worker shares (``SIZES``), so the sample weighting is tested too.
"""
from __future__ import annotations

import copy
import torch
import torch.nn.functional as F

import models as M

SIZES = (6, 10)  # each worker's rows of every union batch (unequal on purpose)
STEPS = 8


class Env:
    def __init__(self, sharded: bool, cluster: str = "", sizes=SIZES, steps: int = STEPS, prefix: str = ""):
        """``prefix``: prepended to job names, so scenarios can share one cluster."""
        self.sharded, self.cluster, self.sizes, self.steps = sharded, cluster, tuple(sizes), steps
        self.prefix = prefix
        self.rank = 0
        self.opts = []

    @property
    def union(self) -> int:
        return sum(self.sizes)

    @property
    def n(self) -> int:
        """This worker's rows of a union batch."""
        return self.sizes[self.rank] if self.sharded else self.union

    def rows(self, *tensors):
        lo = sum(self.sizes[:self.rank]) if self.sharded else 0
        out = tuple(t[lo:lo + self.n] for t in tensors)
        return out if len(out) > 1 else out[0]

    def optimizer(self, params, name: str, model=None, job: str = "default", **kwargs):
        if not self.sharded:
            from shardps.proto.optim import OPTIMIZERS

            if isinstance(params, torch.nn.Module):  # ShardedOptimizer takes the module, torch its parameters
                params = params.parameters()
            return OPTIMIZERS[name](params, **kwargs)
        from shardps import ShardedOptimizer

        opt = ShardedOptimizer(params, cluster=self.cluster, optimizer=name, model=model, job=self.prefix + job,
                               min_workers=len(self.sizes), connect_timeout=60, step_timeout=60, **kwargs)
        self.rank = opt.rank
        self.opts.append(opt)
        return opt

    def clip(self, opt, params, max_norm: float, norm_type: float = 2.0) -> float:
        if self.sharded:
            return float(opt.clip_grad_norm_(max_norm, norm_type, batch_size=self.n))
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type))

    def step(self, opt, scaler=None):
        kwargs = {"batch_size": self.n} if self.sharded else {}
        if scaler is not None:
            return scaler.step(opt, **kwargs)
        return opt.step(**kwargs)

    def close(self):
        for opt in self.opts:
            opt.close()


def _sd(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------ scenarios


def nanogpt(env: Env) -> dict:
    """Decay / no-decay groups, betas (0.9, 0.95), fused=True passed as nanoGPT does on CUDA, a
    hand-set cosine lr with warmup, two micro-steps of gradient accumulation, clipping at 1.0."""
    torch.manual_seed(0)
    model = M.MiniGPT()
    opt = env.optimizer(model.configure_optimizers(0.1), "adamw", model=model, lr=3e-3, betas=(0.9, 0.95),
                        fused=True)
    norms = []
    for step in range(env.steps):
        for group in opt.param_groups:
            group["lr"] = M.cosine_lr(step)
        for micro in range(2):
            x, y = env.rows(*M.text_batch(step, env.union, micro))
            (model(x, y) / 2).backward()
        norms.append(env.clip(opt, model.parameters(), 1.0))
        env.step(opt)
        opt.zero_grad(set_to_none=True)
    out = {"model": _sd(model), "optim": opt.state_dict(), "norms": norms}
    if env.sharded:
        out["export"] = opt.model_state_dict()
    return out


def clip_inf_norm(env: Env) -> dict:
    """SGD with momentum, the max norm, a small bound so every step is clipped."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    opt = env.optimizer(model.parameters(), "sgd", lr=0.1, momentum=0.9)
    norms = []
    for step in range(env.steps):
        x, y = env.rows(*M.digits_batch(step, env.union))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        norms.append(env.clip(opt, model.parameters(), 0.05, float("inf")))
        env.step(opt)
    return {"model": _sd(model), "norms": norms}


def unused_parameters(env: Env) -> dict:
    """A branch used on even steps only, a module never used, a frozen layer; AdamW's decoupled
    weight decay would move a parameter with a zero gradient, and torch skips a None one."""
    torch.manual_seed(2)
    model = M.Branchy()
    opt = env.optimizer(model.parameters(), "adamw", model=model, lr=0.01, weight_decay=0.1)
    for step in range(env.steps):
        x, y = env.rows(*M.digits_batch(step, env.union))
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x, use_branch=step % 2 == 0), y).backward()
        env.step(opt)
    out = {"model": _sd(model), "optim": opt.state_dict()}
    if env.sharded:
        out["export"] = opt.model_state_dict()
    return out


SCHEDULED = {  # job name -> (optimizer, kwargs, scheduler factory)
    "onecycle-adamw": ("adamw", dict(lr=0.01), lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=0.05, total_steps=STEPS)),
    "onecycle-sgd": ("sgd", dict(lr=0.01, momentum=0.9), lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=0.1, total_steps=STEPS, base_momentum=0.8, max_momentum=0.95)),
    "warmup-from-zero": ("adam", dict(lr=0.02), lambda o: torch.optim.lr_scheduler.LambdaLR(
        o, lambda s: s / 3 if s < 3 else max(0.0, (STEPS - s) / (STEPS - 3)))),  # HF's linear warmup, lr 0 first
    "cosine-restarts": ("rmsprop", dict(lr=0.01, momentum=0.5), lambda o: (
        torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=3))),
}


def schedulers(env: Env) -> dict:
    """Every scheduler class changes what it changes (OneCycle: lr and momentum/beta1) on the shards;
    four jobs on one cluster, one per scheduler."""
    out = {}
    for job, (name, kwargs, make) in SCHEDULED.items():
        torch.manual_seed(3)
        model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))
        opt = env.optimizer(model.parameters(), name, job=job, **kwargs)
        sched = make(opt)
        for step in range(env.steps):
            x, y = env.rows(*M.digits_batch(step, env.union))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            env.step(opt)
            sched.step()
        out[job] = {"model": _sd(model), "optim": opt.state_dict()}
    return out


ELEMENTWISE = {  # every elementwise torch optimizer, with options that exercise its state
    "adagrad": dict(lr=0.05, lr_decay=0.01, weight_decay=0.01),
    "rmsprop": dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.01),
    "adamax": dict(lr=0.01, weight_decay=0.01),
    "nadam": dict(lr=0.01, decoupled_weight_decay=True, weight_decay=0.01),
    "radam": dict(lr=0.01, weight_decay=0.01),
    "adadelta": dict(lr=1.0, rho=0.8),
    "asgd": dict(lr=0.05, t0=2.0),
    "rprop": dict(lr=0.01, etas=(0.4, 1.3)),
    "adam": dict(lr=0.01, amsgrad=True),
    "sgd": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
}


def optimizers(env: Env) -> dict:
    """Each elementwise optimizer, as its own job on one cluster, with a second param group of its own lr."""
    out = {}
    for name, kwargs in ELEMENTWISE.items():
        torch.manual_seed(4)
        model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))
        groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": kwargs["lr"] / 2}]
        opt = env.optimizer(groups, name, model=model, job=name, **kwargs)
        for step in range(6):
            x, y = env.rows(*M.digits_batch(step, env.union))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            env.step(opt)
        out[name] = {"model": _sd(model), "optim": opt.state_dict()}
    return out


def batchnorm(env: Env) -> dict:
    """BatchNorm's running statistics: rank 0's after each step, as DDP broadcasts them (the test's
    reference simulates DDP in one process; see ``ddp_batchnorm_reference``)."""
    torch.manual_seed(5)
    model = M.ConvBN()
    opt = env.optimizer(model, "sgd", lr=0.1, momentum=0.9)
    for step in range(env.steps):
        x, y = env.rows(*M.digits_batch(step, env.union))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        env.step(opt)
    return {"model": _sd(model), "export": opt.model_state_dict()}


def ddp_batchnorm_reference(sizes=SIZES, steps: int = STEPS) -> dict:
    """What DDP computes for ``batchnorm``, in one process: every rank starts a step from rank 0's
    buffers, gradients are averaged (sample-weighted, as shardps's batch_size asks), and rank 0's
    buffers after its forward are everyone's next."""
    torch.manual_seed(5)
    model = M.ConvBN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    buffers = dict(model.named_buffers())
    for step in range(steps):
        x, y = M.digits_batch(step, sum(sizes))
        start = {k: v.clone() for k, v in buffers.items()}
        grads, rank0 = None, None
        for r, n in enumerate(sizes):
            lo = sum(sizes[:r])
            for k, v in start.items():
                buffers[k].copy_(v)
            model.zero_grad()
            (F.cross_entropy(model(x[lo:lo + n]), y[lo:lo + n]) * n / sum(sizes)).backward()
            g = [p.grad.clone() for p in model.parameters()]
            grads = g if grads is None else [a + b for a, b in zip(grads, g)]
            if r == 0:
                rank0 = {k: v.clone() for k, v in buffers.items()}
        for p, g in zip(model.parameters(), grads):
            p.grad = g
        opt.step()
        for k, v in rank0.items():
            buffers[k].copy_(v)
    return {"model": _sd(model)}


def gradscaler(env: Env) -> dict:
    """fp16 autocast with a GradScaler; at step 2 one worker's loss overflows (the reference's union
    loss overflows alike): every worker skips that step and lowers its scale, as under DDP."""
    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    opt = env.optimizer(model.parameters(), "adam", lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=3)
    scales = []
    for step in range(env.steps):
        x, y = env.rows(*M.digits_batch(step, env.union))
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x).float(), y)
        if step == 2 and (env.rank == len(env.sizes) - 1 or not env.sharded):  # the last rank's rows overflow
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        env.clip(opt, model.parameters(), 5.0)
        env.step(opt, scaler)
        scaler.update()
        scales.append(scaler.get_scale())
    return {"model": _sd(model), "scales": scales}


def gan(env: Env) -> dict:
    """A GAN: the generator's and the critic's optimizers are two jobs on one cluster."""
    torch.manual_seed(7)
    gen, critic = M.Generator(), M.Critic()
    opt_g = env.optimizer(gen, "adam", job="generator", lr=2e-3, betas=(0.5, 0.999))
    opt_d = env.optimizer(critic, "adam", job="critic", lr=2e-3, betas=(0.5, 0.999))
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    for step in range(env.steps):
        real = env.rows(M.digits_batch(step, env.union)[0])
        z = env.rows(M.noise_batch(step, env.union))
        fake = gen(z)
        opt_d.zero_grad()
        d_loss = bce(critic(real), torch.ones(len(real), 1)) + bce(critic(fake.detach()), torch.zeros(len(z), 1))
        d_loss.backward()
        env.step(opt_d)
        opt_g.zero_grad()
        bce(critic(fake), torch.ones(len(z), 1)).backward()
        env.step(opt_g)
    return {"generator": _sd(gen), "critic": _sd(critic)}


def weight_clipping(env: Env) -> dict:
    """WGAN's critic: clamp every weight after each step; shardps needs the edit uploaded."""
    torch.manual_seed(8)
    critic = M.Critic()
    opt = env.optimizer(critic, "rmsprop", lr=5e-3)
    for step in range(env.steps):
        real = env.rows(M.digits_batch(step, env.union)[0])
        opt.zero_grad()
        (-critic(real).mean()).backward()
        env.step(opt)
        with torch.no_grad():
            for p in critic.parameters():
                p.clamp_(-0.05, 0.05)
        if env.sharded:
            opt.upload_params()
    return {"model": _sd(critic)}


def _frozen_mlp():
    torch.manual_seed(10)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 10))
    model[2].requires_grad_(False)  # frozen, yet in the optimizer's groups as model.parameters() puts it
    return model


def _groups(model):
    return [{"params": [model[0].weight, model[2].weight, model[4].weight], "weight_decay": 0.05},
            {"params": [model[0].bias, model[2].bias, model[4].bias], "weight_decay": 0.0, "lr": 0.02}]


def _train(env: Env, model, opt, steps: range) -> None:
    for step in steps:
        x, y = env.rows(*M.digits_batch(step, env.union))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        env.step(opt)


def unfreeze(env: Env) -> dict:
    """Fine-tuning that unfreezes a layer part way: the layer is in the optimizer from the start with
    requires_grad=False (torch's step skips it), and trains from the step it is unfrozen on."""
    model = _frozen_mlp()
    opt = env.optimizer(_groups(model), "adamw", model=model, job="unfreeze", lr=0.01)
    _train(env, model, opt, range(3))
    model[2].requires_grad_(True)
    _train(env, model, opt, range(3, env.steps))
    return {"model": _sd(model)}


def _backbone_groups(model):
    """The optimizer's groups without layer 2 (frozen, to be added later with add_param_group)."""
    return [{"params": [model[0].weight, model[4].weight], "weight_decay": 0.05},
            {"params": [model[0].bias, model[4].bias], "weight_decay": 0.0, "lr": 0.02}]


def _clipped(env: Env, model, opt, steps: range) -> list[float]:
    norms = []
    for step in steps:
        x, y = env.rows(*M.digits_batch(step, env.union))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        norms.append(env.clip(opt, list(model.parameters()), 0.5))
        env.step(opt)
    return norms


def add_group(env: Env) -> dict:
    """Progressive unfreezing (ULMFiT): layer 2 is frozen and outside the optimizer; after 3 steps it
    is unfrozen and added as a group of its own (its own lr and weight decay); every later step is
    clipped by the norm over every parameter. Then a checkpoint: the optimizer's state_dict after 5
    steps goes to a fresh model and optimizer (built as before, the group added again), which trains on."""
    model = _frozen_mlp()
    opt = env.optimizer(_backbone_groups(model), "adamw", model=model, job="add-group", lr=0.01)
    _train(env, model, opt, range(3))
    model[2].requires_grad_(True)
    opt.add_param_group({"params": list(model[2].parameters()), "lr": 0.005, "weight_decay": 0.1})
    norms = _clipped(env, model, opt, range(3, 5))
    checkpoint = {"model": _sd(model), "optim": copy.deepcopy(opt.state_dict())}  # torch's holds live tensors
    norms += _clipped(env, model, opt, range(5, env.steps))
    out = {"model": _sd(model), "optim": opt.state_dict(), "norms": norms, "checkpoint": checkpoint}
    if env.sharded:
        from shardps.client.sdk import cluster_status

        out["export"] = opt.model_state_dict()
        out["status"] = cluster_status(env.cluster, opt.job.name)  # shardps status --job NAME
        out["exported"] = _export(env.cluster, opt.job.name)  # shardps export --job NAME --optimizer-state
    # Resume: the model and optimizer are built as at the start, the group added, the state loaded.
    model = _frozen_mlp()
    model.load_state_dict(checkpoint["model"])
    opt = env.optimizer(_backbone_groups(model), "adamw", model=model, job="add-group-resumed", lr=0.01)
    model[2].requires_grad_(True)
    opt.add_param_group({"params": list(model[2].parameters()), "lr": 0.005, "weight_decay": 0.1})
    opt.load_state_dict(copy.deepcopy(checkpoint["optim"]))  # torch's load keeps its "step" tensors and counts on
    _clipped(env, model, opt, range(5, env.steps))
    out["resumed"] = {"model": _sd(model), "optim": opt.state_dict()}
    return out


def _export(cluster: str, job: str) -> dict:
    import tempfile
    from pathlib import Path

    from shardps.client.sdk import export_model, load_model_file

    with tempfile.TemporaryDirectory() as tmp:
        files = export_model(cluster, Path(tmp) / "model.safetensors", optimizer_state=True, job=job)
        return {"model": load_model_file(files["model"]), "optim": torch.load(files["optimizer"], weights_only=False)}


def _refused(env: Env, job: str, add, go_on: bool) -> dict:
    """Two workers disagree about a param group 2 steps in (``add(rank, opt, model)`` adds this worker's,
    or nothing); returns each worker's error, what the job looks like after it and (``go_on``) the
    model after 2 more steps without the group."""
    model = _frozen_mlp()
    opt = env.optimizer(_backbone_groups(model), "adamw", model=model, job=job, lr=0.01)
    _train(env, model, opt, range(2))
    model[2].requires_grad_(True)
    error = ""
    try:
        add(env.rank, opt, model)
        _train(env, model, opt, range(2, 3))
    except Exception as exc:  # noqa: BLE001 - the error is what the test checks
        error = f"{type(exc).__name__}: {exc}"
    extension, _, _ = opt.coordinator.job(name=f"{opt.job.name}.g2")
    out = {"error": error, "groups": len(opt.param_groups), "extension_defined": bool(extension)}
    if go_on:
        _train(env, model, opt, range(2, 4))
        out["model"] = _sd(model)
    return out


def add_group_differs(env: Env) -> dict:
    """Rank 1 adds layer 2 with another lr: both workers are refused, and the job goes on without it."""
    def add(rank, opt, model):
        opt.add_param_group({"params": list(model[2].parameters()), "lr": 0.005 if rank == 0 else 0.001})

    return _refused(env, "add-differs", add, go_on=True)


def add_group_alone(env: Env) -> dict:
    """Only rank 0 adds layer 2: rank 0's add and rank 1's next step both fail with the reason."""
    def add(rank, opt, model):
        if rank == 0:
            opt.add_param_group({"params": list(model[2].parameters()), "lr": 0.005})

    return _refused(env, "add-alone", add, go_on=False)


def resume_both_ways(env: Env) -> dict:
    """A checkpoint round trip each way with frozen parameters and two groups: shardps's state_dict
    after 4 steps (the test goes on with stock AdamW), and a torch checkpoint after 4 plain steps
    that this job loads (model before construction, optimizer state after) and trains on."""
    model = _frozen_mlp()
    opt = env.optimizer(_groups(model), "adamw", model=model, job="to-torch", lr=0.01)
    _train(env, model, opt, range(4))
    out = {"to_torch": {"model": _sd(model), "optim": opt.state_dict()}}
    # The other way: 4 steps of plain torch on the union batch (every worker computes the same), then on.
    plain = _frozen_mlp()
    torch_opt = torch.optim.AdamW(_groups(plain), lr=0.01)
    _train(Env(sharded=False, sizes=env.sizes), plain, torch_opt, range(4))
    checkpoint = {"model": _sd(plain), "optim": torch_opt.state_dict()}
    model = _frozen_mlp()
    model.load_state_dict(checkpoint["model"])
    opt = env.optimizer(_groups(model), "adamw", model=model, job="from-torch", lr=0.01)
    opt.load_state_dict(checkpoint["optim"])
    opt.load_state_dict(checkpoint["optim"])  # every worker loads the same state: loading again changes nothing
    _train(env, model, opt, range(4, 8))
    out["from_torch"] = {"model": _sd(model), "optim": opt.state_dict()}
    return out


def hf_config():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=M.VOCAB, n_positions=M.CONTEXT, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)


def hf_gpt2(env: Env) -> dict:
    """transformers' GPT-2 built from a config (tied LM head), HF Trainer's decay / no-decay groups,
    ``get_linear_schedule_with_warmup`` (lr 0 at the first step), clipping at 1.0."""
    from transformers import GPT2LMHeadModel, get_linear_schedule_with_warmup

    torch.manual_seed(9)
    model = GPT2LMHeadModel(hf_config())
    plain = [n for n, _ in model.named_parameters() if n.endswith("bias") or ".ln_" in n]
    groups = [{"params": [p for n, p in model.named_parameters() if n not in plain], "weight_decay": 0.01},
              {"params": [p for n, p in model.named_parameters() if n in plain], "weight_decay": 0.0}]
    # eps 1e-6, not 1e-8: GPT-2's key bias has an exactly-zero gradient, whose float noise Adam with a
    # tiny eps turns into lr-sized steps in any two computations (torch alone, split or not, included).
    opt = env.optimizer(groups, "adamw", model=model, lr=5e-3, eps=1e-6)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=env.steps)
    for step in range(env.steps):
        x = env.rows(M.text_batch(step, env.union)[0])
        model(input_ids=x, labels=x).loss.backward()
        env.clip(opt, model.parameters(), 1.0)
        env.step(opt)
        sched.step()
        opt.zero_grad()
    out = {"model": _sd(model)}
    if env.sharded:
        out["export"] = opt.model_state_dict()
    return out


SCENARIOS = {f.__name__: f for f in (nanogpt, clip_inf_norm, unused_parameters, schedulers, optimizers, batchnorm,
                                      gradscaler, gan, weight_clipping, hf_gpt2, resume_both_ways, unfreeze,
                                      add_group, add_group_differs, add_group_alone)}
