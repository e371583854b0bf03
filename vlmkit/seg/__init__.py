"""Segmentation outputs: Text4Seg text-as-mask codec and stage (``text4seg``), referring-segmentation
data conversion (``refseg_data``) and segment-anything helpers (``sam``).

Nothing is imported here on purpose: import the submodule you need (``import vlmkit.seg`` does no work).
"""
