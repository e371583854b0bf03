"""``vlmkit.seg.rrle``: the Text4Seg text codec stands apart from the stage and loads no torch."""

from __future__ import annotations

import subprocess
import sys


def test_rrle_imports_without_torch():
    code = (
        "import sys\n"
        "import vlmkit.seg.rrle as R\n"
        "assert 'torch' not in sys.modules, 'importing vlmkit.seg.rrle loaded torch'\n"
        "g = R.mask_to_labels(R.np.eye(4, dtype=bool), 'dog', 4, 4)\n"
        "d = R.decode_answer(R.wrap_answer('ok', R.encode_rrle(g)), 4, 4)\n"
        "assert d.ok and (d.grid == g).all()\n"
        "assert 'torch' not in sys.modules, 'the codec loaded torch'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr

