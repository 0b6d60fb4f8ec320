"""Teacher-forced next-token logits on the reference LLM (PyTorch).

Given the image tokens the LLM sees (all of them, or a pruned set) and a continuation
(the unpruned model's greedy output), one forward pass over ``prompt + continuation``
gives the next-token logits of every generation step: step ``t`` is the distribution of
token ``t`` given the prompt and tokens ``0..t-1``. Running two image-token sets on the
same continuation compares their distributions step by step without either one's own
earlier choices leaking in.
"""

from __future__ import annotations

import numpy as np
import torch

from fsr.models.spec import ImageFeatures
from fsr.runtime.reference import cut_after_eos


def prompt_rows(pipe, prompts: list[str]) -> list[list[int]]:
    """Token ids of the chat-formatted prompts (one image token each)."""
    texts = [pipe.spec.format_prompt(pipe.processor, p) for p in prompts]
    return pipe.spec.tokenize(pipe.processor, texts, pipe.manifest.image.image_token_id)


@torch.no_grad()
def prefix_embeds(pipe, row: list[int], image_embeds: torch.Tensor) -> torch.Tensor:
    """[1, L, H]: the prompt's embeddings with its image token replaced by ``image_embeds`` [K, H]
    (the pipelines' own prefill assembly, batch 1)."""
    inputs = pipe.assemble([row], ImageFeatures([[image_embeds.detach().cpu().numpy()]]))
    return torch.from_numpy(inputs.inputs_embeds)


@torch.no_grad()
def greedy(pipe, prefix: torch.Tensor, max_new_tokens: int) -> list[int]:
    """Greedy continuation of one prefix with Hugging Face ``generate`` (cut after EOS)."""
    out = pipe.model.generate(inputs_embeds=prefix, attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long),
                              max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pipe.pad_id,
                              eos_token_id=sorted(pipe.eos))
    return cut_after_eos(out[0].tolist(), pipe.eos)


@torch.no_grad()
def step_logits(pipe, prefix: torch.Tensor, continuation: list[int]) -> np.ndarray:
    """[T, V] float64 logits of generation steps ``0..T-1`` (T = len(continuation))."""
    if not continuation:
        return np.zeros((0, pipe.manifest.llm.vocab_size))
    fed = continuation[:-1]
    embeds = prefix if not fed else torch.cat([prefix, pipe.embedding(torch.tensor([fed]))], dim=1)
    logits = pipe.model(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long)).logits
    start = prefix.shape[1] - 1
    return logits[0, start:start + len(continuation)].double().numpy()


@torch.no_grad()
def pruned_step_logits(pipe, method, settings, row: list[int], image_embeds: torch.Tensor,
                       continuation: list[int]) -> np.ndarray:
    """`step_logits` of a method that prunes inside the LLM: the prompt with all of ``image_embeds``,
    the method's readable reference pruning between the LLM's layers
    (`PruningMethod.reference_step_logits`), teacher-forced on ``continuation``. [T, V] float64."""
    if not continuation:
        return np.zeros((0, pipe.manifest.llm.vocab_size))
    inputs = pipe.assemble([row], ImageFeatures([[image_embeds.detach().cpu().numpy()]]))
    (span,), = inputs.image_spans
    lm, head = pipe.spec.language_model(pipe.loaded)
    logits = method.reference_step_logits(settings, language_model=lm, lm_head=head, embed_tokens=pipe.embedding,
                                          inputs_embeds=torch.from_numpy(inputs.inputs_embeds[0]), image_span=span,
                                          continuation=continuation)
    if logits is None:  # nothing to prune at this budget
        return step_logits(pipe, torch.from_numpy(inputs.inputs_embeds), continuation)
    return logits.double().numpy()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(P || Q) per row, in nats, from logits (float64)."""
    log_p, log_q = log_softmax(p_logits), log_softmax(q_logits)
    return np.maximum((np.exp(log_p) * (log_p - log_q)).sum(axis=-1), 0.0)
