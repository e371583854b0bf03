"""Segmentation outputs: the Text4Seg text-as-mask codec (``rrle``, torch-free) and its output-head stage
(``text4seg``), the READ / LISA ``[SEG]`` head (``read``), prompt-guided mask proposals (``pmp``), the
Mask2Former set criterion they share (``criterion``), the FrozenSeg open-vocabulary model (``frozenseg``),
referring-segmentation data conversion (``refseg_data``) and segment-anything helpers (``sam``).

Nothing is imported here on purpose: import the submodule you need (``import vlmkit.seg`` does no work).
"""
