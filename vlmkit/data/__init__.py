"""Data for vlmkit: the ``shapes`` synthetic benchmark (``vlmkit.data.shapes``), COCO RLE masks
(``vlmkit.data.rle``), dataset readers and collators.

Nothing is imported here on purpose: import the submodule you need, so ``import vlmkit.data``
stays free of import-time work.
"""
