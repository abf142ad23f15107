"""Time the official PyTorch implementation (KwaiVGI/DiffMoE) on the same
workloads as `cargo xtask bench`: train-step (RectifiedFlow loss, backward,
AdamW), eval-forward (the official `forward_eval`, dynamic routing) and
sample (`--sample-steps` steps of the official Euler sampler, unguided), for
the model of one of this repository's config files.

Usage: python official_bench.py OFFICIAL_REPO CONFIG.toml [--batch N]
       [--repeat N] [--warmup N] [--sample-steps N] [--device cuda|cpu]
       [--json FILE]

OFFICIAL_REPO is a checkout of https://github.com/KwaiVGI/DiffMoE (only
models/ and diffusion/rectified_flow.py are imported). Nothing of it is
copied into this repository. As in the official train.py, TF32 matmuls are
on for CUDA. DiffMoE thresholds are first set, as `cargo xtask bench` sets
them, to the per-expert quantiles of one training-mode forward over the bench
inputs (the fixed point of the threshold EMA), so dynamic routing runs about
`capacity` experts per token.
"""

import argparse
import json
import os
import sys
import time
import tomllib

import torch
import torch.distributed as dist

class AttrDict(dict):
    """The official code reads its OmegaConf MoE config both as attributes and with `.get`."""

    __getattr__ = dict.__getitem__


def build(repo, cfg):
    sys.path.insert(0, repo)
    m = cfg["model"]
    common = dict(
        input_size=m["input_size"],
        patch_size=m["patch_size"],
        in_channels=m["in_channels"],
        hidden_size=m["hidden_size"],
        depth=m["depth"],
        num_heads=m["num_heads"],
        mlp_ratio=m.get("mlp_ratio", 4.0),
        class_dropout_prob=m.get("class_dropout_prob", 0.1),
        num_classes=m["num_classes"],
        learn_sigma=m.get("learn_sigma", True),
        use_swiglu=m.get("mlp", "gelu") == "swiglu",
    )
    family = m["family"]
    if family == "dense":
        from models.models_DiT import DiT

        return DiT(**common)
    if family != "diffmoe":
        raise SystemExit(f"official_bench: family {family} is not benchmarked here")
    from models.models_DiffMoE import DiT

    moe = m["moe"]
    moe_config = AttrDict(
        num_experts=moe["num_experts"],
        capacity=moe["capacity"],
        n_shared_experts=moe.get("n_shared_experts") or 0,
        interleave=moe.get("layout", "interleaved") == "interleaved",
        init_MoeMLP=False,
    )
    return DiT(**common, MoE_config=moe_config, CapacityPred_loss_weight=moe.get("capacity_loss_weight", 0.01))


def timed(fn, device, warmup, repeat):
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    return {"median_s": times[len(times) // 2], "min_s": times[0], "max_s": times[-1]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("repo")
    p.add_argument("config")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--sample-steps", type=int, default=4)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json")
    a = p.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl" if a.device == "cuda" else "gloo", rank=0, world_size=1)

    with open(a.config, "rb") as f:
        cfg = tomllib.load(f)
    model = build(a.repo, cfg).to(a.device)
    from diffusion.rectified_flow import RectifiedFlow

    m = cfg["model"]
    n = a.batch
    shape = (n, m["in_channels"], m["input_size"], m["input_size"])
    x = torch.randn(shape, device=a.device)
    y = torch.arange(n, device=a.device) % m["num_classes"]
    t = torch.rand(n, device=a.device)
    flow = RectifiedFlow(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)

    def train_step():
        opt.zero_grad()
        loss = flow(x, y)["loss"].mean()
        loss.backward()
        opt.step()

    rows = []

    def record(workload, times):
        # Printed and written as each workload finishes, so that a run cut
        # short by a time limit keeps the workloads it finished.
        r = {"workload": workload, **times, "preset": cfg["name"], "batch": n, "device": a.device}
        r["images_per_s"] = n / r["median_s"]
        rows.append(r)
        print(f"{cfg['name']:<24} {workload:<13} {r['median_s']:.4f} s  {r['images_per_s']:.1f} img/s", flush=True)
        if a.json:
            with open(a.json + ".tmp", "w") as f:
                json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)
            os.replace(a.json + ".tmp", a.json)

    model.train()
    record("train-step", timed(train_step, a.device, a.warmup, a.repeat))

    with torch.no_grad():
        if m["family"] == "diffmoe":
            moe = [b.mlp for b in model.blocks if hasattr(b.mlp, "expert_threshold")]
            for layer in moe:
                layer.ema_decay.fill_(0.0)  # threshold <- quantile
            model(x, t, y)
            for layer in moe:
                layer.ema_decay.fill_(0.95)
        model.eval()
        record("eval-forward", timed(lambda: model(x, t, y), a.device, a.warmup, a.repeat))
        # The official Euler sampler, unguided (`null_cond=None`), as the
        # bench's `sample` workload; it prints a line per call.
        sample = lambda: flow.sample(x, y, sample_steps=a.sample_steps, mode="euler")
        record("sample", timed(sample, a.device, a.warmup, a.repeat))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
