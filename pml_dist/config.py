"""Experiment configuration: one dataclass per section, YAML presets, `section.key=value` overrides.

Order of precedence: dataclass defaults (train.device's: PML_DIST_DEVICE when set) < preset YAML <
overrides (applied last, in order given).
Unknown sections or keys and values of the wrong type are `ConfigError`s naming the key and where it
came from. Relative paths are made absolute against the current directory when the config is loaded,
so a job that starts elsewhere (a Slurm node, a submitit worker) sees the same files.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ffcv_data.atomic import write_text
from ffcv_data.protocol import PROTOCOLS
from ffcv_data.transforms import EVAL_TRANSFORMS, TRAIN_TRANSFORMS
from pml_dist.dependencies import depended_upon
from pml_dist.errors import ConfigError
from pml_dist.layout import lr_name, tau_name

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PRESET = REPO_ROOT / "configs" / "demo.yaml"

LOSSES = ("bce", "an", "an_ls", "wan", "epr", "role", "em", "em_apl", "ll_r", "ll_ct")
SMALL_MODEL = "small_resnet"
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
ORDERS = ("random", "sequential", "quasi_random")
DEVICES = ("auto", "cuda", "cpu")
DEVICE_ENV = "PML_DIST_DEVICE"  # the default of train.device (presets and overrides still win)
PSEUDO_MODES = ("hard", "soft", "class_prior")
# data.format: the layout of data.root (ffcv_data/formats.py)
DATA_FORMATS = ("coco", "voc", "cub", "cole", "openimages", "csv")
PUBLISHED_DATA_SETS = ("voc", "coco", "nuswide", "cub")  # report.published (pipeline/names.py: PUBLISHED)


# Each section checks its own keys (`problems()`: the errors, in a fixed order); validate() adds the
# rules that read two sections.


def _failed(checks: list[tuple[bool, str, str]]) -> list[str]:
    """The errors of the checks that fail: (ok, key, what is wrong) -> "config key '<key>' <what>"."""
    return [f"config key '{key}' {message}" for ok, key, message in checks if not ok]


def _repeated(key: str, values: list, name: Callable[[Any], str] = str) -> list[str]:
    """A repeated value would be one stage listed twice (two array tasks writing one folder); values
    count as repeated when their folder names are equal (tau-0.3 for 0.3 and 0.3000001)."""
    seen: dict[str, Any] = {}
    errors = []
    for value in values:
        if name(value) not in seen:
            seen[name(value)] = value
            continue
        first = seen[name(value)]
        twice = (f"{value!r} twice" if first == value else
                 f"{first!r} and {value!r}, which name one folder ({name(value)})")
        errors.append(f"config key '{key}' lists {twice}")
    return errors


@dataclass
class RunSection:
    dir: str = "runs/demo"  # the run directory: every artefact of one experiment lives under it
    # Repeats of the whole experiment with train.seed, seed+1, ... in <dir>/seed-<s>/, sharing the
    # prepared data; the report gives mean and standard deviation (`pml-dist run --seeds N`).
    seeds: int = 1
    data_dir: str = ""  # the prepared .beton files; "" = <dir>/data (sub-runs name their parent's)

    def problems(self) -> list[str]:
        return _failed([(self.seeds >= 1, "run.seeds", "must be >= 1")])


@dataclass
class DataSection:
    # What root holds, by format (ffcv_data/formats.py reads it):
    #   coco  annotations/instances_<split>.json and <split>/*.jpg
    #   voc   the folder holding VOCdevkit/VOC2012/ (splits train, val)
    #   cub   the folder the official CUB tarball unpacks into (attributes.txt beside CUB_200_2011/)
    #   cole  Cole et al.'s formatted folder (formatted_<split>_images.npy, formatted_<split>_labels.npy)
    #   openimages  the release's files: *<split>-annotations-human-imagelabels.csv, *class-descriptions.csv
    #         [, *classes-trainable.txt], <split>/<ImageID>.jpg (splits train, validation | val, test)
    root: str = "data/synthetic"
    format: str = "coco"  # one of DATA_FORMATS
    # cole: the folder the formatted lists' image paths are relative to; csv: the folder the CSVs'
    # `file` column is relative to (default data.root); else unused
    images: str = ""
    train_split: str = "train"
    test_split: str = "test"
    # a fully labelled validation split read from the data set (csv: <root>/<val_split>.csv, header
    # file,labels); "" = the validation images are drawn from the training split (val_fraction)
    val_split: str = ""
    classes: str = ""  # csv: a text file of the class names, one per line, in output order ("" = those seen)
    observed_seed: int = 1200  # Cole et al. 2021: seed of the single observed positive per image
    # cole: Cole et al.'s exact draws and split for the same annotation files; keyed: draws keyed
    # by image id, the same for any subset or process count (ffcv_data/protocol.py)
    observed_protocol: str = "keyed"
    val_fraction: float = 0.2  # fraction of the training images held out for validation
    val_seed: int = 0
    val_labels: str = "full"  # model selection on full labels (Cole et al.) or on "observed" ones
    max_resolution: int = 64  # longest image side stored in the .beton (smaller images keep their size)
    # Original JPEGs no larger than max_resolution are stored as they are (ffcv_data/beton.py);
    # the others are shrunk to fit and re-encoded at jpeg_quality.
    keep_original_jpegs: bool = True
    jpeg_quality: int = 90
    write_workers: int = 0  # processes encoding the .beton; 0 = all cores
    image_size: int = 64  # side of the square images the loaders produce
    loader_workers: int = 0  # FFCV decoding threads per process; 0 = cores / local ranks
    order: str = "random"  # training traversal order: random, sequential, quasi_random
    # ffcv_data/transforms.py. train: resize_flip (whole image, seeded flip) or random_resized_crop
    # (FFCV's, unseeded); eval (validation, test, inference): resize (whole image) or center_crop
    train_transform: str = "resize_flip"
    eval_transform: str = "resize"
    # numba-compile FFCV's pipelines (the fields other than the image, and crop transforms' decoders:
    # ~20 s per loader); the whole-image decoder is compiled (and cached on disk) either way
    jit: bool = True
    # `prepare` generates the built-in data set (make-synthetic) at `root` when `root` does not exist,
    # only if this is true or `root` is the built-in one (data/synthetic): any other missing root is
    # an error, so a mistyped COCO path is not silently replaced by generated images.
    synthetic: bool = False
    synthetic_seed: int = 0
    synthetic_train: int = 2000
    synthetic_test: int = 500
    synthetic_classes: int = 20  # above 20: sparse tag classes beside the drawn ones (synthetic.py)

    @property
    def full_training_labels(self) -> bool:
        """Whether the training split's label sets hold every class of their images: False only for
        a single-positive training CSV (header file,label), which shows one per image."""
        if self.format != "csv":
            return True
        from ffcv_data.csv_lists import single_positive

        return not single_positive(Path(self.root) / f"{self.train_split}.csv")

    @property
    def full_validation(self) -> bool:
        """Whether the validation split has every label of its images, so that validation mAP can
        select a model: False only for a single-positive training CSV without a fully labelled
        data.val_split (its validation images, drawn from it, show one positive each)."""
        return bool(self.val_split) or self.full_training_labels

    def problems(self) -> list[str]:
        return _failed([
            (self.format in DATA_FORMATS, "data.format", f"must be one of {', '.join(DATA_FORMATS)}"),
            (self.format != "cole" or bool(self.images), "data.images",
             "must name the folder the formatted lists' image paths are relative to (data.format: cole)"),
            (0.0 < self.val_fraction < 1.0, "data.val_fraction", "must be in (0, 1)"),
            (self.val_labels in ("full", "observed"), "data.val_labels", "must be 'full' or 'observed'"),
            (self.order in ORDERS, "data.order", f"must be one of {', '.join(ORDERS)}"),
            (self.train_transform in TRAIN_TRANSFORMS, "data.train_transform",
             f"must be one of {', '.join(TRAIN_TRANSFORMS)}"),
            (self.eval_transform in EVAL_TRANSFORMS, "data.eval_transform",
             f"must be one of {', '.join(EVAL_TRANSFORMS)}"),
            (self.observed_protocol in PROTOCOLS, "data.observed_protocol",
             f"must be one of {', '.join(PROTOCOLS)}"),
            (1 <= self.jpeg_quality <= 100, "data.jpeg_quality", "must be in [1, 100]"),
            (self.max_resolution >= 8, "data.max_resolution", "must be at least 8"),
            (self.image_size >= 8, "data.image_size", "must be at least 8"),
            (self.write_workers >= 0, "data.write_workers", "must be >= 0 (0 = all cores)"),
            (self.loader_workers >= 0, "data.loader_workers", "must be >= 0 (0 = cores per local rank)"),
            (self.synthetic_train > 0 and self.synthetic_test > 0, "data.synthetic_train/test",
             "must be > 0"),
            (self.synthetic_classes >= 20, "data.synthetic_classes", "must be >= 20 (the drawn categories)"),
            (self.train_split != self.test_split, "data.test_split", "must differ from data.train_split"),
            (self.val_split not in (self.train_split, self.test_split), "data.val_split",
             "must differ from data.train_split and data.test_split"),
            (not self.classes or self.format == "csv", "data.classes", "is read for data.format: csv only"),
        ])


@dataclass
class ModelSection:
    name: str = SMALL_MODEL
    width: int = 32  # small_resnet only: channels of the first stage
    norm: str = "batch"  # small_resnet only: batch or group (no batch statistics)
    pretrained: str = ""  # local torchvision ImageNet state dict; never downloaded
    sync_bn: bool = False  # SyncBatchNorm: batch statistics over all ranks

    def problems(self) -> list[str]:
        return _failed([
            (self.name == SMALL_MODEL or self.name in TORCHVISION_RESNETS, "model.name",
             f"must be {SMALL_MODEL} or one of {', '.join(TORCHVISION_RESNETS)}"),
            (self.norm in ("batch", "group"), "model.norm", "must be batch or group"),
            (self.width % 8 == 0 and self.width > 0, "model.width", "must be a positive multiple of 8"),
        ])


@dataclass
class LossSection:
    name: str = "an"
    ls_eps: float = 0.1  # AN-LS label smoothing
    expected_positives: float = 2.9  # EPR / ROLE: k, the expected positives per image (COCO 2.9)
    em_alpha: float = 0.1  # EM / EM+APL weight of the unobserved-label entropy term
    role_lr_mult: float = 10.0  # ROLE: learning-rate multiplier of the label-estimate matrix
    apl_beta: float = 0.9  # EM+APL: weight of the pseudo-labelled negatives' BCE term
    apl_neg_proportion: float = 0.9  # EM+APL: share of unobserved labels pseudo-labelled in all
    apl_warmup_epochs: int = 5  # EM+APL: pseudo-labelling starts after this many epochs
    # LL-R / LL-Ct (Kim et al. 2022): per-epoch rise of the share of each batch's labels rejected /
    # corrected, the unobserved ones with the largest AN losses (none in epoch 0); 0.2 % per epoch
    ll_delta_rel: float = 0.002

    def problems(self) -> list[str]:
        # apl_warmup_epochs is checked against train.epochs: _cross_section_problems
        return _failed([
            (self.name in LOSSES, "loss.name", f"must be one of {', '.join(LOSSES)}"),
            (0.0 <= self.ll_delta_rel < 1.0, "loss.ll_delta_rel", "must be in [0, 1)"),
        ])


@dataclass
class OptimSection:
    name: str = "adam"  # adam, adamw or sgd (torch optimizers: DeepSpeed compiles nothing)
    lr: float = 1e-3  # at the reference batch size
    ref_batch: int = 32  # global batch the learning rate is tuned for
    lr_scaling: str = "linear"  # how lr follows the global batch: linear, sqrt or none
    warmup_epochs: float = 0.0  # linear warm-up from 0, then cosine decay to 0
    schedule: str = "cosine"  # cosine or constant after warm-up
    weight_decay: float = 0.0  # conv/linear weights only, never BatchNorm or biases
    momentum: float = 0.9  # sgd only
    grad_clip: float = 0.0  # 0 = off

    def problems(self) -> list[str]:
        return _failed([
            (self.name in ("adam", "adamw", "sgd"), "optim.name", "must be adam, adamw or sgd"),
            (self.lr > 0, "optim.lr", "must be > 0"),
            (self.ref_batch >= 1, "optim.ref_batch", "must be >= 1"),
            (self.lr_scaling in ("linear", "sqrt", "none"), "optim.lr_scaling",
             "must be linear, sqrt or none"),
            (self.schedule in ("cosine", "constant"), "optim.schedule", "must be cosine or constant"),
            (self.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0"),
        ])


@dataclass
class TrainSection:
    epochs: int = 10
    micro_batch: int = 32  # per rank and step
    grad_accum: int = 1
    seed: int = 0  # model initialisation and data order
    ckpt_every: int = 0  # optimizer steps between checkpoints (0 = epoch ends only)
    keep_last: int = 2  # checkpoints kept besides the best one
    # Zhou et al. 2022's model selection for stages training with these losses (e.g. [em, em_apl]):
    # stop after the first epoch whose validation mAP does not improve on the best so far.
    early_stop: list[str] = field(default_factory=list)
    # Cole et al.'s LinearInit: this many epochs train the head alone on the frozen backbone
    # (batch statistics frozen too), then the best of them starts train.epochs end to end.
    linear_init_epochs: int = 0
    log_every: int = 10  # optimizer steps between metrics.jsonl records and stop-request checks
    eval_batch: int = 128
    # Training and inference: cuda, cpu, or auto (a GPU when one is visible, else the CPU; a
    # torchvision ResNet then fails instead of training on the CPU). docs/gpu.md. The environment
    # variable PML_DIST_DEVICE, when set, replaces this default (tests/conftest.py sets cpu).
    device: str = "auto"

    def problems(self) -> list[str]:
        return _failed([
            (self.epochs >= 1, "train.epochs", "must be >= 1"),
            (self.micro_batch >= 1, "train.micro_batch", "must be >= 1"),
            (self.grad_accum >= 1, "train.grad_accum", "must be >= 1"),
            (self.keep_last >= 1, "train.keep_last", "must be >= 1"),
            (set(self.early_stop) <= set(LOSSES), "train.early_stop",
             f"must list losses among {', '.join(LOSSES)}"),
            (self.linear_init_epochs >= 0, "train.linear_init_epochs", "must be >= 0 (0 = off)"),
            (self.log_every >= 1, "train.log_every", "must be >= 1"),
            (self.device in DEVICES, "train.device", f"must be one of {', '.join(DEVICES)}"),
            (self.ckpt_every >= 0, "train.ckpt_every", "must be >= 0 (0 = epoch ends only)"),
        ])


@dataclass
class DistSection:
    deepspeed_config: str = "configs/deepspeed/zero0.json"  # ZeRO stage, clipping, bucket sizes
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU), fp32 or bf16
    timeout_s: int = 600  # collective timeout: a dead rank fails the job instead of hanging it

    def problems(self) -> list[str]:
        return _failed([
            (self.precision in ("auto", "fp32", "bf16"), "dist.precision", "must be auto, fp32 or bf16"),
            (Path(self.deepspeed_config).is_file(), "dist.deepspeed_config",
             f"names no file ({self.deepspeed_config})"),
        ])


@dataclass
class InferSection:
    batch: int = 256
    hflip_tta: bool = False  # average the probabilities of the image and its mirror image

    def problems(self) -> list[str]:
        return _failed([(self.batch >= 1, "infer.batch", "must be >= 1")])


@dataclass
class PseudoSection:
    taus: list[float] = field(default_factory=lambda: [0.55, 0.65, 0.75, 0.85, 0.95])
    # hard: one target set per tau, y = p > tau; soft: y = p; class_prior: per-class thresholds
    # matching each class's estimated prior. Each becomes its own student.
    modes: list[str] = field(default_factory=lambda: ["hard", "soft", "class_prior"])
    dup_tolerance: float = 2e-3  # max |difference| of a sample scored twice (sampler padding)
    # What inference keeps of each row (pml_dist/stored_probs.py): the probabilities >= store_min_prob,
    # at most store_top_k of them. Default (null): the smallest tau in use, or 0 (everything) when
    # the soft or class_prior target is in use, so that every target is exact. Set both for large
    # label spaces: memory and disk grow with the kept entries, not with images x classes.
    store_min_prob: float | None = None
    store_top_k: int | None = None
    # The experiment's teacher chains (teacher -> pseudo labels -> students), one per loss.
    # loss.name's chain is always one (listed or not: [] is it alone) and is the run itself; every
    # other is <run>/chain-<loss>/ (pipeline/subruns.py), whose teacher is also that loss's
    # reference (trained once).
    teachers: list[str] = field(default_factory=list)
    # The chain-<loss> sub-runs' own taus and modes instead of the two keys above, keyed by loss:
    # {em: [0.55, 0.65, 0.75]}. loss.name's chain (the run itself) uses pseudo.taus / pseudo.modes;
    # a key that is not another chain's loss is not used (a preset may list chains a run turns off).
    teacher_taus: dict[str, list[float]] = field(default_factory=dict)
    teacher_modes: dict[str, list[str]] = field(default_factory=dict)
    # Self-training: in round k > 1 the student of round k-1 with the best validation mAP is the
    # chain's teacher (<chain>/round-<k>/), with the same taus and modes.
    rounds: int = 1

    def problems(self) -> list[str]:
        errors = _failed([
            (len(self.taus) > 0, "pseudo.taus", "must not be empty"),
            (bool(self.modes) and set(self.modes) <= set(PSEUDO_MODES), "pseudo.modes",
             f"must be a non-empty list of {', '.join(PSEUDO_MODES)}"),
            (set(self.teachers) <= set(LOSSES), "pseudo.teachers",
             f"must list losses among {', '.join(LOSSES)}"),
            (len(set(self.teachers)) == len(self.teachers), "pseudo.teachers", "lists a loss twice"),
            (set(self.teacher_taus) | set(self.teacher_modes) <= set(LOSSES),
             "pseudo.teacher_taus/teacher_modes", f"must be keyed by losses among {', '.join(LOSSES)}"),
            (all(set(m) <= set(PSEUDO_MODES) and m for m in self.teacher_modes.values()),
             "pseudo.teacher_modes", f"values must be non-empty lists of {', '.join(PSEUDO_MODES)}"),
            (all(self.teacher_taus.values()), "pseudo.teacher_taus", "values must not be empty"),
            (self.rounds >= 1, "pseudo.rounds", "must be >= 1"),
            (self.store_min_prob is None or 0.0 <= self.store_min_prob < 1.0, "pseudo.store_min_prob",
             "must be in [0, 1) or null"),
            (self.store_top_k is None or self.store_top_k >= 1, "pseudo.store_top_k", "must be >= 1 or null"),
        ])
        if self.store_min_prob is not None and "hard" in self.modes and min(self.taus) < self.store_min_prob:
            errors.append(f"config key 'pseudo.store_min_prob': {self.store_min_prob} is above the "
                          f"smallest tau {min(self.taus)}; a hard target needs every p > tau kept")
        tau_lists = [("pseudo.taus", self.taus),
                     *((f"pseudo.teacher_taus.{loss}", taus) for loss, taus in self.teacher_taus.items())]
        errors += [f"config key '{key}': {tau} is outside [0, 1)"
                   for key, taus in tau_lists for tau in taus if not 0.0 <= tau < 1.0]
        for key, taus in tau_lists:
            errors += _repeated(key, taus, tau_name)
        errors += _repeated("pseudo.modes", self.modes)
        for loss, modes in self.teacher_modes.items():
            errors += _repeated(f"pseudo.teacher_modes.{loss}", modes)
        return errors


@dataclass
class ReportSection:
    references: list[str] = field(default_factory=lambda: ["bce", "em"])  # extra teachers' losses
    # print this data set's published test mAPs beside the measured ones: one of PUBLISHED_DATA_SETS
    # (pipeline/names.py), "" = none
    published: str = ""

    def problems(self) -> list[str]:
        return _failed([
            (set(self.references) <= set(LOSSES), "report.references", f"must be losses among {LOSSES}"),
            (self.published in ("", *PUBLISHED_DATA_SETS), "report.published",
             f"must be '' (none) or one of {', '.join(PUBLISHED_DATA_SETS)}"),
        ]) + _repeated("report.references", self.references)


@dataclass
class SweepSection:
    """Cole et al.'s model selection: every stage training with one of `losses` (the teacher and the
    references; never students) is trained once per (lr, micro_batch) of the grid, each its own
    sub-run in <run>/sweep/ and one Slurm array task, and the best by validation mAP becomes the
    stage (pipeline/sweep.py). The lr is used as given at that micro batch (no optim.lr_scaling)."""

    losses: list[str] = field(default_factory=list)  # [] = off: lr and micro_batch are then not used
    lr: list[float] = field(default_factory=list)
    micro_batch: list[int] = field(default_factory=list)  # per rank (one GPU: Cole et al.'s batch)

    def problems(self) -> list[str]:
        if not self.losses:  # a preset's grid stays in the file, unused: sweep.losses=[] turns it off
            return []
        return _failed([
            (set(self.losses) <= set(LOSSES), "sweep.losses", f"must list losses among {', '.join(LOSSES)}"),
            (len(self.lr) > 0, "sweep.lr", "must not be empty when sweep.losses names losses to sweep"),
            (len(self.micro_batch) > 0, "sweep.micro_batch",
             "must not be empty when sweep.losses names losses to sweep"),
            (all(lr > 0 for lr in self.lr), "sweep.lr", "values must be > 0"),
            (all(mb >= 1 for mb in self.micro_batch), "sweep.micro_batch", "values must be >= 1"),
        ]) + [*_repeated("sweep.losses", self.losses), *_repeated("sweep.lr", self.lr, lr_name),
              *_repeated("sweep.micro_batch", self.micro_batch)]


TRAINING_KINDS = ("teacher", "infer", "student")  # the slurm.<kind>_* shapes of training stages
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def gres_gpus(gres: str) -> int:
    """GPUs per node a `--gres` string asks for: gpu:a100:4 -> 4, gpu:4 -> 4, gpu -> 1, "" -> 0
    (other resources in a comma list are ignored)."""
    for item in filter(None, gres.split(",")):
        parts = item.split(":")
        if parts[0] == "gpu":
            return int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1
    return 0


@dataclass
class SlurmSection:
    """Resources and site rules for `pml-dist run --executor slurm` and the plain sbatch scripts (and
    tasks for the local executor); docs/cluster.md lists every key with an example.

    Training stages (teacher, references, sweep points, inference, students) read the plain keys and
    get the GPUs; CPU stages (prepare, selection, merge, report) read the `cpu_` keys, so neither a
    GPU partition nor a GPU request in `extra` reaches them. account, setup, env and the requeue
    keys apply to every job."""

    account: str = ""
    setup: list[str] = field(default_factory=list)  # shell lines each job runs before Python
    env: list[str] = field(default_factory=list)  # NAME=value exported in each job (NCCL_*), logged
    requeue: bool = True  # sbatch --requeue, so preemption and `scontrol requeue` can bring it back
    max_requeues: int = 20  # submitit: timeouts/preemptions a job may be requeued after
    signal_delay_s: int = 120  # USR2 this long before the time limit: save, then requeue
    array_parallelism: int = 0  # students running at once (0 = no limit)
    # training stages
    partition: str = ""
    qos: str = ""
    cpus_per_task: int = 1
    mem_gb: int = 0  # 0 = the partition's default
    gpus_per_node: int = 0  # one task per GPU: *_tasks_per_node must equal it when > 0
    gres: str = ""  # instead of gpus_per_node, a typed request: gpu:a100:4 (also one task per GPU)
    extra: list[str] = field(default_factory=list)  # more sbatch options, "key=value" or "flag"
    srun_extra: list[str] = field(default_factory=list)  # more srun options, "--cpu-bind=cores"
    teacher_nodes: int = 1
    teacher_tasks_per_node: int = 2
    teacher_time_min: int = 240
    infer_nodes: int = 1
    infer_tasks_per_node: int = 2
    infer_time_min: int = 60
    student_nodes: int = 1
    student_tasks_per_node: int = 1
    student_time_min: int = 240
    # CPU stages (one task each)
    cpu_partition: str = ""  # "" = the cluster's default partition
    cpu_qos: str = ""
    cpu_cpus_per_task: int = 0  # 0 = cpus_per_task
    cpu_mem_gb: int = 0
    cpu_extra: list[str] = field(default_factory=list)
    cpu_time_min: int = 60

    def problems(self) -> list[str]:
        gpus = self.gpus_per_node or gres_gpus(self.gres)
        shapes = [(getattr(self, f"{k}_nodes"), getattr(self, f"{k}_tasks_per_node"), k)
                  for k in TRAINING_KINDS]
        checks = [
            (all(e.strip() and not e.startswith("-") for e in self.extra), "slurm.extra",
             "entries must look like key=value or flag (sbatch's long option without the dashes)"),
            (all(e.strip() and not e.startswith("-") for e in self.cpu_extra), "slurm.cpu_extra",
             "entries must look like key=value or flag (sbatch's long option without the dashes)"),
            (all(e.startswith("-") for e in self.srun_extra), "slurm.srun_extra",
             "entries must be srun options, e.g. --cpu-bind=cores"),
            (all(_ENV_NAME.fullmatch(e.partition("=")[0]) and "=" in e for e in self.env), "slurm.env",
             "entries must look like NAME=value"),
            (min(min(n, t) for n, t, _ in shapes) >= 1 and self.cpus_per_task >= 1,
             "slurm.*_nodes/*_tasks_per_node/cpus_per_task", "must be >= 1"),
            (self.cpu_cpus_per_task >= 0 and self.cpu_mem_gb >= 0 and self.mem_gb >= 0,
             "slurm.*cpus_per_task/*mem_gb", "must be >= 0"),
            (not (self.gpus_per_node and self.gres), "slurm.gres",
             "and slurm.gpus_per_node both ask for GPUs: set one"),
            (self.max_requeues >= 0, "slurm.max_requeues", "must be >= 0"),
        ]
        for _, tasks, kind in shapes:  # one rank per GPU: more would share one, fewer leave some idle
            checks.append((not gpus or tasks == gpus, f"slurm.{kind}_tasks_per_node",
                           f"is {tasks} but each node gets {gpus} GPUs (slurm.gpus_per_node / slurm.gres): "
                           f"training stages run one task per GPU"))
        return _failed(checks)


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    dist: DistSection = field(default_factory=DistSection)
    infer: InferSection = field(default_factory=InferSection)
    slurm: SlurmSection = field(default_factory=SlurmSection)
    report: ReportSection = field(default_factory=ReportSection)
    pseudo: PseudoSection = field(default_factory=PseudoSection)
    sweep: SweepSection = field(default_factory=SweepSection)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir)

    @property
    def data_dir(self) -> Path:
        return Path(self.run.data_dir) if self.run.data_dir else self.run_dir / "data"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------- loading


def load_config(preset: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the preset YAML (configs/demo.yaml when None), then `section.key=value`s."""
    cfg = defaults()
    for path, raw in _preset_layers(Path(preset) if preset is not None else DEFAULT_PRESET):
        for section, values in raw.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section '{section}' must be a mapping")
            for key, value in values.items():
                _set(cfg, f"{section}.{key}", value, source=str(path))
    for item in overrides:
        dotted, sep, text = item.partition("=")
        if not sep or "." not in dotted:
            raise ConfigError(f"override '{item}': expected section.key=value")
        _set(cfg, dotted.strip(), yaml.safe_load(text) if text.strip() else "", source="override")
    _make_paths_absolute(cfg)
    validate(cfg)
    return cfg


def defaults() -> Config:
    """The dataclass defaults, with train.device's from the environment (PML_DIST_DEVICE) if set: a
    test session forces the CPU through it, also in the processes its tests start."""
    cfg = Config()
    if os.environ.get(DEVICE_ENV):
        _set(cfg, "train.device", os.environ[DEVICE_ENV], source=f"environment variable {DEVICE_ENV}")
        if cfg.train.device not in DEVICES:
            raise ConfigError(f"environment variable {DEVICE_ENV}={cfg.train.device!r} must be one of "
                              f"{', '.join(DEVICES)}")
    return cfg


def _preset_layers(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """The preset and, first, the presets it builds on: `base: other.yaml` (relative to the preset)
    is read before it, so a variant lists only what it changes."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory; name a YAML preset in it") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    raw.pop("meta", None)  # the provenance block of a resolved <run>/config.yaml
    base = raw.pop("base", None)
    if base is None:
        return [(path, raw)]
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must name a preset file, got {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in seen:
        raise ConfigError(f"{path}: 'base: {base}' makes a cycle of presets")
    return [*_preset_layers(base_path, (*seen, path.resolve())), (path, raw)]


def _set(cfg: Config, dotted: str, value: Any, source: str) -> None:
    section_name, _, key = dotted.partition(".")
    section = getattr(cfg, section_name, None)
    if section is None or not dataclasses.is_dataclass(section):
        known = ", ".join(f.name for f in dataclasses.fields(cfg))
        raise ConfigError(f"{source}: unknown config section '{section_name}' (known: {known})")
    fields = {f.name: f for f in dataclasses.fields(section)}
    if key not in fields:
        known = ", ".join(fields)
        raise ConfigError(f"{source}: unknown config key '{dotted}' (keys of '{section_name}': {known})")
    hint = typing.get_type_hints(type(section))[key]
    setattr(section, key, _coerce(value, hint, dotted, source))


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation. Ints are accepted for floats, and so are strings like
    '1e-5': YAML 1.1 (PyYAML) reads exponents without a dot as strings. Nothing else is converted."""

    def bad() -> ConfigError:
        return ConfigError(
            f"{source}: config key '{key}' expects {_type_name(hint)}, got {type(value).__name__} {value!r}"
        )

    origin = typing.get_origin(hint)
    if origin is dict:  # string keys (YAML mapping or override `{em: [0.55, 0.65]}`)
        key_hint, value_hint = typing.get_args(hint)
        if not isinstance(value, dict):
            raise bad()
        return {_coerce(k, key_hint, key, source): _coerce(v, value_hint, key, source)
                for k, v in value.items()}
    if origin in (list, tuple):
        (item_hint,) = typing.get_args(hint)[:1]
        if not isinstance(value, (list, tuple)):
            raise bad()
        return [_coerce(v, item_hint, key, source) for v in value]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(value, option, key, source)
            except ConfigError:
                continue
        raise bad()
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise bad()
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad()
    raise ConfigError(f"config key '{key}': unsupported annotation {hint!r}")  # a bug, not user error


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is dict:
        key, value = typing.get_args(hint)
        return f"a mapping of {_type_name(key)} to {_type_name(value)}"
    if typing.get_origin(hint) in (list, tuple):
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


def _make_paths_absolute(cfg: Config) -> None:
    cfg.run.dir = str(Path(cfg.run.dir).expanduser().resolve())
    if cfg.run.data_dir:
        cfg.run.data_dir = str(Path(cfg.run.data_dir).expanduser().resolve())
    cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    if cfg.data.images:
        cfg.data.images = str(Path(cfg.data.images).expanduser().resolve())
    if cfg.data.classes:
        cfg.data.classes = str(Path(cfg.data.classes).expanduser().resolve())
    if cfg.model.pretrained:
        cfg.model.pretrained = str(Path(cfg.model.pretrained).expanduser().resolve())
    ds = Path(cfg.dist.deepspeed_config).expanduser()
    # Presets name DeepSpeed configs relative to the repository, wherever the job starts.
    cfg.dist.deepspeed_config = str(ds.resolve() if ds.is_absolute() or ds.exists() else REPO_ROOT / ds)


APL_WARMUP_RULE = "must be >= 1 and below train.epochs for em_apl"


def apl_schedule_fits(warmup_epochs: int, epochs: int) -> bool:
    """EM+APL's schedule rule, written only here: pseudo-labelling starts after 1-based epoch
    `warmup_epochs` and spreads its quota over the epochs after it (Zhou et al. 2022, see
    pml_dist/training/losses.py), so at least one epoch must follow the warm-up. validate() applies
    it to the teacher's loss, EmAplLoss to the values it is built with."""
    return 1 <= warmup_epochs < epochs


def apl_schedule(warmup_epochs: int, epochs: int) -> tuple[int, int]:
    """(warm-up, schedule length) EM+APL trains with in a stage of `epochs` epochs, fitted to the
    rule above. The teacher's always fits (validate); a reference or another chain's teacher
    training em_apl reads the same key and has it shortened to fit, so a short run may still list
    em_apl among its references."""
    return min(warmup_epochs, max(1, epochs - 1)), max(epochs, 2)


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express; each error names its key. Each section checks its
    own keys (`problems()`, sections in Config's order), then the rules that read two sections; the
    first error is raised."""
    sections = [getattr(cfg, f.name) for f in dataclasses.fields(cfg)]
    errors = [e for section in sections for e in section.problems()] + _cross_section_problems(cfg)
    if errors:
        raise ConfigError(errors[0])


def _cross_section_problems(cfg: Config) -> list[str]:
    """The rules that read two sections."""
    # What picks a model by validation mAP needs validation images with all their labels.
    full = cfg.data.full_validation
    named = (("loss.name", [cfg.loss.name]), ("pseudo.teachers", cfg.pseudo.teachers),
             ("report.references", cfg.report.references))
    bce_keys = [key for key, losses in named if "bce" in losses]
    without = ("without a fully labelled validation split (data.val_split; "
               f"{cfg.data.train_split}.csv lists single positives)")
    return _failed([
        (cfg.loss.name != "em_apl" or apl_schedule_fits(cfg.loss.apl_warmup_epochs, cfg.train.epochs),
         "loss.apl_warmup_epochs", APL_WARMUP_RULE),
        (full or not cfg.train.early_stop, "train.early_stop",
         f"must be [] {without}: early stopping compares validation mAPs"),
        (full or not cfg.sweep.losses, "sweep.losses",
         f"must be [] {without}: the grid's best point is chosen by validation mAP"),
        (full or cfg.pseudo.rounds <= 1, "pseudo.rounds",
         f"must be 1 {without}: each round's teacher is the best student by validation mAP"),
        # full-label BCE trains on every label of the training images: one per image is not that
        (cfg.data.full_training_labels or not bce_keys, ", ".join(bce_keys),
         f"must not name bce, the full-label upper bound: {cfg.data.train_split}.csv lists one "
         "positive per image, not every label"),
    ])


def chain_losses(cfg: Config) -> list[str]:
    """The teacher losses of the run's chains, its own (loss.name) first."""
    return [cfg.loss.name, *(loss for loss in cfg.pseudo.teachers if loss != cfg.loss.name)]


# ---------------------------------------------------------------------------------------- saving


def git_revision() -> str:
    """The source revision (with '-dirty' for uncommitted changes), or 'unknown' outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


# Keys renamed since runs were resolved with them: old key -> (new key, the old value's new value).
RENAMED_KEYS = {"report.published_coco": ("report.published", lambda on: "coco" if on else "")}


def write_resolved(cfg: Config) -> Path:
    """Write `<run>/config.yaml`; a later command with a different config is refused when an output
    the run directory holds depends on a changed setting, else accepted and recorded.

    Resubmitting the same experiment must resume it, so an identical config is accepted. A run
    directory whose outputs were made with other values of the settings they depend on would mix
    two experiments: refused, naming the changed keys and the file whose output depends on them
    (pml_dist/dependencies.py: the one table of what each output depends on, decided by which
    files the run directory holds). A change no existing output depends on (train.device, the
    slurm section, report.*, model.width while only data/ exists, ...) is accepted: config.yaml is
    rewritten with the new values and one line logged. One that holds nothing but config files
    and logs (a first command that failed, say on a typo) is taken over by the corrected command
    whatever changed: its settings were never used for anything.
    """
    path = cfg.run_dir / "config.yaml"
    current = cfg.to_dict()
    if path.exists():
        old, new = saved_settings(path), _flatten(current)
        default = _flatten(defaults().to_dict())
        # A key the saved config lacks (added to the code since) is fine at its default value.
        diffs = {k for k in old.keys() | new.keys() if old.get(k, default.get(k)) != new.get(k)}
        if not diffs:
            return path
        changed = ", ".join(sorted(diffs))
        if first_artefact(cfg.run_dir) is None:
            log.info("%s: taking over %s from an earlier command that produced nothing (%s changed)",
                     cfg.run_dir, path.name, changed)
        else:
            found = depended_upon(cfg.run_dir, diffs)
            if found is not None:
                made, output, keys = found
                raise ConfigError(
                    f"{path} was written by a run with different settings ({changed}) and {cfg.run_dir} "
                    f"already holds its results ({made.relative_to(cfg.run_dir)}: {output.name}, which "
                    f"depends on {', '.join(keys)}); use another run.dir or restore those values")
            log.info("%s: %s changed; no output it holds depends on them: recorded in %s",
                     cfg.run_dir, changed, path.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, yaml.safe_dump({**current, "meta": {"git": git_revision()}}, sort_keys=False))
    return path


def default_settings() -> dict[str, Any]:
    """The dataclass defaults as flat `section.key: value`s (train.device's without the environment)."""
    return _flatten(Config().to_dict())


def saved_settings(path: Path) -> dict[str, Any]:
    """A resolved config.yaml as flat `section.key: value`s (settings_of)."""
    return settings_of(yaml.safe_load(Path(path).read_text()) or {})


def settings_of(saved: dict) -> dict[str, Any]:
    """A resolved config's content as flat `section.key: value`s, keys renamed since as they are now
    (a key added to the code since is absent: its default applies)."""
    saved = {k: v for k, v in saved.items() if k != "meta"}
    flat = _flatten(saved)
    for key, (renamed, value) in RENAMED_KEYS.items():  # a run resolved before the rename
        if key in flat:
            flat[renamed] = value(flat.pop(key))
    return flat


def first_artefact(run_dir: Path) -> Path | None:
    """A file in the run directory that some command produced (anything but the resolved configs of
    the run and its sub-runs, and logs), or None when there is none."""
    for dirpath, dirnames, filenames in os.walk(run_dir):
        dirnames[:] = sorted(d for d in dirnames if d != "logs")
        for name in sorted(filenames):
            if name != "config.yaml":
                return Path(dirpath) / name
    return None


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
