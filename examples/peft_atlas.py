"""Write the PEFT atlas: which PEFT methods re-weight attention and which only bias it.

    python examples/peft_atlas.py [OUT.md]     # default figures/peft_atlas.md

Every PEFT method acting on attention or its inputs x every architecture probe.hf supports, on
tiny random float64 models (about a minute of CPU); see probe/atlas.py.
"""

import sys
import time
import warnings

from probe.atlas import write_atlas

if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "figures/peft_atlas.md"
    with warnings.catch_warnings():  # PEFT's notices about random initialisations, not ours
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        cells = write_atlas(out)
    print(f"wrote {out}: {len(cells)} cells in {time.perf_counter() - start:.1f} s")
    sys.exit(0 if all(c.verified or c.note for c in cells) else 1)
