"""The ``rela-pipeline`` command line: a thin click layer over the Python API.

Every user error is a :class:`~rela_pipeline.errors.RelaError`, printed as one line
(``error: ...``) with a non-zero exit status and no traceback; Ctrl-C exits with 130.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import click

from . import __version__
from .errors import RelaError

logger = logging.getLogger("rela_pipeline")


_INTERRUPTED = {
    "embed": "no manifest written; the finished work is kept in OUT: continue with --resume",
    "train": "the run directory keeps its last complete checkpoint; continue with --resume",
}


def parse_bytes(value: str | None) -> int | None:
    """A byte count from ``12345``, ``5e9`` or a binary suffix (``512M``, ``8G``, ``1T``; also
    ``GiB``/``GB`` spellings, all powers of 1024).

    Raises:
        click.BadParameter: anything else.
    """
    if value is None:
        return None
    text = str(value).strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(text[-1:], 1)
    try:
        number = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a byte count (e.g. 8G, 512M, 5e9)") from None
    if number < 0:
        raise click.BadParameter(f"{value!r} is negative")
    return int(number)


def parse_probe_lr(value: str) -> float | None:
    """``auto`` -> None (chosen on held-out train rows), else a positive float.

    Raises:
        click.BadParameter: anything else.
    """
    if value == "auto":
        return None
    try:
        lr = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither auto nor a number") from None
    if not (math.isfinite(lr) and lr > 0):
        raise click.BadParameter(f"{value!r} must be a positive number")
    return lr


def parse_counts(value: str | None) -> tuple[int, ...]:
    """Positive integers from a comma-separated list (``10,100``); empty for None or "".

    Raises:
        click.BadParameter: anything else.
    """
    if not value:
        return ()
    try:
        counts = tuple(int(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers (e.g. 10,100)") from None
    if any(n < 1 for n in counts):
        raise click.BadParameter(f"{value!r}: every count must be >= 1")
    return counts


#: The settings dataclass of each stage's command (imported when first needed; they import no torch).
SETTINGS_CLASSES = {"embed": "rela_pipeline.stages.embed.config:EmbedConfig", "train": "rela_pipeline.stages.train.config:TrainConfig"}


def settings_class(stage: str) -> type:
    """The settings dataclass of ``stage`` (``embed`` or ``train``)."""
    import importlib

    module, name = SETTINGS_CLASSES[stage].split(":")
    return getattr(importlib.import_module(module), name)


class SettingOption(click.Option):
    """An option that sets one field (its parameter name) of a stage's settings dataclass.

    It holds no default of its own: a flag that is not given leaves the field to ``--config``, else
    to the dataclass's default, which ``--help`` shows (:mod:`rela_pipeline.settings`: the
    dataclasses are the one source of each default)."""

    def __init__(self, *param_decls, stage: str, **attrs) -> None:
        if not attrs.get("is_flag"):
            attrs.setdefault("default", None)
        self.stage = stage
        super().__init__(*param_decls, **attrs)

    def get_help_record(self, ctx: click.Context):
        from .settings import setting_defaults

        default = setting_defaults(settings_class(self.stage)).get(self.name)
        if default is None or (self.is_flag and not self.secondary_opts):
            return super().get_help_record(ctx)
        own_default, self.default, self.show_default = self.default, default, True  # shown, never used
        try:
            return super().get_help_record(ctx)
        finally:
            self.default = own_default


def setting(stage: str, *param_decls, **attrs):
    """``click.option`` of a :class:`SettingOption` of ``stage``."""
    return click.option(*param_decls, cls=SettingOption, stage=stage, **attrs)


def given_settings(ctx: click.Context) -> dict:
    """The settings the command line sets explicitly (flags given, or their environment
    variables): ``{field: value}`` of every :class:`SettingOption` whose value did not come from
    its default."""
    from click.core import ParameterSource

    return {
        param.name: ctx.params[param.name]
        for param in ctx.command.params
        if isinstance(param, SettingOption) and ctx.get_parameter_source(param.name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    }


def stage_settings(ctx: click.Context, stage: str, config_file: Path | None, given: dict, required: dict[str, str]):
    """The settings dataclass of ``stage`` from its defaults, ``--config`` and the flags given
    (:mod:`rela_pipeline.settings`).

    Raises:
        RelaError: a bad settings file, or a required setting in neither (one line).
    """
    from .settings import merge_settings, read_settings_file

    cls = settings_class(stage)
    from_file = read_settings_file(config_file, cls) if config_file is not None else {}
    return merge_settings(cls, from_file, {**given, "progress": not ctx.obj["quiet"]}, required)


def config_option(stage: str):
    """The ``--config FILE`` option of ``stage``'s command."""
    return click.option(
        "--config",
        "config_file",
        default=None,
        type=click.Path(dir_okay=False, path_type=Path),
        help=(
            "Settings file (YAML or JSON) of field names to values; flags given here override it. "
            + ("A run's own RUN/config.json reruns it." if stage == "train" else "A shard set's manifest.json reruns its settings.")
        ),
    )


def distributed_options(stage: str):
    """The torchrun options both stages take: ``--dist-timeout`` and ``--dist-wait-timeout``."""

    def decorate(command):
        command = setting(
            stage,
            "--dist-wait-timeout",
            "dist_wait_timeout_s",
            type=float,
            help="Under torchrun: seconds the other ranks wait while rank 0 works alone (verifying, fitting the transport, building the score index).",
        )(command)
        return setting(stage, "--dist-timeout", "dist_timeout_s", type=float, help="Under torchrun: seconds a rank waits for the others before the job fails.")(
            command
        )

    return decorate


class _Group(click.Group):
    """Click group that turns RelaError and Ctrl-C into one-line messages and exit codes."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RelaError as error:
            from .distributed import rank_prefix  # lazily: the CLI's start does not import torch

            click.echo(f"error: {rank_prefix()}{error}", err=True)
            sys.exit(error.exit_code)
        except KeyboardInterrupt:
            click.echo(f"interrupted: {_INTERRUPTED.get(ctx.invoked_subcommand or '', 'nothing half-written was kept')}", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="rela-pipeline")
@click.option("-q", "--quiet", is_flag=True, help="Only print errors and the final result.")
@click.pass_context
def main(ctx: click.Context, quiet: bool) -> None:
    """ReLA pipeline: precompute transported prior representations into WebDataset shards
    (embed), then train self-supervised learners on them."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    ctx.obj = {"quiet": quiet}


@main.command()
@click.argument("dataset", type=click.Choice(["fashion-mnist"]))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Directory for train/ and test/ ImageFolder trees.")
@click.option(
    "--source",
    type=click.Path(path_type=Path),
    default=None,
    help="Directory with the raw IDX files (default: /usr/share/datasets/fashion-mnist, else torchvision download).",
)
@click.option("--limit-per-class", type=click.IntRange(min=1), default=None, help="Keep only the first N images of each class per split.")
@click.option("--overwrite", is_flag=True, help="Replace existing train/ and test/ trees.")
def prepare(dataset: str, out_dir: Path, source: Path | None, limit_per_class: int | None, overwrite: bool) -> None:
    """Write a real dataset as ImageFolder trees (OUT/train/<class>/*.png, OUT/test/<class>/*.png)."""
    from .stages.prepare import prepare_fashion_mnist

    summary = prepare_fashion_mnist(out_dir, source=source, limit_per_class=limit_per_class, overwrite=overwrite)
    for split, info in summary["splits"].items():
        click.echo(f"{split}: {info['images']} images in {info['classes']} classes -> {Path(summary['out_dir']) / split}")


def embed_setting(*param_decls, **attrs):
    """An ``embed`` option that sets one :class:`~rela_pipeline.stages.embed.config.EmbedConfig` field."""
    return setting("embed", *param_decls, **attrs)


@main.command()
@config_option("embed")
@embed_setting(
    "--data",
    "data_dir",
    help="ImageFolder root (DIR/<class>/*.jpg or DIR/*.jpg), a .txt/.csv/.parquet file list, or WebDataset shards (a brace pattern or glob of local tars, e.g. 'in/part-{000000..000099}.tar', an http(s):// URL pattern, or a pipe: command). Required.",
)
@embed_setting(
    "--label-field",
    help="Tar or list input: where labels are (cls or json:<key> for tars, a column of a .csv list) [default: .cls / the label column when every sample has one].",
)
@embed_setting(
    "--prior",
    help="Prior spec: random:<arch> | torchvision:<arch>[:<file>] | timm:<name>[:<file>|random] | open_clip:<model>:<tag|file|random> | checkpoint:<file>. Required.",
)
@embed_setting("--out", "out_dir", type=click.Path(path_type=Path), help="Output directory for shards, transport, scores and manifest. Required.")
@embed_setting("--batch-size", type=int, help="Images per forward pass [default: 256 on CUDA, 32 on CPU].")
@embed_setting("--num-workers", type=int, help="DataLoader decode workers [default: min(8, CPUs - 1)].")
@embed_setting("--device", help="auto | cpu | cuda | cuda:N.")
@embed_setting(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    help="The prior's forward pass; auto = fp32 (bf16 decorrelates the trailing transported components; see the docs).",
)
@click.option("--no-amp", is_flag=True, hidden=True, help="Same as --precision fp32.")
@embed_setting(
    "--decode",
    type=click.Choice(["auto", "cpu", "gpu"]),
    help="Where JPEGs are decoded, resized and cropped: in the CPU workers, or batched on the device (nvJPEG); auto = gpu on CUDA.",
)
@embed_setting("--image-size", type=int, help="Resize whole images to this many pixels instead of the prior's own preprocessing.")
@embed_setting("--seed", type=int, help="Seed of random priors and of the sample order in shards.")
@embed_setting("--shard-size", type=int, help="Samples per shard.")
@embed_setting("--shard-writers", type=int, help="Processes writing shards in a one-process run; the bytes do not depend on it [default: min(8, CPUs)].")
@embed_setting("--max-shard-bytes", type=float, help="Bytes per shard at most.")
@embed_setting("--target-dtype", type=click.Choice(["float16", "float32"]), help="Storage dtype of targets.")
@embed_setting("--score-k", type=int, help="Neighbours for the k-NN density score.")
@embed_setting("--score-dims", type=int, help="Leading transported components used for scores (0: all).")
@embed_setting(
    "--score-index",
    type=click.Choice(["auto", "exact", "ivf", "hnsw"]),
    help="Neighbour search for the scores: exact, or an approximate faiss index tuned to recall@k >= 0.95 (auto: exact up to 200,000 samples on CPU, 2M on GPU).",
)
@embed_setting("--keep-embeddings", is_flag=True, help="Also write the raw prior embeddings (embeddings.npy, float32).")
@embed_setting("--overwrite", is_flag=True, help="Replace a previous shard set (or interrupted run) in OUT.")
@embed_setting("--resume", is_flag=True, help="Continue the interrupted run in OUT (same settings); finished, checksum-verified work is kept.")
@embed_setting("--checkpoint-seconds", type=float, help="Seconds between progress records while embedding (the most work a crash loses).")
@distributed_options("embed")
@click.pass_context
def embed(ctx: click.Context, config_file: Path | None, no_amp: bool, **_) -> None:
    """Stage one: embed DATA with a prior, transport the embeddings into representation targets,
    score every sample, and write WebDataset shards with a manifest."""
    from .stages.embed import run_embed

    given = given_settings(ctx)
    if no_amp:
        given["precision"] = "fp32"
    config = stage_settings(ctx, "embed", config_file, given, {"data_dir": "--data", "prior": "--prior", "out_dir": "--out"})
    manifest = run_embed(config)
    from .distributed import torchrun_world

    if (torchrun_world() or (0, 1))[0] != 0:
        return  # rank 0 reports for the job
    run, rate = manifest.get("run", {}), manifest["throughput"].get("embed_images_per_s")
    click.echo(
        f"wrote {manifest['samples']['written']} samples in {len(manifest['shards'])} shards to {config.out_dir} "
        f"({manifest['samples']['skipped']} skipped, {manifest['timings_s']['total']:.1f}s"
        + (f", {run.get('images_embedded')} images embedded at {rate:.0f} img/s" if rate else "")
        + (f"; resumed, {run.get('shards_reused', 0)} finished shards reused" if run.get("resumed") else "")
        + ")"
    )


@main.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON instead of a summary.")
def inspect(out_dir: Path, as_json: bool) -> None:
    """Summarise the shard set in OUT_DIR."""
    from .shards.manifest import describe_shard_set, read_manifest

    click.echo(json.dumps(read_manifest(out_dir), indent=2) if as_json else describe_shard_set(out_dir))


@main.command()
@click.argument("location")
def verify(location: str) -> None:
    """Check the shard set in LOCATION (a directory, or the URL of its manifest.json): schema,
    every checksum, count, sample key and target, and the transport against the targets; exit 1 on
    any problem."""
    from .shards.manifest import verify_shard_set

    report = verify_shard_set(location)
    for problem in report.problems:
        click.echo(f"FAIL {problem}", err=True)
    if not report.ok:
        raise RelaError(f"{len(report.problems)} problem(s) in {location}", exit_code=1)
    click.echo(
        f"OK {location}: {report.checked_samples} samples verified ({report.checked_files} files checksummed, {report.reference_checked} reference targets recomputed)"
    )


def train_setting(*param_decls, **attrs):
    """A ``train`` option that sets one :class:`~rela_pipeline.stages.train.config.TrainConfig` field."""
    return setting("train", *param_decls, **attrs)


@main.command()
@config_option("train")
@train_setting(
    "--shards",
    help="Shard set: an embed output directory, or the URL of its manifest.json (any URL webdataset opens, e.g. pipe:curl -s http://host/set/manifest.json). Required.",
)
@train_setting(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    help="Run directory (config, metrics.jsonl, TensorBoard events, checkpoints, backbone.pt, summary.json). Required.",
)
@train_setting("--method", help="Method: byol | simclr | dino | barlowtwins | vicreg | moco | swav | supervised (labelled sets).")
@train_setting("--backbone", help="Student: convnet | resnet18 | resnet50 | torchvision:<arch> | timm:<name>.")
@train_setting("--cifar-stem/--imagenet-stem", default=None, help="ResNet stem [default: CIFAR stem at 64 px and below].")
@train_setting("--image-size", type=int, help="Pixels of the square training views.")
@train_setting("--epochs", type=int, help="Epochs (each over a fresh subset).")
@train_setting("--batch-size", type=int, help="Images per optimisation step.")
@train_setting("--data-ratio", type=float, help="Fraction of the samples in each epoch's subset, in (0, 1].")
@train_setting("--subset", help="Subset rule: random (the paper) | density | dedup (stage-one scores; see the docs).")
@train_setting("--dedup-threshold", type=float, help="Cosine at which the dedup rule calls a nearest neighbour a duplicate.")
@train_setting("--rela-schedule", help="adaptive (plateau switch) | constant:<fraction of steps> | none (no ReLA loss: the baselines).")
@click.option("--no-rela", is_flag=True, help="Same as --rela-schedule none.")
@train_setting("--lr", type=float, help="AdamW learning rate.")
@train_setting("--weight-decay", type=float, help="AdamW weight decay.")
@train_setting("--lr-schedule", help="cosine (to 0 at the last step) | constant (the paper).")
@train_setting("--warmup-epochs", type=float, help="Epochs of linear learning-rate warm-up before the schedule.")
@train_setting(
    "--transfer",
    type=click.Choice(["trained", "frozen"]),
    help="ReLA transfer layer: trained with the backbone, or frozen at its random initialisation (the authors' code).",
)
@train_setting(
    "--teacher-momentum",
    type=click.Choice(["cosine", "constant"]),
    help="EMA teacher momentum (BYOL, DINO): cosine from the base value to 1, or constant.",
)
@train_setting("--crop-min-scale", type=float, help="Lower bound of the SSL views' crop scale [default: the method's, 0.08 for BYOL/SimCLR].")
@train_setting("--local-views", type=int, help="DINO's local / SwaV's low-resolution views per image [default: lightly's 6; 0 = the two full-size views only].")
@train_setting("--device", help="auto | cpu | cuda | cuda:N.")
@train_setting(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    help="Autocast dtype of the forward pass; auto = bf16 on CUDA and on CPUs with native bf16, else fp32. Losses, EMA and probe stay fp32.",
)
@click.option("--no-amp", is_flag=True, hidden=True, help="Same as --precision fp32.")
@train_setting(
    "--augment",
    type=click.Choice(["device", "pil"]),
    help="device: batched views on the training device; pil: per-image PIL views (lightly's transforms; the reference).",
)
@train_setting(
    "--data-path",
    type=click.Choice(["auto", "memory", "stream"]),
    help="memory: decode the shard set once into memory; stream: read the shards every epoch; auto: memory when it fits --cache-bytes.",
)
@train_setting(
    "--cache-bytes",
    callback=lambda ctx, param, value: parse_bytes(value),
    help="Budget of the memory path, e.g. 8G or 5e9 [default: half the free RAM, or half the free GPU memory on CUDA].",
)
@train_setting("--num-workers", type=int, help="Shard decoding workers [default: min(8, CPUs - 1)].")
@train_setting("--seed", type=int, help="Seed of initialisation, subsets, shuffles and views.")
@train_setting("--log-every", type=int, help="Steps per metrics.jsonl (and logger) record.")
@train_setting(
    "--logger",
    type=click.Choice(["tensorboard", "wandb", "none"]),
    help="Where metrics go besides metrics.jsonl: TensorBoard event files in RUN/tensorboard, Weights & Biases (offline unless WANDB_MODE says otherwise), or nowhere.",
)
@train_setting("--online-probe/--no-online-probe", default=None, help="Train the online linear probe on detached features (labelled sets).")
@train_setting("--skip-bad-shards", is_flag=True, help="Warn and skip unreadable shards or samples (and shards that fail verification) instead of failing.")
@train_setting("--verify/--no-verify", default=None, help="Verify the shard set before training (a remote set is streamed once for it).")
@train_setting("--resume", is_flag=True, help="Continue the run in OUT from its last checkpoint (with any number of processes).")
@train_setting("--overwrite", is_flag=True, help="Replace the run in OUT.")
@train_setting("--sync-batchnorm", is_flag=True, help="Under torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm).")
@distributed_options("train")
@click.pass_context
def train(ctx: click.Context, config_file: Path | None, no_rela: bool, no_amp: bool, **_) -> None:
    """Stage two: train a self-supervised student on a shard set with the ReLA alignment loss,
    on a fresh dynamic subset every epoch. Under torchrun (torchrun --nproc-per-node N --no-python
    rela-pipeline train ...) it trains one model with DistributedDataParallel; --batch-size stays
    the global batch."""
    from .distributed import torchrun_world
    from .stages.train import run_train

    given = given_settings(ctx)
    if no_rela:
        given["rela_schedule"] = "none"
    if no_amp:
        given["precision"] = "fp32"
    config = stage_settings(ctx, "train", config_file, given, {"shards": "--shards", "out_dir": "--out"})
    summary = run_train(config)
    world = torchrun_world()
    if world is not None and world[0] != 0:
        return  # rank 0 reports for the job
    budget, final = summary["budget"], summary["final"]
    switch = summary["rela_switch_step"]
    click.echo(
        f"trained {budget['steps']} steps ({budget['images_seen']} images, {budget['fraction']:.1%} of the full run's "
        f"{budget['full_run_steps']} steps) in {summary['wall_clock_s']:.1f}s; ReLA "
        + ("off" if config.rela_schedule == "none" else f"until step {switch}" if switch is not None else "for the whole run")
        + (
            f"; ReLA loss {summary['rela_loss']['first_interval']:.3f} -> {summary['rela_loss']['last_interval']:.3f}"
            if summary["rela_loss"]["last_interval"] is not None
            else ""
        )
        + (f"; final loss {final['loss']:.4f}" if final.get("loss") is not None else "")
        + (f", online probe {final['probe_acc']:.1%}" if final.get("probe_acc") is not None else "")
        + f"; backbone -> {summary['checkpoint']}"
    )


@main.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "export_format",
    required=True,
    help="torchvision (keys of torchvision.models.get_model(arch)) | timm (keys of timm.create_model(name, num_classes=0)) | state_dict (the project's keys).",
)
@click.option("--safetensors", "as_safetensors", is_flag=True, help="Write safetensors instead of torch.save of a plain dict.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="The weights file to write (its sidecar FILE.json is written beside it).")
def export(run: Path, export_format: str, as_safetensors: bool, out: Path) -> None:
    """Write the backbone of RUN (a run directory or a checkpoint file) under the keys of its
    library's own model, with a sidecar FILE.json, and print the lines that load it."""
    from .stages.export import export_backbone

    result = export_backbone(run, export_format, out, safetensors=as_safetensors)
    click.echo(
        f"wrote {result['tensors']} tensors ({result['format']} keys, {result['file_format']}) to {result['path']} and {result['sidecar']}; load them with:"
    )
    for line in result["load"]:
        click.echo(f"    {line}")


@main.command(name="eval")
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path), help="A backbone checkpoint (RUN/backbone.pt or RUN/checkpoints/last.pt).")
@click.option("--train", "train_dir", required=True, type=click.Path(path_type=Path), help="Labelled ImageFolder to fit the linear probe and the k-NN bank on.")
@click.option("--test", "test_dir", required=True, type=click.Path(path_type=Path), help="Labelled ImageFolder to measure on (same classes).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N.")
@click.option("--batch-size", default=256, show_default=True, type=int, help="Images per feature-extraction batch.")
@click.option("--num-workers", default=None, type=int, help="Decode workers [default: min(8, CPUs - 1)].")
@click.option("--image-size", default=None, type=int, help="Override the checkpoint's input size.")
@click.option("--probe-epochs", default=100, show_default=True, type=int, help="Linear-probe epochs (the paper: 100).")
@click.option(
    "--probe-lr",
    default="auto",
    show_default=True,
    callback=lambda ctx, param, value: parse_probe_lr(value),
    help="Linear-probe Adam learning rate, or auto: chosen from 1e-4..1e-2 on 10% of the train split held out (the paper: 3e-4).",
)
@click.option(
    "--probe-standardise/--no-probe-standardise",
    default=True,
    show_default=True,
    help="Standardise features with the train split's mean and std before the probe (the paper: no).",
)
@click.option("--knn-k", default=200, show_default=True, type=int, help="Neighbours of the k-NN classifier.")
@click.option("--knn-temperature", default=0.1, show_default=True, type=float, help="Temperature of the k-NN vote weights exp(cos / t).")
@click.option(
    "--few-label",
    default=None,
    callback=lambda ctx, param, value: parse_counts(value),
    help="Also evaluate with only these many labelled train images per class, e.g. 10,100 (mean over --few-label-draws draws).",
)
@click.option("--few-label-draws", default=3, show_default=True, type=int, help="Random draws of the labelled images per --few-label entry.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the linear probe and the few-label draws.")
@click.option("--json", "json_out", default=None, type=click.Path(path_type=Path), help="Also write the result as JSON to this file.")
@click.pass_context
def evaluate(ctx: click.Context, json_out: Path | None, **options) -> None:
    """Measure a backbone: linear-probe and k-NN top-1 on frozen features."""
    from .fileio import write_json_atomic
    from .stages.evaluate import EvalConfig, run_eval

    result = run_eval(EvalConfig(progress=not ctx.obj["quiet"], **options))
    if json_out is not None:
        write_json_atomic(json_out, result)
    click.echo(
        f"linear probe top-1 {result['linear_probe']['top1']:.2%}  k-NN (k={result['knn']['k']}) top-1 {result['knn']['top1']:.2%}  "
        f"[{result['checkpoint']}, step {result['step']}, {result['train_samples']} train / {result['test_samples']} test images, "
        f"{result['timings_s']['total']:.1f}s]"
    )
    for n, few in result.get("few_label", {}).items():
        click.echo(
            f"{n} labels per class: linear probe top-1 {few['linear_probe']['top1']:.2%} ± {few['linear_probe']['std']:.2%}  "
            f"k-NN top-1 {few['knn']['top1']:.2%} ± {few['knn']['std']:.2%} (mean ± std over {len(few['knn']['draws'])} draws)"
        )


if __name__ == "__main__":  # pragma: no cover
    main()
