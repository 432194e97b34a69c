"""A training process for the exact-resume test (run as a script, one per process).

    python resume_worker.py MODE --steps N [--save-at K --ckpt PATH [--hang]]
                                 [--resume PATH] --out PATH

MODE "bare": amp_engine.GradScaler (hysteresis 2) + amp_engine.optim.AdamW over a
bf16 layer (stochastic rounding, no master) and an fp16 layer (fp32 master).
MODE "bare8": as "bare" with 8-bit block moments (the size under which moments stay
fp32 lowered to 64, so that both weights get 8-bit codes and absmax).
MODE "trainer": MixedPrecisionTrainer, fp16 weights with masters (memory_efficient),
2 micro-batches per step, a StepLR scheduler. Both inject non-finite losses on
fixed steps, so skips, back-offs and growth happen before and after the checkpoint.

--save-at K writes the checkpoint after optimizer step K (atomically) and prints
SAVED; with --hang the process then keeps training (and finally idles) until it is
killed. --resume starts from a checkpoint, in a model built from another seed.
--out writes the final state. Nothing is written to stdout but SAVED and DONE.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import amp_engine  # noqa: E402
from amp_engine.ops import moments8  # noqa: E402
from amp_engine.optim import AdamW  # noqa: E402

BAD_STEPS = {2, 5, 6, 11, 17, 18, 19, 23}  # non-finite losses (optimizer-step indices)


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(8, 16).to(torch.bfloat16)
        self.l2 = nn.Linear(16, 4).to(torch.float16)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x.to(torch.bfloat16))).to(torch.float16)).float()


def data(step: int, micro: int):
    g = torch.Generator().manual_seed(1000 * step + micro)
    x = torch.randn(16, 8, generator=g)
    return x, torch.randint(0, 4, (16,), generator=g)


def loss_fn(step: int):
    def f(out, y):
        loss = nn.functional.cross_entropy(out.float(), y)
        return loss * float("inf") if step in BAD_STEPS else loss
    return f


def build(mode: str, seed: int):
    torch.manual_seed(seed)
    if mode in ("bare", "bare8"):
        model = Mixed()
        compact = {}
        if mode == "bare8":
            moments8.MIN_QUANTIZED_NUMEL = 64  # this process only
            compact = dict(exp_avg_dtype=torch.uint8, exp_avg_sq_dtype=torch.uint8)
        opt = AdamW([{"params": model.l1.parameters(), "stochastic_rounding": True},
                     {"params": model.l2.parameters()}], lr=1e-2, weight_decay=0.01, **compact)
        scaler = amp_engine.GradScaler("cpu", init_scale=2.0**8, growth_interval=3,
                                       hysteresis=2, floor_patience=0)
        return model, opt, scaler
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.7)
    trainer = amp_engine.create_mixed_precision_trainer(
        model, opt, scheduler=sched, memory_efficient=True, gradient_accumulation_steps=2,
        init_scale=2.0**10, growth_interval=3, hysteresis=2, log_amp_stats=False,
        check_compatibility=False, validate_amp=False, track_memory_usage=False)
    return model, trainer.optimizer, trainer


def step_once(mode: str, model, opt, driver, step: int) -> float:
    if mode == "trainer":
        for micro in range(2):
            out = driver.train_step(data(step, micro), loss_fn(step), "cpu")
        return out["scale"]
    opt.zero_grad(set_to_none=True)
    x, y = data(step, 0)
    driver.scale(loss_fn(step)(model(x), y)).backward()
    driver.step(opt)
    driver.update()
    return driver.get_scale()


def checkpoint(mode: str, model, opt, driver) -> dict:
    if mode == "trainer":
        return {"model": model.state_dict(), "trainer": driver.state_dict()}
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": driver.state_dict()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["bare", "bare8", "trainer"])
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--save-at", type=int, default=-1)
    ap.add_argument("--ckpt")
    ap.add_argument("--hang", action="store_true")
    ap.add_argument("--resume")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = 0
    model, opt, driver = build(args.mode, seed=0 if args.resume is None else 123)
    if args.resume is not None:
        ckpt = torch.load(args.resume, weights_only=True)
        model.load_state_dict(ckpt["model"])
        if args.mode == "trainer":
            driver.load_state_dict(ckpt["trainer"])
        else:
            opt.load_state_dict(ckpt["optimizer"])
            driver.load_state_dict(ckpt["scaler"])
        start = ckpt["next_step"]
    scales = {}
    for step in range(start, args.steps):
        scales[step] = step_once(args.mode, model, opt, driver, step)
        if step == args.save_at:
            ckpt = dict(checkpoint(args.mode, model, opt, driver), next_step=step + 1)
            torch.save(ckpt, args.ckpt + ".tmp")
            os.replace(args.ckpt + ".tmp", args.ckpt)  # a kill never leaves half a file
            print("SAVED", flush=True)
    if args.hang:
        while True:  # a long run: the test kills it
            time.sleep(0.05)
    if args.out:
        final = dict(checkpoint(args.mode, model, opt, driver), scales=scales)
        torch.save(final, args.out)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
