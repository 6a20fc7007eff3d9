import os
import sys
from pathlib import Path

# Tests run from a clean clone without installing: make the packages importable.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Triton kernels run on CPU tensors through the interpreter (set before anything imports triton).
os.environ.setdefault("TRITON_INTERPRET", "1")
# Never write the quickstart cache into the user's home from tests.
os.environ.setdefault("BIOVFM_CACHE", str(ROOT / ".cache" / "test-cache"))
