"""Host-side input pipeline (grain): sources, buckets, Real-ESRGAN degradations, evaluation presets.

Host code is NumPy/OpenCV/PIL only (no JAX). Inside the host pipeline images are uint8 HWC RGB;
batches leave it as float32 NHWC in [-1, 1] (the package convention) unless
``config.data.output = "uint8"``.

* ``defaults``: every data number (``config.data``), Real-ESRGAN x4plus defaults, paper presets.
* ``degradations``: the Real-ESRGAN second-order model (§3.2: "degraded using methods similar
  to [48]").
* ``eval_presets``: ``sr16``, ``sr8``, ``mix``, ``fig4`` — ``make_eval_pair(hq, preset, seed)``.
* ``decode``: robust decoding and the skipped-file log. ``sources``: folder, TFDS, ArrayRecord.
* ``buckets``: multi-resolution crop sizes. ``pipeline``: ``create_train_iterator``,
  ``create_eval_dataset``. ``prepare``: ``python -m zipir_jax.data.prepare``.
"""
