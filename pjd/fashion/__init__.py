"""The embedded default model's parts: Fashion-MNIST IDX reader (``idx``), VQ tokenizer (``vq``),
quality classifier (``classifier``), loader (``default``; also ``pjd.models.default``), and the
training commands ``python -m pjd.fashion.train_vq | train_classifier | train_gpt | evaluate``
(docs/default_model.md)."""
