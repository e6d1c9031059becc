#!/usr/bin/env python
"""Import HF CLIP vision + Llama weights (or an exported MM1) into a Megatron MM1 checkpoint
(same as `mm1-import-hf`).

    python tools/convert_from_hf.py runs/init --preset mm1-3b --clip CLIP_DIR --llama LLAMA_DIR
"""

import sys

from mm1_megatron.convert.from_hf import main

if __name__ == "__main__":
    sys.exit(main())
