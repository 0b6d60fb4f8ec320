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

``unpruned_margin`` describes the unpruned model's own decisions: the gap between its top
two next-token probabilities per step (median, smallest, largest). A near-flat distribution
(gaps of a few hundredths, as with random weights) makes any change of the input flip the
top-1 token, so agreement figures then say little about a method.

A method that prunes inside the LLM (``prunes_in == "llm"``, PIO-FVLM) gets the whole image
and prunes between the LLM's layers with its readable reference
(`PruningMethod.reference_step_logits`); its ``kept_tokens`` is the mean number of image
tokens per LLM layer, so its rows sit beside the vision-side methods' at equal average
budget. A method that cannot run on the model (an LLM too shallow for its schedule) or at a
budget (no schedule for it) is listed under ``skipped`` with the reason.

Methods are the registry's pruning methods with a readable reference
(`fsr.pruning.methods`: FSR and the training-free baselines ``saliency-topk``,
``uniform``, ``random``): the export's own method runs with the manifest's settings, the
others with their defaults, each at every budget (`PruningMethod.with_budget`). The
vision tower runs once per sample for the union of the inputs the methods read. A row is
flagged ``identity`` where the method says the LLM then sees exactly the unpruned image
tokens (`PruningMethod.is_identity`: a budget >= N for most; never for VisionZip, which
always hands the [CLS] token on); such a row must agree 100% with KL exactly 0.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from fsr.compare.errors import CompareError
from fsr.compare.teacher import (
    greedy, kl_divergence, log_softmax, prefix_embeds, prompt_rows, pruned_step_logits, step_logits,
)
from fsr.errors import FsrError
from fsr.manifest import Manifest
from fsr.pruning.methods import BEFORE_PROJECTOR, PruningMethod, methods as all_methods

#: budgets of the report besides the image's own token count (the identity, always included by default)
DEFAULT_BUDGETS = (192, 128, 64)


def available_methods() -> dict[str, PruningMethod]:
    """The registry's pruning methods that have a readable reference, by name."""
    return {m.name: m for m in all_methods() if m.prunes and m.has_reference()}


def method_settings(method: PruningMethod, manifest: Manifest):
    """The settings a method runs with here: the export's own method the manifest's, others their defaults."""
    if method.name == manifest.method.name:
        return method.settings_from_json(manifest.method.settings)
    return method.settings()


@dataclasses.dataclass
class FidelityRow:
    method: str
    budget: int
    kept_tokens: int
    identity: bool
    samples: int
    steps: int
    first_token_agreement: float
    top1_agreement: float
    kl_mean: float
    kl_max: float
    per_sample: list[dict] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@torch.no_grad()
def pruning_fidelity(pipe, manifest: Manifest, samples, budgets=None, *, methods: list[str] | None = None,
                     max_new_tokens: int = 16) -> dict:
    """The fidelity report as a JSON-able dict (``rows``: one per method and budget).

    ``pipe`` is the export's ``ReferencePipeline``; an export without relevance (``--method none``)
    still gets it here (CLIP when the model has a CLIP text tower, else the LLM-embedding fallback)."""
    start = time.perf_counter()
    if budgets is None:
        budgets = (manifest.image.num_image_tokens, *DEFAULT_BUDGETS)
    registry = available_methods()
    methods_given = bool(methods)
    methods = list(methods or registry)
    unknown = [m for m in methods if m not in registry]
    if unknown:
        raise CompareError(f"unknown pruning method(s) {unknown}; fsr.pruning provides {', '.join(registry)}")
    relevance = pipe.relevance or pipe.spec.relevance_info(pipe.loaded, "auto").source
    chosen = {m: registry[m] for m in methods}
    settings = {m: method_settings(method, manifest) for m, method in chosen.items()}
    skipped: dict[str, str] = {}
    num_layers, n_image = manifest.llm.num_layers, manifest.image.num_image_tokens
    for m in list(chosen):  # a method that cannot run on this model (an LLM too shallow for its schedule)
        try:
            chosen[m].check_model(settings[m], num_layers=num_layers, num_image_tokens=n_image)
        except FsrError as exc:
            if methods_given:
                raise CompareError(f"pruning method {m!r} cannot run on this model: {exc}") from exc
            skipped[m] = str(exc)
            del chosen[m], settings[m]
    methods = list(chosen)
    needed = ("tokens",) + tuple(n for m, method in chosen.items() for n in method.inputs(settings[m], True))
    tower = pipe.tower(tuple(dict.fromkeys(needed)), relevance)
    projector = pipe.spec.projector(pipe.loaded)
    rows = prompt_rows(pipe, [s.prompt for s in samples])
    per = {(m, b): [] for m in methods for b in budgets}
    sequences = []
    margins: list[np.ndarray] = []
    num_tokens = None
    for sample, row in zip(samples, rows):
        request = pipe.prepare([sample.image], [sample.prompt])
        text = pipe.instruction_embeds(request.instructions, relevance)
        feeds = pipe.spec.vision_feeds(request.vision, text, pipe.dtype)
        outs = tower(*(torch.from_numpy(feeds[n]) for n in tower.input_names))
        outs = dict(zip(tower.outputs, outs if isinstance(outs, tuple) else (outs,)))
        tokens = outs["tokens"]
        num_tokens = tokens.shape[1]
        unpruned_prefix = prefix_embeds(pipe, row, tokens[0])
        sequence = greedy(pipe, unpruned_prefix, max_new_tokens)
        sequences.append({**sample.to_json(), "token_ids": sequence})
        reference = step_logits(pipe, unpruned_prefix, sequence)
        ref_top1 = reference.argmax(-1)
        if len(reference):
            top2 = np.sort(np.exp(log_softmax(reference)), axis=-1)[:, -2:]
            margins.append(top2[:, 1] - top2[:, 0])
        for name, method in chosen.items():
            for budget in budgets:
                at_budget = method.with_budget(settings[name], budget)
                pruned, _ = method.reference(at_budget)(outs)
                if method.placement == BEFORE_PROJECTOR:
                    pruned = projector(pruned)
                if method.prunes_in == "llm":  # the image enters whole; the method prunes between layers
                    try:
                        logits = pruned_step_logits(pipe, method, at_budget, row, pruned[0], sequence)
                    except FsrError as exc:
                        skipped[f"{name} at budget {budget}"] = str(exc)
                        continue
                    kept = method.kept_tokens(at_budget, num_tokens, num_layers)
                else:
                    logits = step_logits(pipe, prefix_embeds(pipe, row, pruned[0]), sequence)
                    kept = int(pruned.shape[1])
                top1 = logits.argmax(-1)
                kl = kl_divergence(reference, logits)
                per[(name, budget)].append({
                    "sample": sample.label, "steps": len(sequence), "kept_tokens": kept,
                    "first_token_agrees": bool(top1[0] == ref_top1[0]),
                    "top1_agreement": float((top1 == ref_top1).mean()),
                    "top1_matches": int((top1 == ref_top1).sum()),
                    "kl_mean": float(kl.mean()), "kl_sum": float(kl.sum()), "kl_max": float(kl.max()),
                })
    out_rows = []
    for (method, budget), items in per.items():
        if not items:
            continue
        steps = sum(i["steps"] for i in items)
        identity = chosen[method].is_identity(chosen[method].with_budget(settings[method], budget), num_tokens)
        out_rows.append(FidelityRow(
            method, budget, items[0]["kept_tokens"], identity, len(items), steps,
            first_token_agreement=float(np.mean([i["first_token_agrees"] for i in items])),
            top1_agreement=sum(i["top1_matches"] for i in items) / steps,
            kl_mean=sum(i["kl_sum"] for i in items) / steps,
            kl_max=max(i["kl_max"] for i in items), per_sample=items).to_json())
    return {
        "computed_in": "PyTorch, on the export's source/ model (no re-export per budget)",
        "teacher_forced_on": "the unpruned model's greedy output",
        "num_image_tokens": num_tokens,
        "method_settings": {m: {k: v for k, v in s.to_json().items() if k != "budget"} for m, s in settings.items()},
        "relevance": relevance,
        "max_new_tokens": max_new_tokens,
        "budgets": list(budgets),
        "methods": methods,
        "skipped": skipped,
        "unpruned_sequences": sequences,
        "unpruned_margin": _margin_summary(margins),
        "rows": out_rows,
        "seconds": time.perf_counter() - start,
    }


def _margin_summary(margins: list[np.ndarray]) -> dict | None:
    """Median, smallest and largest top-1 minus top-2 probability of the unpruned model's steps."""
    if not margins:
        return None
    m = np.concatenate(margins)
    return {"median": float(np.median(m)), "min": float(m.min()), "max": float(m.max()), "steps": int(m.size)}
