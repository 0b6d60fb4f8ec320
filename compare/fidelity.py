"""Pruning fidelity: how much does pruning the image tokens change the model's answers?

Runs in PyTorch on the export's ``source/`` model (the ReferencePipeline's modules), so
one export serves every budget and method without re-exporting. Per sample (image +
prompt):

1. the vision prefix once: ``tokens, features, saliency, relevance``;
2. the **unpruned** model (all N image tokens) generates greedily: sequence ``y``;
3. the unpruned and every pruned variant (method x budget) are teacher-forced on
   ``prompt + y`` (``teacher.step_logits``), which gives each one's next-token
   distribution at every step of ``y``.

Figures per method and budget (pooled over samples):

- ``first_token_agreement``: share of samples whose first generated token (argmax of
  step 0) equals the unpruned model's;
- ``top1_agreement``: share of steps where the pruned argmax equals the unpruned argmax;
- ``kl_mean``: mean over steps of KL(unpruned || pruned) in nats (and ``kl_max``).

Methods are those registered in ``fsr.pruning.PRUNING_METHODS`` (FSR and the training-free
baselines ``saliency-topk``, ``uniform``, ``random``): FSR runs with the manifest's settings,
the baselines with their defaults (``method_settings``). A budget >= N is every method's
identity, so it must agree 100% with KL exactly 0.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from fsr.compare.teacher import greedy, kl_divergence, prefix_embeds, prompt_rows, step_logits

DEFAULT_BUDGETS = (576, 192, 128, 64)


def available_methods() -> dict[str, object]:
    """Pruning methods in ``fsr.pruning`` (``PRUNING_METHODS``), name -> reference function
    ``(tokens, features, saliency, relevance, *, budget, **settings) -> (pruned, kept)``."""
    from fsr.pruning import PRUNING_METHODS

    return dict(PRUNING_METHODS)


def method_settings(method: str, manifest: dict) -> dict:
    """Keyword settings a method runs with here: FSR the manifest's, baselines their defaults."""
    return fsr_settings(manifest) if method == "fsr" else {}


@dataclasses.dataclass
class FidelityRow:
    method: str
    budget: int
    kept_tokens: int
    samples: int
    steps: int
    first_token_agreement: float
    top1_agreement: float
    kl_mean: float
    kl_max: float
    per_sample: list[dict] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def fidelity_pipe(pipe, manifest: dict):
    """A reference pipeline that can compute FSR's relevance, even for a ``--method none`` export."""
    from fsr.runtime.reference import ReferencePipeline

    if pipe.relevance is not None:
        return pipe
    relevance = "clip" if pipe.loaded.clip is not None else "llm-embedding-mean"
    return ReferencePipeline(pipe.loaded, method="fsr", relevance=relevance)


def fsr_settings(manifest: dict) -> dict:
    from fsr.export.llava import ExportSettings

    settings = manifest.get("fsr") or {}
    defaults = ExportSettings()
    return {k: settings.get(k, getattr(defaults, k)) for k in ("alpha", "beta", "rho", "kappa")}


@torch.no_grad()
def pruning_fidelity(pipe, manifest: dict, samples, budgets=DEFAULT_BUDGETS, *, methods: list[str] | None = None,
                     max_new_tokens: int = 16) -> dict:
    """The fidelity report as a JSON-able dict (``rows``: one per method and budget)."""
    from fsr.runtime.inputs import instruction_text, load_image

    start = time.perf_counter()
    pipe = fidelity_pipe(pipe, manifest)
    registry = available_methods()
    methods = list(methods or registry)
    unknown = [m for m in methods if m not in registry]
    if unknown:  # CompareError (a ValueError): fsr-compare prints it and exits 2
        from fsr.compare.run import CompareError

        raise CompareError(f"unknown pruning method(s) {unknown}; fsr.pruning provides {', '.join(registry)}")
    settings = fsr_settings(manifest)
    per_method_settings = {m: method_settings(m, manifest) for m in methods}
    rows = prompt_rows(pipe, [s.prompt for s in samples])
    per = {(m, b): [] for m in methods for b in budgets}
    sequences = []
    num_tokens = None
    for sample, row in zip(samples, rows):
        pixels = pipe.processor.image_processor(images=[load_image(sample.image)], return_tensors="pt")["pixel_values"]
        text = pipe.instruction_embeds([instruction_text(sample.prompt)])
        tokens, features, saliency, relevance = pipe.vision_prefix(pixels.to(pipe.dtype), text)
        num_tokens = tokens.shape[1]
        unpruned_prefix = prefix_embeds(pipe, row, tokens[0])
        sequence = greedy(pipe, unpruned_prefix, max_new_tokens)
        sequences.append({**sample.to_json(), "token_ids": sequence})
        reference = step_logits(pipe, unpruned_prefix, sequence)
        ref_top1 = reference.argmax(-1)
        for method in methods:
            for budget in budgets:
                pruned, _ = registry[method](tokens, features, saliency, relevance, budget=budget,
                                               **per_method_settings[method])
                logits = step_logits(pipe, prefix_embeds(pipe, row, pruned[0]), sequence)
                top1 = logits.argmax(-1)
                kl = kl_divergence(reference, logits)
                per[(method, budget)].append({
                    "sample": sample.label, "steps": len(sequence), "kept_tokens": int(pruned.shape[1]),
                    "first_token_agrees": bool(top1[0] == ref_top1[0]),
                    "top1_agreement": float((top1 == ref_top1).mean()),
                    "top1_matches": int((top1 == ref_top1).sum()),
                    "kl_mean": float(kl.mean()), "kl_sum": float(kl.sum()), "kl_max": float(kl.max()),
                })
    out_rows = []
    for (method, budget), items in per.items():
        steps = sum(i["steps"] for i in items)
        out_rows.append(FidelityRow(
            method, budget, items[0]["kept_tokens"], len(items), steps,
            first_token_agreement=float(np.mean([i["first_token_agrees"] for i in items])),
            top1_agreement=sum(i["top1_matches"] for i in items) / steps,
            kl_mean=sum(i["kl_sum"] for i in items) / steps,
            kl_max=max(i["kl_max"] for i in items), per_sample=items).to_json())
    return {
        "computed_in": "PyTorch, on the export's source/ model (no re-export per budget)",
        "teacher_forced_on": "the unpruned model's greedy output",
        "num_image_tokens": num_tokens,
        "fsr_settings": settings,
        "method_settings": per_method_settings,
        "relevance": pipe.relevance,
        "max_new_tokens": max_new_tokens,
        "budgets": list(budgets),
        "methods": methods,
        "unpruned_sequences": sequences,
        "rows": out_rows,
        "seconds": time.perf_counter() - start,
    }
