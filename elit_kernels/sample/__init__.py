"""``elit-sample``: images from an ELIT checkpoint at any budget mix, on one device or many, ready for FID.

    elit-sample CKPT --vae VAE_DIR --out OUT --num-samples 50000 --guidance ccfg --cfg-scale 4
    torchrun --nproc_per_node=8 -m elit_kernels.sample CKPT --vae VAE_DIR --out OUT ...

Writes ``OUT/samples/000123.png`` (one per sample, by global index), ``OUT/grid.png`` (contact sheet) and
``OUT/samples.npz`` (``arr_0`` uint8 [N, H, W, 3] as the ADM evaluator reads it, ``labels``, ``budgets``); with
``--latents-only``, ``OUT/latents/000123.npy`` and ``OUT/latents.npz`` instead. The noise, label and budget of
sample i follow from (seed, i) alone; the file layout and the seeding rule: docs/sampling.md. Exit status 2 for a
usage error (the message names the argument), 1 when sampling fails (samples already written are kept; rerun
the same command to resume), 130 after Ctrl-C (the same: samples written are kept), 0 on success.
"""
from .files import LATENT_SCALE, contact_sheet, latents_to_uint8, load_vae, sample_name, write_npz
from .rules import (SamplingError, UsageError, budget_rule, mix_budgets, parse_budget_mix, plan_batches,
                    sample_labels, sample_noise, sample_seed)
from .run import SampleResult, generate
from .cli import build_parser, main

__all__ = ["LATENT_SCALE", "SampleResult", "SamplingError", "UsageError", "budget_rule", "build_parser", "contact_sheet",
           "generate",
           "latents_to_uint8", "load_vae", "main", "mix_budgets", "parse_budget_mix", "plan_batches", "sample_labels",
           "sample_name", "sample_noise", "sample_seed", "write_npz"]
