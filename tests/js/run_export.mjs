// Run an fsr-export folder (--format transformers.js) with Hugging Face Transformers.js, offline,
// with no code of ours: greedy generation as a user would write it, plus the vision session's
// kept_indices. Prints one JSON line per (image, prompt) pair:
//   {"prompt_ids": [...], "token_ids": [...], "kept_indices": [[...]] | null, "pixel_values": {...}, ...}
// With FSR_TJS_PIXELS=DIR the processor's pixels are written to DIR/pixels_<pair>.f32 (raw float32).
//
//   node run_export.mjs PACKAGE_DIR EXPORT_DIR MAX_NEW_TOKENS IMAGE PROMPT [IMAGE PROMPT ...]
//
// PACKAGE_DIR: a folder where `npm install @huggingface/transformers` ran (its node_modules/).
import { writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

const [packageDir, exportDir, maxNewTokens, ...pairs] = process.argv.slice(2);
if (!pairs.length || pairs.length % 2) {
  console.error('usage: node run_export.mjs PACKAGE_DIR EXPORT_DIR MAX_NEW_TOKENS IMAGE PROMPT [IMAGE PROMPT ...]');
  process.exit(2);
}
const require = createRequire(path.join(path.resolve(packageDir), 'package.json'));
const tjs = await import(pathToFileURL(require.resolve('@huggingface/transformers')).href);
const { env, AutoProcessor, AutoModelForImageTextToText, RawImage } = tjs.default?.env ? tjs.default : tjs;

env.allowRemoteModels = false;                       // offline: the folder is all there is
env.allowLocalModels = true;
const root = path.resolve(exportDir);
env.localModelPath = path.dirname(root) + path.sep;
const modelId = path.basename(root);

// --- what a user writes (the README's example) ---
const processor = await AutoProcessor.from_pretrained(modelId);
const model = await AutoModelForImageTextToText.from_pretrained(modelId);   // dtype: config's transformers.js_config
for (let i = 0; i < pairs.length; i += 2) {
  const [imagePath, prompt] = [pairs[i], pairs[i + 1]];
  const image = await RawImage.read(path.resolve(imagePath));
  const messages = [{ role: 'user', content: [{ type: 'image' }, { type: 'text', text: prompt }] }];
  const text = processor.apply_chat_template(messages, { add_generation_prompt: true });
  const inputs = await processor(image, text);
  const output = await model.generate({ ...inputs, max_new_tokens: Number(maxNewTokens), do_sample: false });
  // ---

  const promptLength = inputs.input_ids.dims.at(-1);
  const tokenIds = Array.from(output.tolist()[0].slice(promptLength), Number);

  // The vision session on the processor's pixels: what the pruning op kept.
  const vision = model.sessions['vision_encoder'];
  const result = await vision.run({ pixel_values: inputs.pixel_values.ort_tensor });
  let kept = null;
  if (result.kept_indices) {
    const [b, k] = result.kept_indices.dims;
    const data = Array.from(result.kept_indices.data, Number);
    kept = Array.from({ length: b }, (_, i) => data.slice(i * k, (i + 1) * k));
  }
  const pixels = inputs.pixel_values.data;
  if (process.env.FSR_TJS_PIXELS) {           // the processor's pixels, raw float32, for a comparison
    writeFileSync(path.join(process.env.FSR_TJS_PIXELS, `pixels_${i / 2}.f32`), Buffer.from(pixels.buffer));
  }
  console.log(JSON.stringify({
    prompt_ids: Array.from(inputs.input_ids.tolist()[0], Number),
    token_ids: tokenIds,
    kept_indices: kept,
    vision_inputs: vision.inputNames,
    vision_outputs: vision.outputNames,
    pixel_values: { dims: inputs.pixel_values.dims, type: inputs.pixel_values.type },
  }));
}
