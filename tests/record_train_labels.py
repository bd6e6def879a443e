"""Runs `run_finetune.main()` and records the labels of every training batch this process trains on.

Launched by tests/test_streaming.py on several processes; writes `<RECORD_DIR>/rank<N>.json` with the process's rank,
the world size and the labels of each training batch, in order, as `train_batch_callback` sees them.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import run_finetune  # noqa: E402


def main():
    batches = []
    run_finetune.main(train_batch_callback=lambda batch: batches.append(batch["labels"].tolist()))
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    record = {"rank": rank, "world_size": world_size, "train_batches": batches}
    Path(os.environ["RECORD_DIR"], f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
