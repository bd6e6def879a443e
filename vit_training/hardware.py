"""The machine a run trains on: the Accelerator, CPU threads and cores, loader workers, memory, torch.compile."""

import logging
import os
import time
from pathlib import Path

import datasets
import torch
import transformers
from accelerate import Accelerator
from accelerate.tracking import get_available_trackers
from accelerate.state import PartialState
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    FullyShardedDataParallelPlugin,
    ProjectConfiguration,
    TorchDynamoPlugin,
    broadcast_object_list,
    get_int_from_env,
)
from torch import nn

from configuration_vit_custom import ViTCustomConfig
from vit_training.checkpoints import PROGRESS_FILE
from vit_training.errors import TrainingError
from vit_training.mixing import classification_loss

logger = logging.getLogger(__name__)

# Where the trackers log, in the output folder.
LOGGING_DIR = "runs"
# Where launchers say how many processes run on this machine: torchrun and `accelerate launch`, then MPI's.
LOCAL_PROCESS_COUNT_VARIABLES = ["LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE"]
# Multiply-adds of one MLP layer on a batch (batch x tokens x width x MLP width) per thread between which threads are
# chosen by timing a few training steps on one thread and on every core: below the first a second thread only waits
# for the first, above the second it pays everywhere measured. Where the line falls depends on the machine
# (benchmarks/benchmark_threads.py): on 2 cores of an AMD EPYC the digits model (2.1 Mi per thread) trains 0.94x as
# fast on two threads as on one, 28 px images in 7 px patches at width 64 (8.5 Mi) 1.09x, at width 96 (19 Mi) 1.30x;
# on 2 cores of a 2 GHz Xeon the digits gain 1.13x, width 64 1.33x.
TRIAL_WORK_PER_THREAD = (2**20, 2**24)
# Every core is chosen when the trial's steps on them are at least this much faster than on one: more threads also
# lose more when another program takes a core for a while.
MIN_THREAD_SPEEDUP = 1.05
# Alternating rounds of the threads trial: on a shared 2-core machine one round's step times scatter by a third.
THREAD_TRIAL_ROUNDS = 5
# --torch_compile auto tries compiling only when steps this much faster (about the best measured, on small models)
# would save this many seconds over the run: trying costs a compilation (benchmarks/README.md).
BEST_COMPILE_SPEEDUP = 1.5
MIN_COMPILE_SECONDS = 30
# Alternating rounds of compiled and eager steps in the trial.
COMPILE_TRIAL_ROUNDS = 3


def create_accelerator(
    output_dir: Path, seed: int, *, cpu: bool = False, mixed_precision: str | None = None, tracker: str | None = None,
    compile_model: bool = False, num_threads: int | None = None,
) -> Accelerator:
    """The run's Accelerator, with a data order seeded by `seed`, logging (to `tracker`, if any) in
    `output_dir/runs`, and the process's logging and threads set up."""
    if tracker is not None:
        check_tracker(tracker)
    output_dir = Path(output_dir)
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        # A seedable sampler makes the data order a function of (seed, epoch), so a resumed run sees the same batches.
        # non_blocking: copying a batch from pinned memory to the GPU does not block the CPU.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed, non_blocking=True),
        # The scheduler is stepped once per optimizer update, on every process (see `train_one_epoch`).
        step_scheduler_with_optimizer=False,
        log_with=tracker,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / LOGGING_DIR)),
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if compile_model else None,
    )
    if accelerator.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP") == "true":
        shard_on_cpu(accelerator)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # Accelerate would report fp16 and train in fp32: it has no fp16 autocast on the CPU.
        raise TrainingError(
            "Mixed precision fp16 (from --mixed_precision or `accelerate config`) needs a GPU, and this run is on the "
            "CPU. Pass --mixed_precision bf16, which the CPU runs, or --mixed_precision no."
        )
    # Only the main process reports progress; the others report only problems.
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
        force=True,
    )
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    state = ", ".join(line for line in str(accelerator.state).splitlines() if line.strip())
    logger.info(state)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    return accelerator


def shard_on_cpu(accelerator: Accelerator):
    """Train with the FSDP the launcher asked for (`accelerate launch --config_file configs/*_fsdp2.yaml --cpu`) on
    CPU processes too.

    Accelerate (1.15) selects FSDP only for accelerator devices: on CPU processes it would silently train plain data
    parallel, with every weight on every process. PyTorch's FSDP2 (`fully_shard`) runs on the CPU's gloo backend, so
    the run selects it itself, with the launcher's settings.
    """
    plugin = FullyShardedDataParallelPlugin()  # read from the launcher's ACCELERATE_* / FSDP_* variables
    if plugin.fsdp_version != 2:
        raise TrainingError(
            "FSDP on CPU processes runs only as FSDP2: set `fsdp_version: 2` in the Accelerate config (as "
            "configs/8gpu_fsdp2.yaml does), or train on GPUs."
        )
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def check_tracker(report_to: str):
    """Refuse a tracker whose package is missing: Accelerate would drop it and log nothing, without a word."""
    installed = [tracker.value for tracker in get_available_trackers()]
    if report_to == "all" and not installed:
        raise TrainingError(
            "--report_to all: no experiment tracker is installed. Install one (pip install tensorboard), or drop "
            "--with_tracking."
        )
    if report_to != "all" and report_to not in installed:
        raise TrainingError(
            f"--report_to {report_to}: its package is not installed, so nothing would be logged. Install it (pip "
            f"install {report_to}), or pick an installed tracker ({', '.join(installed) or 'none is'})."
        )


def set_threads(
    num_threads: int | None, accelerator: Accelerator, cores: int, config: ViTCustomConfig, batch: int,
    checkpoint: Path | None = None,
) -> str:
    """PyTorch threads for training on the CPU, and why, for the log: `num_threads` (applied already), else
    $OMP_NUM_THREADS, else those of the run `checkpoint` continues (threads may sum in another order), else
    `choose_threads`: all cores of this process for layers large enough to share, one for small ones, and a timing
    trial between the two. With several processes, every process takes the main process's choice.

    A layer too small to split only makes threads wait for each other, and far longer when another program uses a
    core too. Loading needs no core of its own: in memory it is a few tensor operations per batch, and a loader worker
    decoding small images needs a fraction of one.
    """
    if num_threads is not None:
        return f"--num_threads {num_threads}"
    if accelerator.device.type != "cpu":
        return f"the default on {accelerator.device.type}"
    if "OMP_NUM_THREADS" in os.environ:
        return f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    saved = 0
    if checkpoint is not None:
        saved = torch.load(checkpoint / PROGRESS_FILE, weights_only=True).get("threads", 0)
    if saved:
        threads, reason = min(saved, cores), f"as the run {checkpoint} continues"
    else:
        threads, reason = choose_threads(config, batch, cores, torch.device("cpu"))
    if accelerator.num_processes > 1:
        threads, reason = broadcast_object_list([threads, reason], from_process=0)
    torch.set_num_threads(threads)
    return reason


def choose_threads(config: ViTCustomConfig, batch: int, cores: int, device: torch.device) -> tuple[int, str]:
    """The threads to train a model of `config` at `batch` with on `cores` CPU cores, and why.

    One when a layer gives each core less than `TRIAL_WORK_PER_THREAD[0]` multiply-adds, every core above
    `TRIAL_WORK_PER_THREAD[1]`. Between the two, training steps of a fresh model of `config` are timed on one thread
    and on every core in alternating rounds (about 1.5 s for the digits model), and every core is chosen when its
    fastest step is `MIN_THREAD_SPEEDUP` times faster. The global random generator is left as it was.
    """
    if cores == 1:
        return 1, "one core for this process"
    work = mlp_work(config, batch) / cores
    if work < TRIAL_WORK_PER_THREAD[0]:
        return 1, f"{work / 2**20:.1f} Mi multiply-adds per layer and core are too few to share"
    if work >= TRIAL_WORK_PER_THREAD[1]:
        return cores, f"{work / 2**20:.0f} Mi multiply-adds per layer and core"
    from modeling_vit_custom import ViTCustomForImageClassification

    threads_before = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        model = ViTCustomForImageClassification(config)
    times = {1: [], cores: []}
    for _ in range(THREAD_TRIAL_ROUNDS):
        for threads in times:
            torch.set_num_threads(threads)
            times[threads].append(time_training_steps(model, batch, device)[0])
    torch.set_num_threads(threads_before)
    one, every = min(times[1]), min(times[cores])
    chosen = cores if one >= MIN_THREAD_SPEEDUP * every else 1
    return chosen, f"a training step took {one * 1000:.1f} ms on 1 thread and {every * 1000:.1f} ms on {cores}"


def mlp_work(config: ViTCustomConfig, batch: int) -> int:
    """Multiply-adds of one MLP layer on a batch: batch x tokens x width x MLP width."""
    tokens = config.num_prefix_tokens + config.grid_size[0] * config.grid_size[1]
    return batch * tokens * config.hidden_size * config.intermediate_size


def cores_per_process(accelerator: Accelerator) -> int:
    """The CPU cores of this machine (as the process may use them) divided among its training processes."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # Without a launcher's count, as if every process ran on this machine.
    local_processes = get_int_from_env(LOCAL_PROCESS_COUNT_VARIABLES, accelerator.num_processes)
    return max(1, cores // local_processes)


def default_num_workers(accelerator: Accelerator) -> int:
    """Loader workers per training process, for images decoded and augmented as the loop asks for them.

    Beside a GPU, every core but the one that launches the kernels, at most 4 (enough to keep a GPU fed with small
    images). On the CPU, the training threads take every core and one worker per 4 cores (at least one) decodes
    beside them: it needs a fraction of a core for small images, and sleeps while its queue is full.
    """
    cores = cores_per_process(accelerator)
    if accelerator.device.type != "cpu":
        return max(0, min(4, cores - 1))
    return min(4, max(1, cores // 4)) if cores > 1 else 0


def memory_budget() -> int:
    """A quarter of the memory available now: what the in-memory path may take."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return 2**30


def plan_compile(
    setting: str, model: nn.Module, batch_size: int, planned_steps: int, device: torch.device, checkpoint: Path | None
) -> tuple[bool, str]:
    """Whether to compile the model (`--torch_compile`), and why, for the log.

    `auto` keeps the choice of the run a checkpoint continues (compiled kernels sum in another order). Else it times a
    few eager training steps at the run's batch size; when the planned steps take long enough that a speed-up could
    repay compiling, it compiles, times compiled and eager steps in alternating rounds (a compiled model's first steps
    after compiling run slower than its later ones, and the machine's speed drifts), and keeps compiling when the
    fastest compiled steps save more time over the run than compiling took. Compiling pays for small models, whose
    steps are dominated by per-operation overhead, and may not for larger ones (benchmarks/benchmark_speed.py
    --compile measures both); where the line falls depends on the machine.
    """
    if setting != "auto":
        return setting == "on", f"--torch_compile {setting}"
    if checkpoint is not None:
        state = torch.load(checkpoint / PROGRESS_FILE, weights_only=True)
        return bool(state.get("compiled", False)), f"as the run {checkpoint} continues"
    eager, _ = time_training_steps(model, batch_size, device)
    plan = f"{planned_steps} steps of {eager * 1000:.0f} ms eagerly"
    if planned_steps * eager * (1 - 1 / BEST_COMPILE_SPEEDUP) < MIN_COMPILE_SECONDS:
        return False, f"{plan}: even {BEST_COMPILE_SPEEDUP}x faster steps would not repay compiling"
    compiled_model = torch.compile(model)
    _, compile_seconds = time_training_steps(compiled_model, batch_size, device, repeats=1)
    times = {model: [eager], compiled_model: []}
    for _ in range(COMPILE_TRIAL_ROUNDS):
        for timed in (compiled_model, model):
            times[timed].append(time_training_steps(timed, batch_size, device)[0])
    eager, compiled = min(times[model]), min(times[compiled_model])
    saved = planned_steps * (eager - compiled)
    reason = (f"{planned_steps} steps of {eager * 1000:.0f} ms eagerly, {compiled * 1000:.0f} ms compiled: {saved:.0f} "
              f"s saved, {compile_seconds:.0f} s to compile")  # fmt: skip
    return saved > compile_seconds, reason


def time_training_steps(
    model: nn.Module, batch_size: int, device: torch.device, repeats: int = 3
) -> tuple[float, float]:
    """Seconds of one forward and backward pass on a random batch (the median of `repeats`) and of the first one
    (which compiles a compiled model). The weights, gradients and random generators are left as they were."""
    model.to(device).train()
    config = model.config
    times = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        pixel_values = torch.randn(batch_size, config.num_channels, *config.image_height_width, device=device)
        labels = torch.randint(0, max(config.num_labels, 1), (batch_size,), device=device)
        for _ in range(repeats + 1):
            start = time.perf_counter()
            logits = model(pixel_values=pixel_values).logits
            classification_loss(logits, labels).backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return sorted(times[1:])[len(times[1:]) // 2], times[0]


