"""The training-throughput benchmark runs at a tiny size and reports every data path with consistent ratios."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import train_distributed  # noqa: E402
import train_throughput  # noqa: E402


def test_train_throughput_reports_both_phases_with_consistent_ratios(shard_set, tmp_path):
    shards, _ = shard_set
    out = tmp_path / "bench.json"
    code = train_throughput.main(
        [
            "--shards",
            str(shards),
            "--backbone",
            "convnet",
            "--batch-size",
            "16",
            "--steps",
            "12",
            "--warmup",
            "2",
            "--rounds",
            "2",
            "--device",
            "cpu",
            "--num-workers",
            "0",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert [row["phase"] for row in result["rows"]] == ["ReLA phase", "BYOL phase"]
    assert result["host"]["precision"] in ("bf16", "fp32")
    for row in result["rows"]:
        for column in ("model alone", "model alone, fp32", *train_throughput.PIPELINES):
            assert row[column] > 0, column
        assert abs(row["memory / model alone"] - row["memory + device views"] / row["model alone"]) < 0.01
        assert abs(row["memory / PIL (before)"] - row["memory + device views"] / row["PIL stream (before)"]) < 0.01
        assert row["memory: data_load_s"] > 0  # the one-off decoding pass is reported, not hidden in the rate
        assert all(len(values) == 2 for values in row["rounds"].values())


def test_ssl_settings_scores_trials_on_the_validation_split_and_resumes(tmp_path, capsys):
    import csv

    import ssl_settings
    from conftest import FIXTURE_ROOT

    from rela_pipeline.stages.evaluate import EvalConfig, run_eval

    out = tmp_path / "study"
    common = ["--tiny", "--data", str(FIXTURE_ROOT), "--out", str(out), "--device", "cpu", "--num-workers", "0"]
    assert ssl_settings.main([*common, "--trial", "base:", "--trial", "crop:crop_min_scale=0.5,lr_schedule=cosine,epochs=1"]) == 0
    with open(out / "results.csv", newline="") as handle:
        rows = {r["trial"]: r for r in csv.DictReader(handle)}
    assert set(rows) == {"base", "crop"} and json.loads(rows["crop"]["settings"]) == {"crop_min_scale": 0.5, "lr_schedule": "cosine", "epochs": 1}
    trials = out / "table" / "trials"
    base = json.loads((trials / "base" / "train" / "config.json").read_text())
    crop = json.loads((trials / "crop" / "train" / "config.json").read_text())
    # Trials start from train's own defaults, not the profile's choices.
    assert (base["lr_schedule"], base["crop_min_scale"], base["teacher_momentum"], base["transfer"]) == ("constant", None, "cosine", "trained")
    assert (crop["crop_min_scale"], crop["lr_schedule"], crop["epochs"]) == (0.5, "cosine", 1)
    # Scored on the validation split carved out of the train split, never on test.
    val = out / "table" / "data" / "val"
    assert sum(1 for _ in val.rglob("*.png")) == 100
    result = json.loads((trials / "crop" / "result.json").read_text())
    again = run_eval(
        EvalConfig(
            checkpoint=trials / "crop" / "train" / "backbone.pt",
            train_dir=out / "table" / "data" / "train",
            test_dir=val,
            device="cpu",
            num_workers=0,
            probe_epochs=10,
            progress=False,
        )
    )
    assert result["val_knn_top1"] == again["knn"]["top1"] and result["val_linear_probe_top1"] == again["linear_probe"]["top1"]
    # Rerun: nothing retrained; the same name with other settings is refused in one line.
    stamp = (trials / "crop" / "train" / "backbone.pt").stat().st_mtime_ns
    assert ssl_settings.main([*common, "--trial", "crop:crop_min_scale=0.5,lr_schedule=cosine,epochs=1"]) == 0
    assert (trials / "crop" / "train" / "backbone.pt").stat().st_mtime_ns == stamp
    capsys.readouterr()
    assert ssl_settings.main([*common, "--trial", "crop:crop_min_scale=0.3"]) == 2
    assert ssl_settings.main([*common, "--trial", "bad:learning_rate=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "exists with settings" in err[0] and "bad trial setting 'learning_rate=1'" in err[1]


def test_probe_protocol_reports_every_protocol_for_pixels_and_the_untrained_student(tmp_path):
    import probe_protocol
    from conftest import TEST_DIR, TRAIN_DIR

    out = tmp_path / "probe.json"
    assert probe_protocol.main(["--train", str(TRAIN_DIR), "--eval", str(TEST_DIR), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert list(rows) == ["raw pixels", "untrained convnet (seed 0)"]
    assert rows["raw pixels"]["feature_dim"] == 3 * 32 * 32 and rows["untrained convnet (seed 0)"]["feature_dim"] == 256
    for row in rows.values():
        assert set(row["linear_probe"]) == set(probe_protocol.PROTOCOLS)
        assert all(0.0 <= v <= 1.0 for v in row["linear_probe"].values())
        assert row["chosen_lr"] in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
    # The untrained ConvNet's raw features are small: the paper's fixed probe under-fits them.
    assert rows["untrained convnet (seed 0)"]["mean_abs_feature"] < 0.1


def test_train_distributed_compares_one_and_two_processes_at_the_same_budget(shard_set, tmp_path):
    shards, _ = shard_set
    out = tmp_path / "ddp.json"
    code = train_distributed.main(
        [
            "--shards",
            str(shards),
            "--processes",
            "2",
            "--batch-size",
            "16",
            "--epochs",
            "1",
            "--data-ratio",
            "1.0",
            "--rounds",
            "1",
            "--log-every",
            "4",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    for phase in ("ReLA phase", "BYOL (--no-rela)"):
        one, two = (result["runs"][f"{phase}, {p} process(es)"][0] for p in (1, 2))
        assert one["steps"] == two["steps"] == 300 // 16 and one["images_seen"] == two["images_seen"]
        assert one["images_per_s"] > 0 and two["images_per_s"] > 0
        assert abs(result["speedup"][phase] - two["images_per_s"] / one["images_per_s"]) < 1e-3


def test_scale_stage_one_reports_the_approximate_search_and_its_recall(tmp_path):
    import scale_stage_one

    report = scale_stage_one.main(
        [
            "--samples",
            "20000",
            "--dim",
            "64",
            "--score-index",
            "ivf",
            "--device",
            "cpu",
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(tmp_path / "scale.json"),
        ]
    )
    search = report["scores"]["search"]
    assert search["kind"] == "ivf" and search["recall_at_k"] >= 0.95 and search["lost_queries"] == 0
    assert set(report["phases"]) == {"fit", "transport", "scores"} and report["scores"]["finite"]
    assert json.loads((tmp_path / "scale.json").read_text())["scores"]["search"] == search
    assert not (tmp_path / "work").exists()  # the memory-maps are removed


def test_embed_distributed_compares_one_and_two_processes_and_their_outputs(tmp_path):
    import embed_distributed
    from conftest import TRAIN_DIR

    out = tmp_path / "embed.json"
    assert embed_distributed.main(["--data", str(TRAIN_DIR), "--processes", "2", "--rounds", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    one, two = (result["runs"][f"{p} process(es)"][0] for p in (1, 2))
    assert one["samples"] == two["samples"] == 300 and one["shards"] == two["shards"]
    cores = result["machine"]["cores"]
    assert (one["threads_per_process"], two["threads_per_process"]) == (cores, max(cores // 2, 1))  # the machine split two ways
    assert abs(result["embed_speedup"] - two["embed_images_per_s"] / one["embed_images_per_s"]) < 1e-3
    difference = result["output_difference"]
    # Float16 rounding of float32 targets that differ, if at all, in their last bits (the transport
    # fitted with another thread count): at most one float16 step at magnitude 1 (2^-10).
    assert difference["targets_max_abs_difference"] <= 2**-10
    assert difference["files_identical"] == (difference["files_differing"] == [])


def test_grouped_list_search_times_both_passes_and_finds_the_same_neighbours(tmp_path):
    import grouped_list_search

    out = tmp_path / "grouped.json"
    assert (
        grouped_list_search.main(
            ["--lists", "16", "--members-per-list", "50", "--queries-per-list", "200", "--nprobe", "4", "--rounds", "2", "--out", str(out)]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["shapes"] == {"members": 800, "queries": 800, "mean_queries_per_list": 200.0}
    assert all(len(values) == 2 for values in report["seconds"].values())
    assert report["speedup"] == round(min(report["seconds"]["knn"]) / min(report["seconds"]["products"]), 2)
    assert report["same_neighbour_ids"] > 0.999 and report["max_abs_similarity_difference"] < 1e-5


GPU_CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_runs_every_section_at_tiny_size(tmp_path):
    """``--tiny`` on the CPU, as a user would start it: every section present and error-free,
    with numbers that hang together; without CUDA and without ``--tiny`` it is one line, exit 2."""
    import subprocess

    out = tmp_path / "tiny.json"
    done = subprocess.run([sys.executable, str(GPU_CHECK), "--tiny", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    record = json.loads(out.read_text())
    for section in ("environment", "embed", "train", "scores", "eval", "methods"):
        assert section in record and "error" not in record[section], (section, record.get(section, {}).get("error"))
    assert record["environment"]["faiss"]["version"] and record["environment"]["resolved_precision"]["embed_auto"] == "fp32"
    images = record["data"]["train_images"]
    for entry in record["embed"]["priors"].values():
        runs = entry["runs"]
        assert {row["resolved"]["decode"] for row in runs.values()} == {"cpu", "gpu"}
        gpu_run = runs["gpu-decode bf16"]
        assert gpu_run["resolved"]["precision"] == "bf16" and sum(gpu_run["decoded_by"].values()) == images
        assert gpu_run["decoded_by"]["device"] == images  # every synthetic JPEG went through the device decoder
        assert all(row["embed_images_per_s"] > 0 and row["embed_over_forward_only"] > 0 for row in runs.values())
        assert entry["where_the_time_goes"]["forward_ms"] > 0
        assert entry["gpu_decode_against_cpu_decode"]["components"] >= 1
    for student in record["train"]["students"].values():
        assert student["rela"]["model_alone_images_per_s"] > 0 and student["byol"]["model_alone_images_per_s"] > 0
    assert record["train"]["fp16"]["resolved"]["precision"] == "fp16" and record["train"]["fp16"]["loss_scale"] > 0
    assert record["scores"]["device"] == "cpu" and record["scores"]["why_cpu"] == "no CUDA device"
    assert record["scores"]["ivf"]["settings"]["recall_at_k"] >= 0.95
    assert 0.0 <= record["eval"]["knn_top1"] <= 1.0 and record["eval"]["test_samples"] == record["data"]["test_images"]
    from rela_pipeline.methods import METHODS

    assert set(record["methods"]["methods"]) == set(METHODS)  # every method trained on the device path
    assert all(entry["method"]["images_per_s"] > 0 for entry in record["methods"]["methods"].values())
    assert record["methods"]["methods"]["byol"]["rela"]["images_per_s"] > 0
    assert "| prior | run |" in done.stdout and "| supervised |" in done.stdout  # the tables

    refused = subprocess.run([sys.executable, str(GPU_CHECK), "--out", str(tmp_path / "full.json")], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0 and refused.stderr.startswith("error: no CUDA device")
    assert not (tmp_path / "full.json").exists()


def test_scale_images_measures_both_kinds_phase_by_phase_and_resumes(tmp_path):
    import scale_images

    out = tmp_path / "scale.json"
    argv = [
        "--sizes",
        "200",
        "400",
        "--embed-sizes",
        "200",
        "400",
        "--image-size",
        "16",
        "--num-workers",
        "0",
        "--work",
        str(tmp_path / "work"),
        "--out",
        str(out),
    ]
    record = scale_images.main(argv)
    for n in ("200", "400"):
        cell = record["cells"][n]
        assert cell["scan"]["imagefolder_files_per_s"] > 0 and cell["scan"]["tar_samples_per_s"] > 0
        for kind in ("webdataset", "imagefolder"):
            assert cell[kind]["written"] == int(n) and set(cell[kind]["phases"]) >= {"scan", "embed", "transport", "scores", "write_shards"}
            assert 0 < cell[kind]["not_embedding_fraction"] < 1 and cell[kind]["peak_rss_mib"] > 0
    assert set(record["growth_exponents"]) >= {"webdataset", "imagefolder", "sizes"} and "imagefolder_s" in record["scan_growth_exponents"]
    assert set(record["memory_bytes_per_sample"]) == {"webdataset", "imagefolder"}
    assert all(cell[kind]["peak_anonymous_rss_mib"] > 0 for cell in record["cells"].values() for kind in ("webdataset", "imagefolder"))
    before = out.read_text()
    again = scale_images.main(argv)  # every cell is there: nothing is measured again
    assert json.dumps(again["cells"], sort_keys=True) == json.dumps(json.loads(before)["cells"], sort_keys=True)


def test_stage_one_io_times_both_scans_and_both_read_paths_on_the_same_inputs(tmp_path):
    import scale_images
    import stage_one_io

    folder, pattern = scale_images.make_inputs(tmp_path / "in", 300, 16, 1)  # 300 JPEGs in 1 tar and as files
    argv = ["--tars", pattern, "--imagefolder", str(folder), "--samples", "100", "--loader-samples", "60", "--rounds", "2", "--warm"]
    record = stage_one_io.main([*argv, "--out", str(tmp_path / "io.json")])
    assert all(len(v) == 2 and min(v) > 0 for v in record["scan_s"].values())
    assert set(record["reads_us_per_image"]) == {f"{i}_{r}_{c}" for i in ("tars", "imagefolder") for r in ("serial", "prefetched") for c in ("cold", "warm")}
    assert all(len(v) == 2 and min(v) > 0 for v in record["reads_us_per_image"].values())
    assert record["inputs"]["shards"] == 1 and record["read_bytes_per_image"] > 100  # JPEG bytes, not empty reads
    assert record["summary"]["scan_pool_speedup"] > 0 and record["summary"]["prefetch_speedup_imagefolder_cold"] > 0 and record["reads_cold_cache"] is False
    assert set(record["loader_images_per_second"]) == {f"{i}_{m}" for i in ("tars", "imagefolder") for m in ("one_at_a_time", "announced")}
    assert all(len(v) == 2 and min(v) > 0 for v in record["loader_images_per_second"].values()) and record["summary"]["announce_speedup_tars"] > 0


def test_shard_writers_times_each_count_and_every_count_writes_the_same_shards(tmp_path):
    import scale_images
    import shard_writers

    _, pattern = scale_images.make_inputs(tmp_path / "in", 300, 16, 1)
    argv = ["--data", pattern, "--samples", "250", "--shard-size", "40", "--writers", "1", "3", "--rounds", "1", "--warm"]
    record = shard_writers.main([*argv, "--work", str(tmp_path / "work"), "--out", str(tmp_path / "w.json")])
    assert set(record["seconds"]) == {"1", "3"} and all(len(v) == 1 and v[0] > 0 for v in record["seconds"].values())
    assert record["summary"]["same_shards_for_every_count"] is True and record["summary"]["speedup_over_first"]["1"] == 1.0
    assert record["inputs"]["samples"] == 250 and not any((tmp_path / "work").iterdir())  # every shard set it wrote is removed


def test_both_tar_header_formats_write_the_same_shards(tmp_path):
    import scale_images
    import shard_writers

    _, pattern = scale_images.make_inputs(tmp_path / "in", 120, 16, 1)
    argv = ["--data", pattern, "--samples", "120", "--shard-size", "50", "--writers", "1", "--tar-formats", "pax", "ustar", "--rounds", "1", "--warm"]
    record = shard_writers.main([*argv, "--work", str(tmp_path / "work"), "--out", str(tmp_path / "f.json")])
    assert set(record["seconds"]) == {"1-pax", "1-ustar"} and record["summary"]["same_shards_for_every_count"] is True
