"""mm1_megatron: MM1-style multimodal LLM pre-training on Megatron-Core."""

import multiprocessing as _mp
import os as _os
import threading as _threading
import time as _time

__version__ = "0.1.0"


def _exit_with_parent(poll_s: float = 0.5) -> None:
    """In a helper process that multiprocessing spawned for us (dist_checkpointing's writer
    Manager re-imports the rank's main module, hence this package): exit as soon as the rank
    that started it is gone. A SIGKILLed rank cannot stop its children, which would otherwise
    live on under PID 1 holding hundreds of MB, run after run."""
    parent = _os.getppid()

    def watch() -> None:
        while _os.getppid() == parent:
            _time.sleep(poll_s)
        _os._exit(1)

    _threading.Thread(target=watch, daemon=True, name="mm1-exit-with-parent").start()


# multiprocessing names a spawned child before it imports the parent's main module.
if _mp.current_process().name != "MainProcess":
    _exit_with_parent()
