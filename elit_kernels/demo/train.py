"""Training for the demo: the model config, tail-dropping training (single process or DDP), checkpoints.

Distributed runs use torch.distributed only: ``torchrun`` sets RANK/WORLD_SIZE, we
``init_process_group("gloo")``, wrap the model in ``DistributedDataParallel`` and shard the data with
``DistributedSampler``. ``--batch`` is the global batch; each rank takes ``batch // world_size``.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from .._cli import local_rank
from ..flow import logit_normal, rectified_flow_loss, sample_budgets
from ..models import ElitConfig, ElitDiT, elit_config, load_model, save_model
from .data import IMAGE_SIZE, NUM_CLASSES, DigitsSplit

def demo_config(j_max: int = 16) -> ElitConfig:
    """The demo model: ``tiny`` (hidden 64, 2 heads, 1 head / 1 core / 1 tail block) on 1x16x16 images.

    Patch 2 -> an 8x8 token grid; 4x4-token windows -> 4 groups of 16 tokens; ``j_max`` latents per
    group (16 = one latent per spatial token, K_max = N as in the paper).

    >>> c = demo_config(); (c.grid, c.groups, c.tokens_per_group, c.latents_per_group)
    (8, 4, 16, 16)
    """
    return elit_config("tiny", 8 * IMAGE_SIZE, in_channels=1, input_size=IMAGE_SIZE, patch=2, window=4,
                       j_max=j_max, num_classes=NUM_CLASSES)


def spread_latent_init(model: ElitDiT, std: float, seed: int) -> None:
    """Redraw the shared latent embeddings with ``std`` from the demo's own seed (the model also starts them at std 1).

    Why: a latent starts as ``latent_embed[j] + group_pos[g]``; the sin-cos ``group_pos`` has norm ~5.7
    at hidden 64 while 0.02-std embeddings have norm ~0.16, so the J latents of a group start nearly
    identical, read the same tokens, and the extra latents stay unused for hundreds of steps (measured:
    held-out loss flat across budgets after 1000 steps). With std 1 they differ from the first step;
    ElitDiT now initialises them at std 1 for this reason.
    """
    if std > 0:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            model.latent_embed.copy_(torch.randn(model.latent_embed.shape, generator=g) * std)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group when launched by torchrun (RANK and WORLD_SIZE in the environment)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank(), True)


def shutdown_distributed(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@dataclass
class TrainSettings:
    steps: int
    batch: int  # global batch
    lr: float = 4e-3
    warmup: int = 50
    j_min: int = 1
    per_sample_budgets: bool = False
    class_dropout: float = 0.1  # null-class label drop, so classifier-free guidance has something to use
    seed: int = 0
    grad_clip: float = 1.0
    progress: bool = True


def _lr_at(step: int, s: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    frac = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))


def _index_batches(sampler: DistributedSampler, per_rank: int):
    """Endless stream of index batches; every rank sees the same number of batches per epoch."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        idx = torch.tensor(list(iter(sampler)), dtype=torch.long)
        for i in range(0, idx.numel() - per_rank + 1, per_rank):
            yield idx[i:i + per_rank]
        epoch += 1


def train(model: ElitDiT, data: DigitsSplit, s: TrainSettings, info: DistInfo = DistInfo()) -> dict:
    """Train ``model`` in place with rectified flow and tail dropping; returns training statistics.

    Per-batch budgets (the paper) come from a generator seeded identically on every rank, so all ranks
    drop the same tail in a step; per-sample budgets (``per_sample_budgets``) are drawn per rank.
    Every parameter gets a gradient each step even when J̃ < J_max (the dropped rows of
    ``latent_embed`` get zeros), so DDP runs with ``find_unused_parameters=False``.
    """
    j_max = model.cfg.latents_per_group
    if not 1 <= s.j_min <= j_max:
        raise ValueError(f"j_min: expected 1 <= j_min <= J_max = {j_max}, got {s.j_min}")
    if s.batch % info.world_size:
        raise ValueError(f"batch: the global batch {s.batch} must be divisible by the {info.world_size} processes")
    per_rank = s.batch // info.world_size
    n_train = data.train_x.shape[0]
    if per_rank > n_train // info.world_size:
        raise ValueError(f"batch: {per_rank} per process exceeds the {n_train // info.world_size} training images per process")
    model.train()
    net = DistributedDataParallel(model, find_unused_parameters=False) if info.enabled else model
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.0, betas=(0.9, 0.99))
    sampler = DistributedSampler(range(n_train), num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=s.seed, drop_last=True)
    batches = _index_batches(sampler, per_rank)
    shared_gen = torch.Generator().manual_seed(10_007 * s.seed + 1)  # same on every rank: per-batch J̃
    rank_gen = torch.Generator().manual_seed(10_007 * s.seed + 2 + 7919 * info.rank)  # t, noise, labels
    null = model.null_class
    from tqdm.auto import tqdm

    bar = tqdm(range(s.steps), desc="train", disable=not (s.progress and info.is_main), dynamic_ncols=True)
    smooth, t0, last, first_budgets = None, time.perf_counter(), float("nan"), []
    for step in bar:
        idx = next(batches)
        x0, y = data.train_x[idx], data.train_y[idx].clone()
        y[torch.rand(per_rank, generator=rank_gen) < s.class_dropout] = null
        gen = rank_gen if s.per_sample_budgets else shared_gen
        budgets = sample_budgets(per_rank, s.j_min, j_max, per_sample=s.per_sample_budgets, generator=gen)
        t = logit_normal(per_rank, generator=rank_gen)
        noise = torch.randn(x0.shape, generator=rank_gen)
        if step < 8:
            first_budgets.append(budgets)
        loss = rectified_flow_loss(net, x0, y, budgets, t=t, noise=noise)  # forward through the DDP wrapper
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if s.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        last = loss.item()
        smooth = last if smooth is None else 0.98 * smooth + 0.02 * last
        bar.set_postfix(loss=f"{smooth:.4f}", J=budgets[0] if not s.per_sample_budgets else "ragged", refresh=False)
    bar.close()
    model.eval()
    in_sync = _params_in_sync(model) if info.enabled else None
    return {"ddp_params_in_sync": in_sync, "seconds": time.perf_counter() - t0, "final_train_loss_smoothed": smooth, "final_train_loss": last,
            "per_rank_batch": per_rank, "world_size": info.world_size, "budgets_first_steps_rank0": first_budgets}


def _params_in_sync(model) -> bool:
    """Every rank holds the same weights: a check that DDP averaged every gradient, dropped tails included."""
    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    lo, hi = flat.clone(), flat.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


def save_checkpoint(path: str, model: ElitDiT, meta: dict | None = None) -> None:
    """The model file of ``elit_kernels.models.save_model`` (config + state_dict + meta; torch or safetensors
    by extension), loadable with ``weights_only=True``."""
    save_model(path, model, meta)


def load_checkpoint(path: str, backend: str | None = None) -> tuple[ElitDiT, dict]:
    """Rebuild the exact model of a checkpoint (``save_checkpoint``'s, or an older ``elit-demo/1`` file)."""
    return load_model(path, backend=backend, return_meta=True)
