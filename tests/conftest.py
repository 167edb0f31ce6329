"""Suite-wide setup that must run before torch compiles anything.

Inductor's on-disk caches are keyed without the CPU vector ISA it generated code for, so a suite run with
`ATEN_CPU_CAPABILITY=avx2` (how CI's AVX2-only path is tested on an AVX-512 machine) reuses kernels generated
16 floats wide and builds them 8 wide, or the reverse: half-written outputs (wrong tokens) or heap corruption.
Each capability gets its own cache folder, so native and emulated runs on one machine never share kernels.
"""

from __future__ import annotations

import getpass
import os
import tempfile

if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    capability = os.environ.get("ATEN_CPU_CAPABILITY", "native").lower()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{capability}"
    )
