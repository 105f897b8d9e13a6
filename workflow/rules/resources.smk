# Portable resource requests of the `train` rule, estimated from the run's config.
#
# Only portable resources live here (runtime in minutes, mem_mb, gpu, cpus_per_gpu);
# what is specific to a cluster (partition, account, QoS, constraint) belongs in
# workflow/profiles/slurm/config.yaml. Each retry (Snakemake's `attempt`) asks for
# `attempt` times the first request: a job stopped by its time limit or killed for
# memory comes back with more, and continues from its checkpoint.
#
# The estimates are deliberately generous and crude (a factor of a few):
#   dumps   = 2 + total iterations / ntk.every + 2 per task switch
#   params  = the network's trainable parameters (MLP or CNN, from width and depth)
#   flop    = 6 x batch x params per iteration, plus per dump the kernel on the probe
#             set (n^2 x params / 2, times pixels / 4 for a CNN, times K for `full`)
#             and the accuracy on the held-out examples
#   runtime = 10 min + 2 x flop / rate (1e12 flop/s on a GPU, 2e9 per CPU thread),
#             at most MAX_RUNTIME (2 days, a common partition limit) on any
#             attempt: a longer run is stopped there and resumes on the retry
#   mem_mb  = 1 GiB (Python, PyTorch) + the dataset as uint8 and float32 + 4 copies
#             of the parameters + the kernels + the NTK engine's working memory
#             (at most ntk.memory_budget_mb; on the GPU it lives in GPU memory)
#
# A GPU (gpu=1, cpus_per_gpu) is requested only when the run says `device: cuda`:
# `auto` must also run on CPU-only nodes, so it asks for none (add `gpu: 1` to
# `set-resources: train:` in the profile to give `auto` runs a GPU anyway).

from ntkcl import tasks as ntkcl_tasks

# (examples, values per example) of the datasets ntkcl knows by name; others are
# taken to be CIFAR-sized. ImageFolder: ImageNet-100 (about 130k images).
DATASET_SHAPES = {
    "digits": (1797, 64),
    "CIFAR10": (60000, 3 * 32 * 32),
    "CIFAR100": (60000, 3 * 32 * 32),
    "MNIST": (70000, 28 * 28),
    "FashionMNIST": (70000, 28 * 28),
    "KMNIST": (70000, 28 * 28),
    "ImageFolder": (130000, 3 * 32 * 32),
}
GPU_FLOPS = 1e12  # sustained flop/s of one GPU on these small matrices
CPU_FLOPS = 2e9  # sustained flop/s of one CPU thread
TRAIN_CPUS_PER_GPU = 4  # data handling and the held-out evaluation
MAX_RUNTIME = 2 * 24 * 60  # minutes; override per site with set-resources


def _train_shape(run):
    """(examples, channels, side, values per example, classes) of the run's data."""
    data = run["data"]
    examples, values = DATASET_SHAPES.get(data["name"], (60000, 3 * 32 * 32))
    channels = 1 if values in (64, 28 * 28) else 3
    side = int(round((values / channels) ** 0.5))
    if data.get("image_size"):
        side = int(data["image_size"])
        values = channels * side * side
    classes = [
        c for task in ntkcl_tasks.build_tasks(run["tasks"]) for c in task.classes
    ]
    num_classes = max(10, max(classes) + 1)
    return examples, channels, side, values, num_classes


def train_estimate(run):
    """Portable first-attempt request of one run: dict(runtime=min, mem_mb=MB)."""
    examples, channels, side, values, k = _train_shape(run)
    model, probe = run["model"], run["probe"]["size"]
    width, depth = model["width"], model["depth"]
    if model["arch"] == "cnn":
        params = 9 * channels * width + (depth - 1) * 9 * width * width
        final = max(4, side // 2 ** max(0, depth - 1))
        params += width * final * final * k
        spatial = side * side // 4  # a weight is used at every pixel (pooled)
    else:
        params = values * width + (depth - 1) * width * width + width * k
        spatial = 1
    task_list = ntkcl_tasks.build_tasks(run["tasks"])
    total = sum(task.iterations for task in task_list)
    dumps = 2 + total // run["ntk"]["every"] + 2 * (len(task_list) - 1)
    logits = {"trace": 1, "diagonal": k, "full": k * k}[run["ntk"]["kind"]]
    evaluated = min(run["eval"]["max_examples"], examples) * len(task_list)
    flop = 6 * run["optim"]["batch_size"] * total * params * spatial
    flop += dumps * (probe * probe * params * spatial * max(1, logits // k) / 2)
    flop += dumps * 2 * (evaluated + probe) * params * spatial
    cuda = run["device"] == "cuda"
    seconds = flop / (GPU_FLOPS if cuda else CPU_FLOPS)
    runtime = 10 + int(2 * seconds / 60)

    bytes_per = 8 if run["ntk"]["dtype"] == "float64" else 4
    data_mb = examples * values * 5 / 2**20
    model_mb = 4 * params * 4 / 2**20
    kernel_mb = 3 * probe * probe * logits * bytes_per / 2**20
    engine_mb = min(run["ntk"]["memory_budget_mb"], probe * params * k * 4 / 2**20)
    mem_mb = 1024 + data_mb + model_mb + kernel_mb + (0 if cuda else engine_mb)
    return dict(runtime=runtime, mem_mb=int(mem_mb) + 1)


def train_runtime(wildcards, attempt):
    """Minutes (sbatch --time) for a train job, `attempt` times the estimate."""
    runtime = train_estimate(find_run(wildcards))["runtime"] * attempt
    return min(runtime, MAX_RUNTIME)


def train_mem_mb(wildcards, attempt):
    """MB of memory (sbatch --mem) for a train job, `attempt` times the estimate."""
    return train_estimate(find_run(wildcards))["mem_mb"] * attempt


def train_gpus(wildcards):
    """1 when the run asks for `device: cuda`, else 0 (no GPU requested)."""
    return int(find_run(wildcards)["device"] == "cuda")


def train_cpus_per_gpu(wildcards):
    """CPUs per GPU for a GPU run (sbatch --cpus-per-gpu); 0 (unset) otherwise."""
    return TRAIN_CPUS_PER_GPU * train_gpus(wildcards)
