"""The benchmark cases: uniform budgets, mixed (ragged) batches, guidance, and the two baselines.

Every preset (``paper``, ``released``; models.config) gets its own cases. Within a preset every case shares
one set of weights (an ``ElitDiT``; per-backend shallow copies differ only in their ``backend`` attribute;
the official-style dense wrapper runs the same weights the way the official code does, and the plain DiT
mirrors its size), so each table compares equal work.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch

from ..flow import euler_sample, guided_velocity
from ..models import ElitDiT, GraphedForward, PlainDiT
from .dense_baseline import OfficialStyleElit
from .timing import Case
from .timing import Case as _Case

SCENARIOS = ("uniform", "mixed", "guidance", "baselines", "sampling")
#: what runs without --scenarios: "sampling" (a whole multi-step sampling run per case) is asked for by name
DEFAULT_SCENARIOS = ("uniform", "mixed", "guidance", "baselines")
#: the --backends name of default dispatch (backend=None: the fastest measured backend per attention call)
DEFAULT = "default"
#: --backends suffixes: "+graph" replays each forward from a CUDA graph per budget signature
#: (elit_kernels.models.capture); "+compile" runs torch.compile(model, fullgraph=True) (inductor; one compile per
#: budget signature, during the warm-up)
WRAPPERS = ("graph", "compile")


def split_backend(name: str) -> tuple[str | None, str]:
    """``"default+graph"`` -> ``(None, "graph")``: the model's backend attribute and how its forwards run
    (``""``: eager, ``"graph"``, ``"compile"``)."""
    base, _, wrap = name.partition("+")
    return (None if base == DEFAULT else base), wrap


def _wrap(model, wrap: str):
    if wrap == "graph":
        return GraphedForward(model)
    if wrap == "compile":
        return torch.compile(model, fullgraph=True)
    return model
GUIDANCE_SCALE = 4.0  # any non-zero scale: guided_velocity skips the weak pass at 0


@dataclass
class Setup:
    cfgs: dict  # preset ("paper", "released") -> ElitConfig of the same size; every preset is benchmarked
    device: torch.device
    dtype: torch.dtype
    batch: int
    budgets: list[int]  # uniform budgets, ascending, ending at J_max
    backends: list[str]
    scenarios: list[str]
    seed: int = 0
    sampling_steps: int = 50  # Euler steps of one "sampling" case


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Fresh random weights: a freshly initialised DiT is all zeros in its adaLN/output layers, and
    timing a network that multiplies zeros is not timing a trained one. Norm gains stay near 1."""
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)  # on the model's device: XL/2 has 675M weights
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, device=dev) * std
            p.copy_(noise + 1.0 if name.endswith("norm.weight") or ".norm" in name and name.endswith("weight") else noise)


def mixed_budgets(budgets: list[int], batch: int) -> list[int]:
    """Per-sample budgets spread over the uniform list, smallest to largest (batch >= 2)."""
    n = len(budgets)
    return [budgets[round(i * (n - 1) / (batch - 1))] for i in range(batch)]


def build_cases(s: Setup) -> tuple[list[Case], dict]:
    """All cases of a run (every preset of ``s.cfgs``), in the order they are visited each repeat, plus
    run metadata."""
    cases, meta = [], {}
    for i, (preset, cfg) in enumerate(s.cfgs.items()):
        c, meta = _preset_cases(s, preset, cfg, s.seed + 10 * i)
        cases += c
    return cases, meta


def _preset_cases(s: Setup, preset: str, cfg, seed: int) -> tuple[list[Case], dict]:
    dev, dt, b = s.device, s.dtype, s.batch
    Case = functools.partial(_Case, preset=preset)  # noqa: N806  (every case of this preset carries it)
    jm = cfg.latents_per_group
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g).to(dev, dt)
    t = torch.rand(b, generator=g).to(dev)
    y = torch.randint(0, cfg.num_classes, (b,), generator=g).to(dev)

    with dev:  # build on the device: initialising XL/2 on the host first costs seconds of the GPU budget
        base = ElitDiT(cfg)
    base = base.to(dev, dt).eval()
    randomize_(base, seed)
    elit, eager = {}, {}  # eager: the module itself (FLOP counts, backend switching); elit: what a case calls
    for be in s.backends:
        m = copy.copy(base)  # shares every parameter and submodule; only .backend differs
        m.backend, wrap = split_backend(be)
        eager[be] = m
        elit[be] = _wrap(m, wrap)
    want = set(s.scenarios)
    official = OfficialStyleElit(base).eval() if want & {"baselines", "mixed", "guidance", "sampling"} else None
    official_note = ("official code's way: dense SDPA on (B·G, P, C) reshapes"
                     + (", all P latents through Read/Write, kept ones gathered for the core" if cfg.budget_core_only else ""))
    plain = {}
    if "baselines" in want:
        with dev:
            pbase = PlainDiT(cfg)
        pbase = pbase.to(dev, dt).eval()
        randomize_(pbase, seed + 1)
        for be in s.backends:
            if split_backend(be)[1]:
                continue  # graph capture and compiled runs are timed on ElitDiT
            m = copy.copy(pbase)
            m.backend = split_backend(be)[0]
            plain[be] = m
    G = cfg.groups
    cases: list[Case] = []

    def full_key(model, be):
        return (preset, "uniform", "uniform", model, be, jm)

    def fwd(m, xx, tt, yy, bud):
        return lambda: m(xx, tt, yy, bud)

    # Uniform budgets (+ official-style baseline at the same budgets, + plain DiT), budget-major so a
    # repeat visits J = 1, 2, 4, … in turn. The full-budget case of every model is always timed: it is
    # what every ratio is taken against.
    uni_budgets = s.budgets if ("uniform" in want or "baselines" in want) else [jm]
    for j in uni_budgets:
        for be in s.backends:
            if "uniform" in want or j == jm:
                cases.append(Case("uniform", "uniform", "elit", be, j, [j] * b, b, G * j, fwd(elit[be], x, t, y, j),
                                  [eager[be]], ref=full_key("elit", be), count_fn=fwd(eager[be], x, t, y, j),
                                  inputs=(x, t, y)))
        if official is not None and ("baselines" in want or j == jm):
            cases.append(Case("uniform", "uniform", "official", "sdpa_dense", j, [j] * b, b, G * j,
                              fwd(official, x, t, y, j), [official], ref=full_key("official", "sdpa_dense"),
                              note=official_note))
    for be in plain:
        n = cfg.grid * cfg.grid
        cases.append(Case("uniform", "plain_dit", "plain", be, None, [], b, n, fwd(plain[be], x, t, y, None),
                          [plain[be]], ref=full_key("elit", be), note="plain DiT, same size; ratio vs ELIT at J_max"))

    meta = {"weak_budget": max(1, jm // 16), "guidance_scale": GUIDANCE_SCALE}
    if "mixed" in want:
        mb = mixed_budgets(s.budgets, b)
        meta["mixed_budgets"] = mb
        groups = {}
        for i, j in enumerate(mb):
            groups.setdefault(j, []).append(i)
        parts = [(j, torch.tensor(idx, device=dev)) for j, idx in sorted(groups.items())]

        def sum_of_parts(m):
            def run():
                for j, idx in parts:  # one forward per distinct budget: all a one-budget model can do
                    m(x[idx], t[idx], y[idx], j)
            return run

        lat = G * sum(mb) / b
        for be in s.backends:
            m, e = elit[be], eager[be]
            cases.append(Case("mixed", "ragged", "elit", be, max(mb), list(mb), b, lat, fwd(m, x, t, y, mb), [e],
                              ref=full_key("elit", be), note="one forward, a budget per sample",
                              count_fn=fwd(e, x, t, y, mb)))
            cases.append(Case("mixed", "padded", "elit", be, max(mb), [max(mb)] * b, b, G * max(mb),
                              fwd(m, x, t, y, max(mb)), [e], ref=full_key("elit", be),
                              note="every sample padded to the largest budget", count_fn=fwd(e, x, t, y, max(mb))))
            cases.append(Case("mixed", "sum_of_parts", "elit", be, max(mb), list(mb), b, lat, sum_of_parts(m), [e],
                              ref=full_key("elit", be), note=f"{len(parts)} forwards, one per distinct budget",
                              count_fn=sum_of_parts(e)))
        if official is not None:
            cases.append(Case("mixed", "padded", "official", "sdpa_dense", max(mb), [max(mb)] * b, b, G * max(mb),
                              fwd(official, x, t, y, max(mb)), [official], ref=full_key("official", "sdpa_dense")))
            cases.append(Case("mixed", "sum_of_parts", "official", "sdpa_dense", max(mb), list(mb), b, lat,
                              sum_of_parts(official), [official], ref=full_key("official", "sdpa_dense")))

    if "guidance" in want:
        jw = meta["weak_budget"]

        def guided(m, mode):
            return lambda: guided_velocity(m, x, t, y, jm, mode=mode, scale=GUIDANCE_SCALE,
                                           weak_budget=None if mode == "cfg" else jw)

        specs = [("cfg", 2 * jm), ("ccfg_two_pass", jm + jw), ("ccfg", jm + jw)]
        for mode, per in specs:
            for be in s.backends:
                m = elit[be]
                buds = [jm] * (2 * b) if mode == "cfg" else [jm] * b + [jw] * b
                cases.append(Case("guidance", mode, "elit", be, jm, buds, b, G * per, guided(m, mode), [eager[be]],
                                  ref=(preset, "guidance", "cfg", "elit", be, jm), weak_budget=None if mode == "cfg" else jw,
                                  count_fn=guided(eager[be], mode)))
            if official is not None and mode != "ccfg":  # the dense path cannot run a ragged batch
                buds = [jm] * (2 * b) if mode == "cfg" else [jm] * b + [jw] * b
                cases.append(Case("guidance", mode, "official", "sdpa_dense", jm, buds, b, G * per,
                                  guided(official, mode), [official], ref=(preset, "guidance", "cfg", "official", "sdpa_dense", jm),
                                  weak_budget=None if mode == "cfg" else jw))

    if "sampling" in want:
        # A whole CCFG sampling run (Euler, the official sampler's steps) of the batch: ours in one ragged pass per
        # step (conditional at J_max + unconditional at the weak budget), the official way as two passes per step.
        jw, steps = meta["weak_budget"], s.sampling_steps
        meta["sampling_steps"] = steps

        def sampler(m, mode):
            return lambda: euler_sample(m, x, y, steps=steps, budget=jm, mode=mode, scale=GUIDANCE_SCALE,
                                        weak_budget=jw)

        buds = [jm] * b + [jw] * b
        ref = (preset, "sampling", "ccfg_two_pass", "official", "sdpa_dense", jm)
        for be in s.backends:
            cases.append(Case("sampling", "ccfg", "elit", be, jm, buds, b, G * (jm + jw), sampler(elit[be], "ccfg"),
                              [eager[be]], ref=ref, weak_budget=jw, steps=steps,
                              note=f"{steps} Euler steps, CCFG in one ragged pass per step",
                              count_fn=sampler(eager[be], "ccfg")))
        if official is not None:
            cases.append(Case("sampling", "ccfg_two_pass", "official", "sdpa_dense", jm, buds, b, G * (jm + jw),
                              sampler(official, "ccfg_two_pass"), [official], ref=ref, weak_budget=jw, steps=steps,
                              note=f"{steps} Euler steps, CCFG as two passes per step (the official sampler)"))
    return cases, meta
