"""Runs `run_finetune.main()` and records which training samples this process put in each batch.

Launched by tests/test_run_finetune_distributed.py on several processes; writes `<RECORD_DIR>/rank<N>.json` with the
process's rank, the world size and the `sample_index` values of every training batch, in order.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import finetune_utils  # noqa: E402
import run_finetune  # noqa: E402


def main():
    batches = []
    collate = finetune_utils.collate_fn

    def recording_collate_fn(examples):
        if finetune_utils.SAMPLE_INDEX in examples[0]:  # only training examples are numbered
            batches.append([int(example[finetune_utils.SAMPLE_INDEX]) for example in examples])
        return collate(examples)

    finetune_utils.collate_fn = recording_collate_fn
    run_finetune.main()
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    record = {"rank": rank, "world_size": world_size, "train_batches": batches}
    Path(os.environ["RECORD_DIR"], f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
