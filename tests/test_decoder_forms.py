"""The decoder's two forms (portable; fused attention for ONNX Runtime), its last-position logits,
the ONNX Runtime runner's KV buffers updated in place, the host embedding lookup, and what the
exporter loads and copies (issue 13)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from fsr.models import get_spec
from fsr.models.parts import LOGITS_INDEX
from fsr.runtime.backend import BackendError
from fsr.runtime.onnxrt import KVBuffer, OnnxRuntimeRunner, lookup_table, session_options

SPEC = get_spec("llava")


def _decoder_inputs(cfg, batch: int, seq: int, past: int, pad: int, seed: int = 0, dtype=torch.float32):
    """Embeddings, mask (row 1 left-padded by ``pad``), positions and a past cache of ``past`` positions."""
    g = torch.Generator().manual_seed(seed)
    kvh, hd = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    if batch > 1:
        mask[1, :pad] = 0
    positions = mask.cumsum(1) - 1
    positions[mask == 0] = 1
    x = torch.randn(batch, seq, cfg.hidden_size, generator=g, dtype=dtype)
    caches = [torch.randn(batch, kvh, past, hd, generator=g, dtype=dtype) for _ in range(2 * cfg.num_hidden_layers)]
    return x, mask, positions[:, past:], caches


# ----------------------------------------------------------------------------- PyTorch forms


def test_fused_step_matches_the_portable_step_in_pytorch(tiny_model):
    """The fused form (custom op's eager reference) computes what the model's own attention does:
    prefill with left padding, then decode steps on plain caches and on a preallocated buffer."""
    cfg = tiny_model.model.config.text_config
    portable = SPEC.decoder_step(tiny_model, 0, 2)
    fused = SPEC.decoder_step(tiny_model, 0, 2, attention="fused")
    x, mask, pos, empty = _decoder_inputs(cfg, 2, 7, 0, pad=3)
    with torch.no_grad():
        want = portable(x, mask, pos, *empty, logits_index=torch.arange(7))
        got = fused(x, mask, pos, *empty, logits_index=torch.arange(7))
        torch.testing.assert_close(got[0][0], want[0][0])  # row 0: no padding, every position
        torch.testing.assert_close(got[0][1, 3:], want[0][1, 3:])  # row 1: the real positions
        for a, b in zip(got[1:], want[1:]):  # padded positions hold what nothing ever attends to
            torch.testing.assert_close(a[0], b[0])
            torch.testing.assert_close(a[1, :, 3:], b[1, :, 3:])
        last = fused(x, mask, pos, *empty)
        assert last[0].shape == (2, 1, cfg.vocab_size)
        torch.testing.assert_close(last[0][:, 0], got[0][:, -1])
        # decode: plain caches vs a buffer of capacity 12 holding the same 7 positions
        caches = list(got[1:])
        buffers = [torch.cat([c, torch.full((2, c.shape[1], 5, c.shape[3]), 7.0)], dim=2) for c in caches]
        for step in range(3):
            x1 = torch.randn(2, 1, cfg.hidden_size, generator=torch.Generator().manual_seed(10 + step))
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            p1 = pos[:, -1:] + 1 + step
            ref = portable(x1, mask, p1, *caches)
            plain = fused(x1, mask, p1, *caches)
            inplace = fused(x1, mask, p1, *buffers)
            torch.testing.assert_close(plain[0], ref[0])
            torch.testing.assert_close(inplace[0], ref[0])
            total = mask.shape[1]
            for r, b in zip(ref[1:], inplace[1:]):
                assert b.shape[2] == 12
                torch.testing.assert_close(b[:, :, :total], r)
            caches, buffers = list(ref[1:]), list(inplace[1:])


def test_decoder_step_refuses_an_unknown_attention_form(tiny_model):
    with pytest.raises(ValueError, match="attention form"):
        SPEC.decoder_step(tiny_model, 0, 2, attention="flash")


# ----------------------------------------------------------------------------- the exported forms


def test_the_forms_share_one_weight_file(export_none):
    """decoder.onnx and decoder.ort.onnx refer to one decoder.onnx.data: every weight is stored once."""
    from fsr.manifest import read_manifest

    entry = read_manifest(export_none).graph("decoder")
    assert [f.path for f in entry.files] == ["decoder.onnx", "decoder.onnx.data"]
    form = entry.forms["ort"]
    assert [f.path for f in form.files] == ["decoder.ort.onnx", "decoder.onnx.data"] and form.runtime == "onnxruntime"
    assert [t.name for t in entry.optional_inputs] == [LOGITS_INDEX]
    assert LOGITS_INDEX not in entry.input_names
    weights = {}
    for name in ("decoder.onnx", "decoder.ort.onnx"):
        model = onnx.load(export_none / name, load_external_data=False)
        ops = {n.op_type for n in model.graph.node}
        assert ("GroupQueryAttention" in ops) == (name == "decoder.ort.onnx"), name
        external = {}
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in t.external_data}
                assert info["location"] == "decoder.onnx.data"
                external[(int(info["offset"]), int(info["length"]))] = t.name
            else:
                assert len(t.raw_data) <= 1024, f"{name}: {t.name} is stored inline"
        weights[name] = external
    portable, fused = weights["decoder.onnx"], weights["decoder.ort.onnx"]
    assert set(fused) <= set(portable)  # the fused form's weights are the portable form's bytes
    data_bytes = (export_none / "decoder.onnx.data").stat().st_size
    stored = sum(length for _, length in portable)
    assert stored <= data_bytes < stored + 65536 * (len(portable) + 1)  # one copy (+ page alignment)


def _session(path):
    return ort.InferenceSession(str(path), session_options(None, "off"), providers=["CPUExecutionProvider"])


def test_the_fused_graph_computes_what_the_portable_graph_does(export_none, tiny_model):
    cfg = tiny_model.model.config.text_config
    portable, fused = _session(export_none / "decoder.onnx"), _session(export_none / "decoder.ort.onnx")
    assert [i.name for i in fused.get_inputs()] == [i.name for i in portable.get_inputs()]
    assert [o.name for o in fused.get_outputs()] == [o.name for o in portable.get_outputs()]
    assert [i.name for i in portable.get_overridable_initializers()] == [LOGITS_INDEX]
    names = [i.name for i in portable.get_inputs()]
    for batch, seq, past, pad in ((2, 9, 0, 4), (2, 1, 9, 4), (1, 1, 30, 0), (1, 5, 0, 0)):
        x, mask, pos, caches = _decoder_inputs(cfg, batch, seq, past, pad, seed=batch + seq + past)
        feeds = dict(zip(names, [t.numpy() for t in (x, mask, pos, *caches)]))
        want = portable.run(None, feeds)
        got = fused.run(None, feeds)
        assert got[0].shape == (batch, 1, cfg.vocab_size)
        np.testing.assert_allclose(got[0], want[0], atol=2e-5, rtol=1e-4)
        for a, b in zip(got[1:], want[1:]):  # a padded position holds what nothing ever attends to
            np.testing.assert_allclose(a[:1], b[:1], atol=2e-5, rtol=1e-4)
            np.testing.assert_allclose(a[1:, :, pad:], b[1:, :, pad:], atol=2e-5, rtol=1e-4)
        every = portable.run(None, {**feeds, LOGITS_INDEX: np.arange(seq)})[0]
        assert every.shape == (batch, seq, cfg.vocab_size)
        np.testing.assert_allclose(every[:, -1:], want[0], atol=1e-6)


def test_kv_buffers_are_updated_in_place_and_grow(export_none, tiny_model):
    """The fused runner binds one buffer per past/present pair: the returned presents are the same
    buffers, holding what the portable graph returns; a full buffer is replaced by a larger one."""
    cfg = tiny_model.model.config.text_config
    runner = OnnxRuntimeRunner("decoder", export_none / "decoder.ort.onnx", kv_buffers=True, reserve=0).activate()
    portable = _session(export_none / "decoder.onnx")
    names = [i.name for i in portable.get_inputs()]
    x, mask, pos, empty = _decoder_inputs(cfg, 2, 6, 0, pad=2)
    kvh, hd = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    buffers = [KVBuffer.empty((2, kvh, hd), 8, np.float32) for _ in empty]
    feeds = dict(zip(names, [t.numpy() for t in (x, mask, pos)]))
    out = runner.infer({**feeds, **dict(zip(names[3:], buffers))})
    presents = [out[n] for n in runner.output_names[1:]]
    assert all(p is b for p, b in zip(presents, buffers)) and all(b.length == 6 for b in buffers)
    plain = portable.run(None, {**feeds, **dict(zip(names[3:], [t.numpy() for t in empty]))})
    for b, want in zip(buffers, plain[1:]):  # row 1's first two positions are padding
        assert b.shape == want.shape
        np.testing.assert_allclose(np.asarray(b)[0], want[0], atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(b)[1, :, 2:], want[1, :, 2:], atol=2e-5, rtol=1e-4)
    mask_np, caches = mask.numpy(), [np.asarray(b) for b in buffers]
    for step in range(4):  # capacity 8: the third step (9 positions) needs a larger buffer
        x1 = np.random.RandomState(step).randn(2, 1, cfg.hidden_size).astype(np.float32)
        mask_np = np.concatenate([mask_np, np.ones((2, 1), np.int64)], axis=1)
        p1 = pos.numpy()[:, -1:] + 1 + step
        base = {names[0]: x1, "attention_mask": mask_np, "position_ids": p1}
        want = portable.run(None, {**base, **dict(zip(names[3:], caches))})
        got = runner.infer({**base, **dict(zip(names[3:], presents))})
        np.testing.assert_allclose(got["logits"], want[0], atol=2e-5, rtol=1e-4)
        new = [got[n] for n in runner.output_names[1:]]
        grew = mask_np.shape[1] > 8
        assert all((n is not p) == (grew and p.capacity < mask_np.shape[1]) for n, p in zip(new, presents))
        for b, w in zip(new, want[1:]):
            np.testing.assert_allclose(np.asarray(b), w, atol=2e-5, rtol=1e-4)
        presents, caches = new, want[1:]
    with pytest.raises(BackendError, match="positions"):  # a stale buffer is refused, not misread
        runner.infer({**base, **dict(zip(names[3:], presents))})
    runner.deactivate()


def test_a_prefill_that_outgrows_its_buffers_keeps_room_for_the_steps_after_it(export_none, tiny_model):
    """A buffer too small for the prefill is replaced by one with ``reserve`` positions to spare, so the
    decode steps that follow write in place instead of copying the cache again (issue 13: a growth on the
    first decode step cost a copy of every layer's cache)."""
    cfg = tiny_model.model.config.text_config
    runner = OnnxRuntimeRunner("decoder", export_none / "decoder.ort.onnx", kv_buffers=True, reserve=3).activate()
    names = runner.input_names
    x, mask, pos, empty = _decoder_inputs(cfg, 1, 6, 0, pad=0)
    kvh, hd = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    small = [KVBuffer.empty((1, kvh, hd), 4, np.float32) for _ in empty]
    out = runner.infer({**dict(zip(names, [t.numpy() for t in (x, mask, pos)])), **dict(zip(names[3:], small))})
    presents = [out[n] for n in runner.output_names[1:]]
    assert all(p.capacity == 6 + 3 and p.length == 6 for p in presents)
    mask_np = mask.numpy()
    for step in range(3):  # the reserve: no new buffer
        mask_np = np.concatenate([mask_np, np.ones((1, 1), np.int64)], axis=1)
        x1 = np.random.RandomState(step).randn(1, 1, cfg.hidden_size).astype(np.float32)
        got = runner.infer({names[0]: x1, "attention_mask": mask_np, "position_ids": pos.numpy()[:, -1:] + 1 + step,
                            **dict(zip(names[3:], presents))})
        new = [got[n] for n in runner.output_names[1:]]
        assert all(n is p for n, p in zip(new, presents))
    runner.deactivate()


@pytest.mark.parametrize("chunk, past", [(4, 0), (3, 5), (8, 0)], ids=["chunks-4-4-1", "after-a-past", "one-chunk"])
def test_a_chunked_prefill_is_the_prefill(export_none, tiny_model, chunk, past):
    """The fused runner's chunked prefill (batch 1) gives the logits and caches of one run over every
    position; a batch of two runs in one piece (ONNX Runtime's op takes several new positions after a
    past for one row only: a batch of two cannot even run 9 positions after a past in one piece)."""
    cfg = tiny_model.model.config.text_config
    kvh, hd = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    whole = OnnxRuntimeRunner("decoder", export_none / "decoder.ort.onnx", kv_buffers=True, prefill_chunk=0).activate()
    parts = OnnxRuntimeRunner("decoder", export_none / "decoder.ort.onnx", kv_buffers=True,
                              prefill_chunk=chunk).activate()
    names = whole.input_names
    for batch in (1, 2) if past == 0 else (1,):
        x, mask, pos, caches = _decoder_inputs(cfg, batch, 9, past, pad=2, seed=chunk + past)
        if batch == 1:
            mask[0, :2] = 0  # a left-padded single row: the padding bias crosses the chunks
        feeds = dict(zip(names, [t.numpy() for t in (x, mask, pos)]))
        outs = []
        for runner in (whole, parts):
            buffers = [KVBuffer.empty((batch, kvh, hd), past + 12, np.float32) for _ in caches]
            for b, c in zip(buffers, caches):
                b.array[:, :, :past] = c.numpy()
                b.length = past
            outs.append(runner.infer({**feeds, **dict(zip(names[3:], buffers))}))
        a, b = outs
        assert b["logits"].shape == a["logits"].shape == (batch, 1, cfg.vocab_size)
        np.testing.assert_allclose(b["logits"], a["logits"], atol=1e-6, rtol=1e-6)
        for n in whole.output_names[1:]:
            assert b[n].length == a[n].length == past + 9
            np.testing.assert_allclose(np.asarray(b[n]), np.asarray(a[n]), atol=1e-6, rtol=1e-6)
    whole.deactivate()
    parts.deactivate()


def test_prefill_chunk_option(export_none, images, prompts):
    """``prefill_chunk``: 256 by default on the CPU provider, 0 turns it off, anything else but a chunk of
    >= 2 positions is refused; a chunked batch-1 generation gives the tokens of an unchunked one."""
    from fsr.runtime.pipeline import Pipeline

    tokens = {}
    for chunk, want in ((None, 256), (0, 0), (5, 5)):
        with Pipeline(export_none, **({} if chunk is None else {"prefill_chunk": chunk})) as pipe:
            assert pipe.runners["decoder"].prefill_chunk == want
            tokens[want] = pipe.generate(images[:1], prompts[:1], max_new_tokens=6)[0].token_ids
    assert tokens[5] == tokens[0] == tokens[256]
    for bad in (1, -4, "many", 2.5):
        with pytest.raises(BackendError, match="prefill_chunk"):
            Pipeline(export_none, prefill_chunk=bad)


# ----------------------------------------------------------------------------- the pipeline


def test_pipeline_forms_and_options_generate_the_same(export_none, images, prompts):
    """Fused form + KV buffers + embedding lookup (default) vs the portable graph run plainly with the
    embed graph: identical tokens, batch 2 with left padding; every position's logits on request."""
    from fsr.runtime.pipeline import Pipeline

    results = {}
    for label, opts in (("fast", {}), ("plain", {"fused": False, "embed_lookup": False, "spin": "on"})):
        with Pipeline(export_none, **opts) as pipe:
            assert (pipe.embedding_table is None) == (label == "plain")
            assert ("embed" in pipe.runners) == (label == "plain")
            assert pipe.runners["decoder"].kv_buffers == (label == "fast")
            results[label] = [r.token_ids for r in pipe.generate(images[:2], prompts[1:3], max_new_tokens=8)]
            request = pipe.prepare(images[:1], prompts[:1])
            inputs = pipe.assemble(request.rows, pipe.vision(request, None))
            last = pipe.prefill(inputs).logits
            every = pipe.prefill(inputs, all_logits=True).logits
            assert last.shape[1] == 1 and every.shape[1] == inputs.attention_mask.shape[1]
            np.testing.assert_allclose(every[:, -1:], last, atol=1e-5)
    assert results["fast"] == results["plain"]


def test_embedding_lookup_is_the_embed_graph(export_none, tmp_path):
    table = lookup_table(export_none / "embed.onnx")
    session = _session(export_none / "embed.onnx")
    ids = np.random.RandomState(0).randint(0, table.shape[0], size=(3, 17))
    np.testing.assert_array_equal(table[ids], session.run(None, {"input_ids": ids})[0])
    # a graph that does more than a lookup runs as a graph
    model = onnx.load(export_none / "embed.onnx")
    out = model.graph.output[0].name
    model.graph.output[0].name = "scaled"
    model.graph.node.append(onnx.helper.make_node("Mul", [out, out], ["scaled"]))
    onnx.save(model, tmp_path / "scaled.onnx")
    assert lookup_table(tmp_path / "scaled.onnx") is None


def test_backend_options_are_checked(export_none):
    from fsr.runtime.pipeline import Pipeline

    with pytest.raises(BackendError, match="spin"):
        session_options(None, "sometimes")
    with pytest.raises(BackendError, match="spin"):
        Pipeline(export_none, spin="sometimes")
    with pytest.raises(BackendError, match="fused"):
        Pipeline(export_none, fused="maybe")
    def entry(opts, key):
        try:
            return opts.get_session_config_entry(key)
        except RuntimeError:  # not set
            return None

    for mode in ("off", "stop", "on"):
        opts = session_options(2, mode)
        assert opts.intra_op_num_threads == 2
        assert (entry(opts, "session.intra_op.allow_spinning") == "0") == (mode == "off")
        assert (entry(opts, "session.force_spinning_stop") == "1") == (mode == "stop")


# ----------------------------------------------------------------------------- export memory


def test_export_of_a_checkpoint_in_fp16_loads_fp16(export_none, tmp_path, monkeypatch):
    """``fsr-export llava --model FOLDER --dtype fp16`` on an fp32 checkpoint: what is loaded is fp16
    (the model and the CLIP tower), and the exporter converts nothing (no second copy)."""
    import fsr.export
    import fsr.export.exporter as exporter
    from fsr.cli import run_app
    from fsr.export.cli import app

    source = export_none / "source"
    assert next(iter(_safetensors_dtypes(source))) == "F32"  # the checkpoint on disk is fp32
    seen = {}

    def fake_export(loaded, output, settings, **kwargs):
        seen["model"] = {p.dtype for p in loaded.model.parameters()}
        seen["clip"] = {p.dtype for p in loaded.clip.parameters()}
        seen["same"] = exporter._in_dtype(loaded, torch.float16) is loaded
        output.mkdir(parents=True)
        return output

    monkeypatch.setattr(fsr.export, "export_model", fake_export)
    monkeypatch.setattr(exporter, "converted_copy", lambda *a: pytest.fail("the exporter copied the model"))
    code = run_app(app, ["llava", "--model", str(source), "--dtype", "fp16", "--method", "none",
                         "-o", str(tmp_path / "out")], prog_name="fsr-export")
    assert code == 0
    assert seen == {"model": {torch.float16}, "clip": {torch.float16}, "same": True}


def test_a_model_in_another_dtype_is_converted_without_a_full_precision_copy(tiny_model):
    from fsr.export.exporter import _in_dtype

    loaded = _in_dtype(tiny_model, torch.float16)
    assert loaded is not tiny_model and loaded.model is not tiny_model.model
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float16}
    assert {p.dtype for p in tiny_model.model.parameters()} == {torch.float32}  # the caller's is untouched
    ours = {id(p) for p in tiny_model.model.parameters()}
    assert not ours & {id(p) for p in loaded.model.parameters()}
    theirs = dict(tiny_model.model.named_parameters())
    for name, p in loaded.model.named_parameters():
        torch.testing.assert_close(p, theirs[name].half())
    # tied weights stay tied
    assert len({id(p) for p in loaded.model.parameters()}) == len(ours)


def _safetensors_dtypes(folder):
    import json
    import struct

    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        yield from (v["dtype"] for k, v in header.items() if k != "__metadata__")
