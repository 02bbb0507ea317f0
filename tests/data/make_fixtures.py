"""Regenerate the rMD17 test fixtures from ../shared/data/rmd17 (run from the repository root)."""

import numpy as np

for mol in ("ethanol", "aspirin"):
    for split, n in (("train", 48), ("test", 8)):
        src = np.load(f"../shared/data/rmd17/rmd17_{mol}_{split}_01.npz")
        np.savez_compressed(f"tests/data/rmd17_{mol}_{split}_mini.npz",
                            **{k: src[k][:n] if src[k].ndim and k != "nuclear_charges" else src[k] for k in src.files})
