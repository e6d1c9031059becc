#!/usr/bin/env python
"""Export a Megatron MM1 checkpoint to a HuggingFace directory (same as `mm1-convert-hf`).

    python tools/convert_to_hf.py runs/demo hf/demo --preset demo [--decoder-only DIR] [--no-verify]
"""

import sys

from mm1_megatron.convert.to_hf import main

if __name__ == "__main__":
    sys.exit(main())
