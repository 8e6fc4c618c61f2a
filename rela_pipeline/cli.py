"""The ``rela-pipeline`` command line: a thin click layer over the Python API.

Every user error is a :class:`~rela_pipeline.errors.RelaError`, printed as one line
(``error: ...``) with a non-zero exit status and no traceback; Ctrl-C exits with 130.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from . import __version__
from .errors import RelaError

logger = logging.getLogger("rela_pipeline")


class _Group(click.Group):
    """Click group that turns RelaError and Ctrl-C into one-line messages and exit codes."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RelaError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(error.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: no manifest written; partial output removed", err=True)
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
@click.option("--source", type=click.Path(path_type=Path), default=None, help="Directory with the raw IDX files (default: /usr/share/datasets/fashion-mnist, else torchvision download).")
@click.option("--limit-per-class", type=click.IntRange(min=1), default=None, help="Keep only the first N images of each class per split.")
@click.option("--overwrite", is_flag=True, help="Replace existing train/ and test/ trees.")
def prepare(dataset: str, out_dir: Path, source: Path | None, limit_per_class: int | None, overwrite: bool) -> None:
    """Write a real dataset as ImageFolder trees (OUT/train/<class>/*.png, OUT/test/<class>/*.png)."""
    from .stages.prepare import prepare_fashion_mnist

    summary = prepare_fashion_mnist(out_dir, source=source, limit_per_class=limit_per_class, overwrite=overwrite)
    for split, info in summary["splits"].items():
        click.echo(f"{split}: {info['images']} images in {info['classes']} classes -> {Path(summary['out_dir']) / split}")


@main.command()
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path), help="ImageFolder root (DIR/<class>/*.jpg or DIR/*.jpg).")
@click.option("--prior", required=True, help="Prior spec: random:<arch> | torchvision:<arch>[:<file>] | open_clip:<model>:<tag|file|random> | checkpoint:<file>.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output directory for shards, transport, scores and manifest.")
@click.option("--batch-size", default=None, type=int, help="Images per forward pass [default: 256 on CUDA, 32 on CPU].")
@click.option("--num-workers", default=None, type=int, help="DataLoader decode workers [default: min(8, CPU count)].")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N.")
@click.option("--no-amp", is_flag=True, help="Disable autocast (bf16/fp16) on CUDA.")
@click.option("--image-size", type=int, default=None, help="Resize whole images to this many pixels instead of the prior's own preprocessing.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of random priors and of the sample order in shards.")
@click.option("--shard-size", default=10_000, show_default=True, type=int, help="Samples per shard.")
@click.option("--max-shard-bytes", default=3e9, show_default=True, type=float, help="Bytes per shard at most.")
@click.option("--target-dtype", default="float16", show_default=True, type=click.Choice(["float16", "float32"]), help="Storage dtype of targets.")
@click.option("--score-k", default=10, show_default=True, type=int, help="Neighbours for the k-NN density score.")
@click.option("--score-dims", default=64, show_default=True, type=int, help="Leading transported components used for scores (0: all).")
@click.option("--keep-embeddings", is_flag=True, help="Also write the raw prior embeddings (embeddings.npy, float32).")
@click.option("--overwrite", is_flag=True, help="Replace a previous shard set in OUT.")
@click.pass_context
def embed(ctx: click.Context, data_dir: Path, prior: str, out_dir: Path, num_workers: int | None, no_amp: bool, **options) -> None:
    """Stage one: embed DATA with a prior, transport the embeddings into representation targets,
    score every sample, and write WebDataset shards with a manifest."""
    from .stages.embed import EmbedConfig, run_embed

    config = EmbedConfig(data_dir=data_dir, prior=prior, out_dir=out_dir, amp=not no_amp, progress=not ctx.obj["quiet"], **options)
    if num_workers is not None:
        config.num_workers = num_workers
    manifest = run_embed(config)
    timings = manifest["timings_s"]
    click.echo(
        f"wrote {manifest['samples']['written']} samples in {len(manifest['shards'])} shards to {out_dir} "
        f"({manifest['samples']['skipped']} skipped, {manifest['throughput']['embed_images_per_s']:.0f} img/s, {timings['total']:.1f}s)"
    )


@main.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON instead of a summary.")
def inspect(out_dir: Path, as_json: bool) -> None:
    """Summarise the shard set in OUT_DIR."""
    from .shards.manifest import describe_shard_set, read_manifest

    click.echo(json.dumps(read_manifest(out_dir), indent=2) if as_json else describe_shard_set(out_dir))


@main.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
def verify(out_dir: Path) -> None:
    """Check every checksum and count of the shard set in OUT_DIR; exit 1 on any mismatch."""
    from .shards.manifest import verify_shard_set

    report = verify_shard_set(out_dir)
    for problem in report.problems:
        click.echo(f"FAIL {problem}", err=True)
    if not report.ok:
        raise RelaError(f"{len(report.problems)} problem(s) in {out_dir}", exit_code=1)
    click.echo(f"OK {out_dir}: {report.checked_files} files, {report.checked_samples} samples verified")


if __name__ == "__main__":  # pragma: no cover
    main()
