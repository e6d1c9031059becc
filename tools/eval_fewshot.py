"""Few-shot evaluation of a checkpoint: `mm1-eval` (mm1_megatron/evaluation/cli.py).

    python tools/eval_fewshot.py --run-dir runs/demo --preset demo \\
        --task demo_tasks/caption.jsonl --task demo_tasks/vqa.jsonl --shots 0 4 8
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mm1_megatron.evaluation.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
