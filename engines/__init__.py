"""fsr.engines: TensorRT engines for an fsr-export folder (``fsr-build``).

- ``builder``: `build_engines(export_dir, BuildSettings(...))`, one engine per graph;
- ``loader``: `EngineBytesFromOnnx(path, profiles, precision)`, a Polygraphy-style lazy loader;
- ``profiles``: optimization profiles from the manifest's named dimensions and the flags;
- ``precision``: the fp16/bf16 rewrite for strongly typed engines;
- ``records``: engine entries in the manifest, `check_engine_fresh` (no GPU needed);
- ``plugin_graph``: ``vision.plugin.onnx`` and ``libfsr_plugin.so``;
- ``trt_import``: `import_tensorrt()`, full TensorRT or TensorRT-RTX, whichever is installed;
- ``cli``: the ``fsr-build`` command.

See README.md beside this file.
"""
