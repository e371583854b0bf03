"""In-decoder visual-token pruning (``decoder`` stages): FastV (``fastv``), PyramidDrop (``pdrop``), VTW (``vtw``),
DART (``dart``).

The shared machinery (layouts, masks, KV cache, budgets) is ``vlmkit.decoder.prune``; each method is one module
reached through the stage registry, so importing this package does no work.
"""
