"""Parity cases from the official PyTorch implementation (KwaiVGI/DiffMoE) on
configurations of our choosing, in the fixture format of
`shared/fixtures/parity/README.md`, for `cargo xtask parity DIR`.

Usage: python official_cases.py OFFICIAL_REPO SPEC.json OUT_DIR
       python official_cases.py OFFICIAL_REPO --recompute FIXTURE_DIR CASE OUT_DIR

SPEC.json maps case names to {family (dit, tc, ec, diffmoe), diffusion (flow,
ddpm), seed, batch, cfg_scale, sample_steps (flow) or respacing and ddpm_t
(ddpm), kwargs (the official `DiT` constructor's keyword arguments)}.
`--recompute` runs a published case again from its stored weights and inputs,
which checks this script against the fixtures of the official generator.

OFFICIAL_REPO is a checkout of https://github.com/KwaiVGI/DiffMoE (its
models/ and diffusion/ are imported and run unchanged; nothing of it is copied
into this repository). It needs torch, timm, numpy and safetensors.

A case holds a subset of the published groups: the weights (`model.*`, drawn
as the published procedure draws them, DiffMoE thresholds calibrated so that
10-60% of the training tokens pass), the train, eval and (DiffMoE) static
forwards with every block's output, DiffMoE's training routing (selection
mask, capacity logits, threshold after the EMA update), the flow or DDPM loss
terms and every parameter's gradient, `forward_with_cfg`, the final sample of
each flow sampler (euler, heun, their CFG runs, DiffMoE's static euler) and
the DDPM trajectories (ancestral, DDIM with clipping, guided ancestral) with
fixed per-step noise. As in the published procedure, label dropout is off,
one single-process gloo group serves the threshold update's all_reduce, and
computation is float32 on one CPU thread. Unlike the official generator this
script does not redraw a seed whose routing has near ties: a routing group
that fails should first be checked for a tie.
"""

import json
import math
import os
import sys
import types

import torch
from safetensors.torch import load_file, save_file

MODULES = {
    "dit": "models/models_DiT.py",
    "tc": "models/models_TCDiT.py",
    "ec": "models/models_ECDiT.py",
    "diffmoe": "models/models_DiffMoE.py",
}


class AttrDict(dict):
    """The official code reads its OmegaConf MoE config both as attributes and with `.get`."""

    __getattr__ = dict.__getitem__


def import_official(repo):
    """The official model modules and diffusion entry points."""
    sys.path.insert(0, repo)
    # Imported at module level by the official diffusion files, unused on these paths.
    stubs = {"torchdiffeq": {"odeint": None}, "pexpect": {"ExceptionPexpect": Exception}}
    for name, attrs in stubs.items():
        try:
            __import__(name)
        except ImportError:
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            sys.modules[name] = module
    import importlib

    from diffusion import create_diffusion
    from diffusion.rectified_flow import RectifiedFlow

    models = {f: importlib.import_module(p[:-3].replace("/", ".")) for f, p in MODULES.items()}
    return models, create_diffusion, RectifiedFlow


def first(output):
    """The image output of a forward (MoE models return a tuple)."""
    return output[0] if isinstance(output, tuple) else output


class Case:
    """One case's tensors, computed from a model whose state is restored after every computation."""

    def __init__(self, model, family):
        self.model, self.family = model, family
        self.tensors, self.inputs = {}, []
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def restore(self):
        self.model.load_state_dict(self.state)

    def put(self, key, value, is_input=False):
        self.tensors[key] = value.detach().clone().contiguous()
        if is_input:
            self.inputs.append(key)

    def forward(self, prefix, x, t, y, train):
        """train, eval or static: the output, each block's output, DiffMoE's training routing."""
        model = self.model
        model.train(train)
        blocks = {}
        hooks = [
            b.register_forward_hook(lambda _m, _i, o, j=j: blocks.__setitem__(j, first(o).detach().clone()))
            for j, b in enumerate(model.blocks)
        ]
        with torch.no_grad():
            out = model(x, t, y)
        for h in hooks:
            h.remove()
        self.put(f"{prefix}.out", first(out))
        if prefix != "static":
            for j, value in blocks.items():
                self.put(f"{prefix}.act.block.{j}", value)
        if self.family == "diffmoe" and train:
            n, tokens = x.shape[0], blocks[0].shape[1]
            for block, ones, logits in zip(out[2], out[3], out[4]):
                experts = ones.shape[-1]
                self.put(f"{prefix}.moe.L{block}.ones", ones.reshape(n, tokens, experts))
                self.put(f"{prefix}.moe.L{block}.capacity_logits", logits.reshape(n, tokens, experts))
                self.put(f"{prefix}.moe.L{block}.expert_threshold_after", model.blocks[block].mlp.expert_threshold)
        self.restore()


def build(models, family, kwargs):
    kw = dict(kwargs)
    if "MoE_config" in kw:
        kw["MoE_config"] = AttrDict(kw["MoE_config"])
    model = models[family].DiT(**kw)
    # Label dropout off: labels are used as given in train mode.
    model.y_embedder.token_drop = lambda labels, force_drop_ids=None: labels
    return model


def randomize(model, gen):
    """Every float parameter and buffer ~ N(0, s) as the published procedure draws them, but the
    fixed sin-cos `pos_embed`, DiffMoE's `ema_decay` and its thresholds (calibrated after)."""
    for name, value in model.state_dict().items():
        keep = name == "pos_embed" or name.endswith(("ema_decay", "expert_threshold"))
        if not value.is_floating_point() or keep:
            continue
        if name.endswith("bias"):
            std = 0.05
        elif value.dim() >= 2:
            std = min(max(1 / math.sqrt(math.prod(value.shape[1:])), 0.02), 0.2)
        else:
            std = 0.1
        value.copy_(torch.randn(value.shape, generator=gen) * std)


def calibrate(model, x, t, y, gen):
    """Each DiffMoE threshold half-way (in logit space) between two consecutive capacity logits of
    one training forward, with a random 10-60% of the tokens above it."""
    logits = {}
    hooks = [
        b.mlp.capacity_predictor.register_forward_hook(lambda _m, _i, o, j=j: logits.__setitem__(j, o.detach()))
        for j, b in enumerate(model.blocks)
        if hasattr(b.mlp, "capacity_predictor")
    ]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    with torch.no_grad():
        model(x, t, y)
    model.load_state_dict(state)
    for h in hooks:
        h.remove()
    for block, values in logits.items():
        threshold = model.blocks[block].mlp.expert_threshold
        tokens = values.shape[0]
        for e in range(values.shape[1]):
            ranked, _ = torch.sort(values[:, e], descending=True)
            share = 0.1 + 0.5 * torch.rand((), generator=gen).item()
            above = min(max(1, round(share * tokens)), tokens - 1)
            threshold[e] = torch.sigmoid((ranked[above - 1] + ranked[above]) / 2)


def draw(models, create_diffusion, spec):
    """A new case: the model and every input, from the spec's seed."""
    family, diffusion, kwargs = spec["family"], spec["diffusion"], spec["kwargs"]
    if diffusion == "ddpm" and len(spec["ddpm_t"]) != spec["batch"]:
        raise ValueError(f"ddpm_t holds {len(spec['ddpm_t'])} steps for a batch of {spec['batch']}")
    torch.manual_seed(spec["seed"])
    model = build(models, family, kwargs)
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    randomize(model, gen)
    n, channels, size, classes = spec["batch"], kwargs["in_channels"], kwargs["input_size"], kwargs["num_classes"]

    def image(batch=n):
        return torch.randn((batch, channels, size, size), generator=gen)

    def labels():
        return torch.randint(0, classes, (n,), generator=gen)

    def steps():
        return torch.rand((n,), generator=gen) if diffusion == "flow" else torch.randint(0, 1000, (n,), generator=gen)

    x, t, y = image(), steps(), labels()
    y[-1] = classes  # the null label
    if family == "diffmoe":
        calibrate(model, x, t, y, gen)
    inputs = {"inputs.x": x, "inputs.t": t, "inputs.y": y}
    if diffusion == "flow":
        inputs.update({"loss.x1": image(), "loss.y": labels(), "loss.z0": image(), "loss.t": torch.rand((n,), generator=gen)})
    else:
        inputs.update({"ddpm.x_start": image(), "ddpm.y": labels(), "ddpm.noise": image(),
                       "ddpm.t": torch.tensor(spec["ddpm_t"][:n], dtype=torch.int64)})
    half, cfg_y, cfg_t = image(), labels(), steps()
    null = torch.full((n,), classes)
    inputs.update({"cfg.x": torch.cat([half, half]), "cfg.y": torch.cat([cfg_y, null]), "cfg.t": torch.cat([cfg_t, cfg_t])})
    prefix = "sample" if diffusion == "flow" else "ddpm_sample"
    inputs.update({f"{prefix}.z": image(), f"{prefix}.y": labels(), f"{prefix}.y_null": null})
    if diffusion == "ddpm":
        count = len(create_diffusion(spec["respacing"]).use_timesteps)
        inputs["ddpm_sample.p.step_noise"] = torch.randn((count, n, channels, size, size), generator=gen)
        inputs["ddpm_sample.p_cfg.step_noise"] = torch.randn((count, 2 * n, channels, size, size), generator=gen)
    return Case(model, family), inputs


def compute(case, inputs, spec, create_diffusion, RectifiedFlow):
    model, family, diffusion = case.model, case.family, spec["diffusion"]
    for key, value in model.state_dict().items():
        case.put(f"model.{key}", value)
    for key, value in inputs.items():
        case.put(key, value, is_input=True)
    x, t, y = inputs["inputs.x"], inputs["inputs.t"], inputs["inputs.y"]
    case.forward("train", x, t, y, train=True)
    case.forward("eval", x, t, y, train=False)
    if family == "diffmoe":
        case.forward("static", x, t, y, train=True)

    # The loss and every gradient, in train mode.
    model.train()
    model.zero_grad()
    if diffusion == "flow":
        z0, t_loss = inputs["loss.z0"], inputs["loss.t"]
        randn_like, rand = torch.randn_like, torch.rand
        torch.randn_like, torch.rand = (lambda *_a, **_k: z0.clone()), (lambda *_a, **_k: t_loss.clone())
        try:
            terms = RectifiedFlow(model).forward(inputs["loss.x1"], inputs["loss.y"])
        finally:
            torch.randn_like, torch.rand = randn_like, rand
        terms["loss"].backward()
        prefix = "loss"
        case.put("loss.loss", terms["loss"])
        case.put("loss.mse", terms["mse"])
        if family == "diffmoe":
            case.put("loss.cp_loss", torch.as_tensor(terms["cp_loss"], dtype=torch.float32))
    else:
        terms = create_diffusion(timestep_respacing="").training_losses(
            model, inputs["ddpm.x_start"], inputs["ddpm.t"], model_kwargs={"y": inputs["ddpm.y"]},
            noise=inputs["ddpm.noise"])
        terms["loss"].mean().backward()
        prefix = "ddpm"
        for name in ["loss", "mse", "vb"]:
            case.put(f"ddpm.{name}", terms[name])
    for name, value in terms.items():
        if name.startswith("Capacity_Pred_loss_"):
            case.put(f"{prefix}.Capacity_Pred_loss.L{name.rsplit('_', 1)[1]}", value)
    for name, p in model.named_parameters():
        if p.grad is not None:
            case.put(f"grad.{name}", p.grad)
    model.zero_grad()
    case.restore()

    model.eval()
    with torch.no_grad():
        case.put("cfg.out", model.forward_with_cfg(inputs["cfg.x"], inputs["cfg.t"], inputs["cfg.y"], spec["cfg_scale"]))

    if diffusion == "flow":
        runs = ["euler", "heun", "euler_cfg", "heun_cfg"] + (["static_euler"] if family == "diffmoe" else [])
        for run in runs:
            model.train(run.startswith("static"))
            null = inputs["sample.y_null"] if run.endswith("_cfg") else None
            images = RectifiedFlow(model).sample(inputs["sample.z"], inputs["sample.y"], null, spec["sample_steps"],
                                                 cfg=spec["cfg_scale"], mode=run)
            case.put(f"sample.{run}.final", images[-1])
            case.restore()
        return
    model.eval()
    sampler = create_diffusion(spec["respacing"])
    cpu = torch.device("cpu")
    for run in ["p", "ddim", "p_cfg"]:
        noise = inputs["ddpm_sample.p_cfg.step_noise" if run == "p_cfg" else "ddpm_sample.p.step_noise"]
        z, labels = inputs["ddpm_sample.z"], inputs["ddpm_sample.y"]
        if run == "p_cfg":
            z, net = torch.cat([z, z]), model.forward_with_cfg
            kwargs = {"y": torch.cat([labels, inputs["ddpm_sample.y_null"]]), "cfg_scale": spec["cfg_scale"]}
        else:
            net, kwargs = model.forward, {"y": labels}
        drawn = iter(noise)
        randn_like = torch.randn_like
        torch.randn_like = lambda *_a, **_k: next(drawn).clone()
        try:
            with torch.no_grad():
                if run == "ddim":
                    loop = sampler.ddim_sample_loop_progressive(
                        net, tuple(z.shape), noise=z, clip_denoised=True, model_kwargs=kwargs, eta=0.0, device=cpu)
                else:
                    loop = sampler.p_sample_loop_progressive(
                        net, tuple(z.shape), noise=z, clip_denoised=False, model_kwargs=kwargs, device=cpu)
                steps = list(loop)
        finally:
            torch.randn_like = randn_like
        case.put(f"ddpm_sample.{run}.samples", torch.stack([s["sample"] for s in steps]))
        case.put(f"ddpm_sample.{run}.pred_xstart", torch.stack([s["pred_xstart"] for s in steps]))
        case.restore()


def save(case, spec, name, out_dir):
    tensors = {k: v.to(torch.int64 if not v.is_floating_point() else torch.float32) for k, v in case.tensors.items()}
    save_file(tensors, os.path.join(out_dir, f"{name}.safetensors"))
    meta = {
        "format": "DiffMoE parity fixtures (a subset of the published groups)",
        "generator": "xtask/parity/official_cases.py",
        "case": name,
        "family": spec["family"],
        "diffusion": spec["diffusion"],
        "seed": spec.get("seed"),
        "config": {"family": spec["family"], "official_module": MODULES[spec["family"]], "official_class": "DiT",
                   "constructor_kwargs": spec["kwargs"]},
        "cfg_scale": spec["cfg_scale"],
        "sample_steps": spec.get("sample_steps"),
        "ddpm_respacing": spec.get("respacing"),
        "input_keys": sorted(case.inputs),
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in tensors.items()},
    }
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(meta, f, indent=1)


def main(argv):
    if len(argv) == 3:
        repo, spec_path, out_dir = argv
        specs = json.load(open(spec_path))
    elif len(argv) == 5 and argv[1] == "--recompute":
        repo, _, src, name, out_dir = argv
        specs = None
    else:
        sys.exit(__doc__)
    models, create_diffusion, RectifiedFlow = import_official(repo)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    os.makedirs(out_dir, exist_ok=True)
    done = []
    if specs is None:
        meta = json.load(open(os.path.join(src, f"{name}.json")))
        stored = load_file(os.path.join(src, f"{name}.safetensors"))
        spec = {"family": meta["family"], "diffusion": meta["diffusion"], "seed": meta.get("seed"),
                "kwargs": meta["config"]["constructor_kwargs"], "cfg_scale": meta["cfg_scale"],
                "sample_steps": meta["sample_steps"], "respacing": meta["ddpm_respacing"]}
        model = build(models, spec["family"], spec["kwargs"])
        model.load_state_dict({k.removeprefix("model."): v for k, v in stored.items() if k.startswith("model.")})
        case = Case(model, spec["family"])
        compute(case, {k: stored[k] for k in meta["input_keys"]}, spec, create_diffusion, RectifiedFlow)
        save(case, spec, name, out_dir)
        done.append((name, spec))
    else:
        for name, spec in specs.items():
            case, inputs = draw(models, create_diffusion, spec)
            compute(case, inputs, spec, create_diffusion, RectifiedFlow)
            save(case, spec, name, out_dir)
            done.append((name, spec))
            print(f"{name}: {len(case.tensors)} tensors", file=sys.stderr)
    index = {
        "format": "DiffMoE parity fixtures index",
        "set": "generated",
        "generator": "xtask/parity/official_cases.py",
        "cases": [{"case": n, "family": s["family"], "diffusion": s["diffusion"],
                   "files": [f"{n}.safetensors", f"{n}.json"]} for n, s in done],
    }
    with open(os.path.join(out_dir, "index.json"), "w") as f:
        json.dump(index, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
