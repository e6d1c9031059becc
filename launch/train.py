"""Entry for torchrun / srun: `torchrun --nproc_per_node N launch/train.py --preset NAME ...`.

Same main as the `mm1-train` console script.
"""

import sys

from mm1_megatron.cli import main

if __name__ == "__main__":
    sys.exit(main())
