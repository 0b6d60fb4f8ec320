"""Realistic inputs for each exported graph, with explicit shapes.

Polygraphy's default ``DataLoader`` sets every dynamic dimension to 1 and fills inputs
with uniform noise: a decoder would only ever see one token and an empty-ish cache,
and FSR would rank noise. Here every graph gets a list of feed dicts (one per
iteration, a valid Polygraphy data loader) built from real data where it matters:

- ``vision``: images through the export's own image processor, and the instruction
  embedding of the prompt (CLIP text tower, or the LLM-embedding mean), batch 1 and 2;
- ``text_encoder``: the prompts in CLIP-context chunks, batch = number of prompts;
- ``embed``: the chat-formatted prompts, left padded to one batch;
- ``prune_b<K>`` (multi-crop families): the vision outputs of a sample's crops as rows;
- decoder segments: random embeddings and KV caches with past length > 0, a prefill
  chunk with left padding (batch 2) and a one-token decode step (batch 1);
- pruning graphs between segments: random hidden states with an image span, left padding.

All float inputs are cast to the export's dtype (fp16 for an fp16 export).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from fsr.manifest import Manifest, TensorInfo
from fsr.runtime.inputs import clip_chunks


def _cast(value: np.ndarray, spec: TensorInfo) -> np.ndarray:
    return np.ascontiguousarray(value.astype(np.dtype(spec.dtype)))


def _inputs(manifest: Manifest, graph: str) -> dict[str, TensorInfo]:
    return {i.name: i for i in manifest.graph(graph).inputs}


def vision_feeds(pipe, manifest: Manifest, samples) -> list[OrderedDict]:
    """The vision graph's feeds for the samples, batch 1 then batch 2 (the family's preprocessing)."""
    specs = _inputs(manifest, "vision")
    feeds = []
    groups = [samples[:1], samples[1:3]] if len(samples) > 1 else [samples[:1]]
    for group in groups:
        request = pipe.prepare([s.image for s in group], [s.prompt for s in group])
        text = pipe.instruction_embeds(request.instructions)
        values = pipe.spec.vision_feeds(request.vision, text, np.float32)
        feeds.append(OrderedDict((name, _cast(values[name], spec)) for name, spec in specs.items()))
    return feeds


def text_encoder_feeds(pipe, manifest: Manifest, samples) -> list[OrderedDict]:
    width = manifest.relevance.text_max_tokens
    chunks = [clip_chunks(pipe.clip_tokenizer, pipe.spec.instruction_text(pipe.processor, s.prompt), width)
              for s in samples]
    specs = _inputs(manifest, "text_encoder")
    return [OrderedDict(input_ids=_cast(np.concatenate([c[0] for c in chunks]), specs["input_ids"]),
                        attention_mask=_cast(np.concatenate([c[1] for c in chunks]), specs["attention_mask"]))]


def embed_feeds(pipe, manifest: Manifest, samples) -> list[OrderedDict]:
    texts = [pipe.spec.format_prompt(pipe.processor, s.prompt) for s in samples]
    rows = pipe.spec.tokenize(pipe.processor, texts, manifest.image.image_token_id)
    width = max(len(r) for r in rows)
    ids = np.asarray([[pipe.pad_id] * (width - len(r)) + r for r in rows], dtype=np.int64)
    return [OrderedDict(input_ids=_cast(ids, _inputs(manifest, "embed")["input_ids"]))]


def decoder_feeds(pipe, manifest: Manifest, graph: str, seed: int = 0) -> list[OrderedDict]:
    """Random embeddings / KV at realistic scales; past length > 0 in every iteration."""
    specs = manifest.graph(graph).inputs
    llm = manifest.llm
    rng = np.random.RandomState(seed)
    table = pipe.embedding.embed.weight.detach().float().numpy()
    scale = float(table.std()) or 1.0
    feeds = []
    # (batch, new tokens, past length, left padding of row 1)
    for batch, seq, past, pad in ((2, 5, 7, 3), (1, 1, 12, 0)):
        total = past + seq
        mask = np.ones((batch, total), np.int64)
        if batch > 1 and pad:
            mask[1, :pad] = 0
        positions = np.cumsum(mask, axis=1) - 1
        positions[mask == 0] = 1
        feed = OrderedDict()
        for spec in specs:
            name = spec.name
            if name == "attention_mask":
                value = mask
            elif name == "position_ids":
                value = positions[:, past:]
            elif name.startswith("past_key_values."):
                value = rng.randn(batch, llm.num_kv_heads, past, llm.head_dim).astype(np.float32)
            else:  # inputs_embeds, or hidden_states of a later segment
                value = rng.randn(batch, seq, llm.hidden_size).astype(np.float32) * scale
            feed[name] = _cast(value, spec)
        feeds.append(feed)
    return feeds


def prune_feeds(pipe, manifest: Manifest, graph: str, samples) -> list[OrderedDict]:
    """A prune graph (the method's op on host-gathered rows, multi-crop families): the vision
    outputs of the first sample's crops as rows (every token), then one row of half a crop's
    tokens (another token count)."""
    request = pipe.prepare([samples[0].image], [samples[0].prompt])
    outputs = pipe.vision_outputs(request, pipe.instruction_embeds(request.instructions))
    specs = _inputs(manifest, graph)
    half = max(32, next(iter(outputs.values())).shape[1] // 2)
    return [OrderedDict((name, _cast(outputs[name], spec)) for name, spec in specs.items()),
            OrderedDict((name, _cast(outputs[name][-1:, :half], spec)) for name, spec in specs.items())]


def pruning_feeds(pipe, manifest: Manifest, graph: str, seed: int = 0) -> list[OrderedDict]:
    """A pruning graph between decoder segments: random hidden states at the embeddings' scale with
    an image span of the graph's image tokens, text before and after it (the supervised positions
    fall on text), a batch of 2 with left padding and the spans at different places, then batch 1."""
    index = next(i for i, s in enumerate(manifest.decoder_segments) if s.prune_before == graph)
    n = manifest.decoder_segments[index - 1].image_tokens
    specs = {i.name: i for i in manifest.graph(graph).inputs}
    rng = np.random.RandomState(seed)
    scale = float(pipe.embedding.embed.weight.detach().float().numpy().std()) or 1.0
    feeds = []
    for rows in (((5, 12, 0), (3, 9, 5)), ((7, 20, 0),)):  # (text before, text after, left padding) per row
        width = max(before + n + after + pad for before, after, pad in rows)
        mask = np.zeros((len(rows), width), np.int64)
        starts = []
        for b, (before, after, pad) in enumerate(rows):
            pad = width - (before + n + after)
            mask[b, pad:] = 1
            starts.append(pad + before)
        positions = np.cumsum(mask, axis=1) - 1
        positions[mask == 0] = 1
        hidden = rng.randn(len(rows), width, manifest.llm.hidden_size).astype(np.float32) * scale
        values = {"hidden_states": hidden, "attention_mask": mask, "position_ids": positions,
                  "image_start": np.asarray(starts, np.int64)}
        feeds.append(OrderedDict((name, _cast(values[name], spec)) for name, spec in specs.items()))
    return feeds


def graph_feeds(pipe, manifest: Manifest, graph: str, samples, seed: int = 0) -> list[OrderedDict]:
    """The feed dicts for one graph of the export."""
    if graph == "vision":
        return vision_feeds(pipe, manifest, samples)
    if graph == "text_encoder":
        return text_encoder_feeds(pipe, manifest, samples)
    if graph == "embed":
        return embed_feeds(pipe, manifest, samples)
    if graph in manifest.segment_graphs:
        return decoder_feeds(pipe, manifest, graph, seed)
    if graph in manifest.pruning_graphs:
        return pruning_feeds(pipe, manifest, graph, seed)
    if manifest.graph(graph).inputs and manifest.graph(graph).inputs[0].name == "tokens":
        return prune_feeds(pipe, manifest, graph, samples)
    raise ValueError(f"no inputs known for graph {graph!r}")
