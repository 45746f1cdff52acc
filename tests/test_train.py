import csv
import json
import math
import shutil

import cv2
import numpy as np
import pytest
import torch

from fercuda import cli

EPOCHS = 3
PER_CLASS_TRAIN = 24
PER_CLASS_TEST = 2


@pytest.fixture(scope="module")
def small_fer(fer2013_dir, tmp_path_factory):
    """A few hundred real FER2013 faces in the folder layout, with the official split prefixes."""
    root = tmp_path_factory.mktemp("fer_small")
    for class_dir in sorted((fer2013_dir / "train").iterdir()):
        picks = sorted(class_dir.glob("Training_*"))[:PER_CLASS_TRAIN]
        for split in ("PublicTest", "PrivateTest"):
            picks += sorted((fer2013_dir / "test" / class_dir.name).glob(f"{split}_*"))[:PER_CLASS_TEST]
        for src in picks:
            top = "train" if src.name.startswith("Training_") else "test"
            dst = root / top / class_dir.name / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    return root


def train_args(data, out, cache, *extra):
    # One thread: on a shared 2-core machine, torch's two threads spin against each other.
    return ["train", "--data", str(data), "--out", str(out), "--cache-dir", str(cache), "--width-mult", "0.125",
            "--batch-size", "16", "--device", "cpu", "--threads", "1", "--seed", "1", "--no-progress", *extra]


@pytest.fixture(scope="module")
def trained_run(small_fer, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "fer"
    cache = tmp_path_factory.mktemp("cache")
    cli.main(train_args(small_fer, out, cache, "--epochs", str(EPOCHS)))
    return out, cache


def test_training_writes_every_output_and_loss_falls(trained_run):
    out, _ = trained_run
    unit = out / "official"
    history = json.loads((unit / "metrics.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(h["images_per_s"] > 0 and 0 <= h["val_acc"] <= 1 for h in history)
    with open(unit / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["train_loss"]) for r in rows] == pytest.approx([h["train_loss"] for h in history])
    for png in ("curves.png", "confusion.png"):
        image = cv2.imread(str(unit / png))
        assert image is not None and image.shape[0] > 100, png
    per_class = json.loads((unit / "per_class.json").read_text())
    assert per_class["split"] == "PrivateTest"
    assert sum(r["support"] for r in per_class["per_class"].values()) == 7 * PER_CLASS_TEST
    cm = np.array(per_class["confusion_matrix"])
    assert cm.sum() == 7 * PER_CLASS_TEST
    assert per_class["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    results = json.loads((unit / "results.json").read_text())
    assert results["test_accuracy"] == per_class["accuracy"]
    assert json.loads((out / "summary.json").read_text())["test_accuracy"] == results["test_accuracy"]
    args = json.loads((out / "args.json").read_text())
    assert args["width_mult"] == 0.125 and args["batch_size"] == 16 and args["lr"] == 1e-3
    last = torch.load(unit / "last.pt", weights_only=True)
    assert last["epoch"] == EPOCHS and {"model", "optimizer", "scaler", "rng"} <= set(last)
    best = torch.load(unit / "best.pt", weights_only=True)
    assert best["val_acc"] == max(h["val_acc"] for h in history)
    assert best["classes"] == ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]


def test_resume_continues_from_the_saved_epoch(trained_run, small_fer, tmp_path):
    out, cache = trained_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    before = json.loads((resumed / "official" / "metrics.json").read_text())
    cli.main(["train", "--resume", str(resumed), "--epochs", str(EPOCHS + 1), "--no-progress"])
    after = json.loads((resumed / "official" / "metrics.json").read_text())
    assert [h["epoch"] for h in after] == list(range(1, EPOCHS + 2))
    assert after[:EPOCHS] == before
    assert torch.load(resumed / "official" / "last.pt", weights_only=True)["epoch"] == EPOCHS + 1
    assert json.loads((resumed / "args.json").read_text())["epochs"] == EPOCHS + 1
    # Model, optimizer and RNG states were restored: the same as training without a stop.
    straight = tmp_path / "straight"
    cli.main(train_args(small_fer, straight, cache, "--epochs", str(EPOCHS + 1)))
    uninterrupted = json.loads((straight / "official" / "metrics.json").read_text())
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert after[-1][key] == pytest.approx(uninterrupted[-1][key], rel=1e-4), key


RECIPE = ("--ema", "0.9", "--erasing", "0.5", "--mixup", "0.2", "--cutmix", "1.0",
          "--label-smoothing", "0.1", "--limit", "96")


def test_recipe_flags_resume_exactly_and_score_the_weight_average(small_fer, tmp_path):
    """A run with the weight average, erasing and mixing, stopped after one epoch and resumed,
    ends where one run of two epochs does; best.pt holds the average, the model that was
    validated."""
    cache = tmp_path / "cache"
    cli.main(train_args(small_fer, tmp_path / "straight", cache, "--epochs", "2", *RECIPE))
    cli.main(train_args(small_fer, tmp_path / "stopped", cache, "--epochs", "1", *RECIPE))
    cli.main(["train", "--resume", str(tmp_path / "stopped"), "--epochs", "2", "--no-progress"])
    straight = json.loads((tmp_path / "straight" / "official" / "metrics.json").read_text())
    resumed = json.loads((tmp_path / "stopped" / "official" / "metrics.json").read_text())
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert resumed[-1][key] == pytest.approx(straight[-1][key], rel=1e-4), key
    saved = json.loads((tmp_path / "straight" / "args.json").read_text())
    assert (saved["ema"], saved["erasing"], saved["mixup"], saved["cutmix"]) == (0.9, 0.5, 0.2, 1.0)
    unit = tmp_path / "straight" / "official"
    last = torch.load(unit / "last.pt", weights_only=True)
    assert last["ema"]["updates"] == sum(h["steps"] for h in straight)
    best = torch.load(unit / "best.pt", weights_only=True)
    if best["epoch"] == 2:
        for k, v in best["model"].items():
            assert torch.equal(v, last["ema"]["model"][k]), k
    assert any(not torch.equal(v, last["model"][k]) for k, v in last["ema"]["model"].items())


def test_bad_recipe_arguments(tmp_path, capsys):
    for flag, value, said in (("--ema", "1.0", "--ema must lie in [0, 1)"), ("--ema", "nan", "--ema must lie"),
                              ("--erasing", "1.5", "--erasing must be a probability in [0, 1], got 1.5"),
                              ("--mixup", "-0.2", "--mixup and --cutmix must be >= 0"),
                              ("--cutmix", "-1", "--mixup and --cutmix must be >= 0")):
        with pytest.raises(SystemExit):
            cli.main(["train", "--data", str(tmp_path), flag, value])
        assert said in capsys.readouterr().err, flag


def test_eval_reproduces_the_reported_accuracy(trained_run, small_fer, tmp_path, capsys):
    out, cache = trained_run
    cli.main(["eval", str(out / "official" / "best.pt"), "--data", str(small_fer), "--cache-dir", str(cache),
              "--device", "cpu", "--out", str(tmp_path / "eval")])
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    results = json.loads((out / "official" / "results.json").read_text())
    assert report["accuracy"] == pytest.approx(results["test_accuracy"])
    assert "precision" in capsys.readouterr().out
    # The plain model reads the same checkpoint and agrees.
    cli.main(["eval", str(out), "--plain", "--data", str(small_fer), "--cache-dir", str(cache),
              "--device", "cpu", "--out", str(tmp_path / "eval_plain")])
    plain = json.loads((tmp_path / "eval_plain" / "eval.json").read_text())
    assert plain["accuracy"] == pytest.approx(report["accuracy"])


def test_predict_on_faces(trained_run, small_fer, tmp_path):
    out, _ = trained_run
    classes = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
    face_file = sorted((small_fer / "test" / "happy").iterdir())[0]
    face = cv2.imread(str(face_file), cv2.IMREAD_GRAYSCALE)
    cli.main(["predict", str(out / "official" / "best.pt"), str(face_file), "--out", str(tmp_path / "face.png"),
              "--json", str(tmp_path / "face.json"), "--device", "cpu"])
    found = json.loads((tmp_path / "face.json").read_text())[0]["faces"]
    assert len(found) == 1 and found[0]["box"] == [0, 0, 48, 48] and found[0]["dominant_emotion"] in classes
    assert cv2.imread(str(tmp_path / "face.png")) is not None

    # A larger scene built from a FER face: needs the Haar cascade, or --whole-image.
    scene = np.full((240, 320), 128, np.uint8)
    scene[40:232, 60:252] = cv2.resize(face, (192, 192), interpolation=cv2.INTER_CUBIC)
    scene_file = tmp_path / "scene.png"
    cv2.imwrite(str(scene_file), scene)
    detector, reason = cli.face_detector()
    predict_scene = ["predict", str(out), str(scene_file), "--out", str(tmp_path / "scene_out.jpg"),
                     "--json", str(tmp_path / "scene.json"), "--device", "cpu"]
    if detector is None:
        with pytest.raises(RuntimeError, match="haarcascade_frontalface_default.xml"):
            cli.main(predict_scene)
        cli.main([*predict_scene, "--whole-image"])
        assert json.loads((tmp_path / "scene.json").read_text())[0]["faces"][0]["box"] == [0, 0, 320, 240]
    else:
        cli.main(predict_scene)
        found = json.loads((tmp_path / "scene.json").read_text())[0]["faces"]
        assert found, "the Haar cascade found no face in the scene"
        for f in found:
            x, y, w, h = f["box"]
            # The face was pasted at rows 40..232, columns 60..252.
            assert 60 <= x + w / 2 <= 252 and 40 <= y + h / 2 <= 232, f["box"]
            assert f["dominant_emotion"] in classes
    assert cv2.imread(str(tmp_path / "scene_out.jpg")) is not None

    # A short video of FER faces: one classified face per frame, an annotated video out.
    video = tmp_path / "faces.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (48, 48))
    faces = [cv2.imread(str(p)) for p in sorted((small_fer / "test" / "sad").iterdir())[:3]]
    for f in faces:
        writer.write(f)
    writer.release()
    cli.main(["predict", str(out), str(video), "--out", str(tmp_path / "faces_out.avi"),
              "--json", str(tmp_path / "video.json"), "--device", "cpu"])
    frames = json.loads((tmp_path / "video.json").read_text())
    assert len(frames) == 3 and all(len(fr["faces"]) == 1 for fr in frames)
    capture = cv2.VideoCapture(str(tmp_path / "faces_out.avi"))
    assert capture.isOpened() and capture.read()[0]
    capture.release()


def test_info_prints_parameters_and_flops(capsys):
    cli.main(["info", "--width-mult", "1", "0.25"])
    printed = capsys.readouterr().out
    assert "9,233,183 parameters" in printed and "GFLOPs" in printed


def test_bad_train_arguments(tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["train", "--data", str(tmp_path), "--folds", "1"])
    with pytest.raises(SystemExit):
        cli.main(["train", "--resume", str(tmp_path)])  # no args.json there
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli.main(["train", "--data", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o"), "--device", "cpu"])


def test_kfold_reports_mean_and_std(small_fer, tmp_path):
    out = tmp_path / "folds"
    cli.main(train_args(small_fer, out, tmp_path / "cache", "--folds", "2", "--epochs", "1", "--limit", "32"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["folds_done"] == 2 and len(summary["fold_accuracies"]) == 2
    assert summary["mean_accuracy"] == pytest.approx(np.mean(summary["fold_accuracies"]))
    assert summary["std_accuracy"] == pytest.approx(np.std(summary["fold_accuracies"]))
    tested = sum(json.loads((out / f"fold_{f:02d}" / "results.json").read_text())["test_images"] for f in range(2))
    assert tested == 7 * (PER_CLASS_TRAIN + 2 * PER_CLASS_TEST)  # every image is tested exactly once


def test_warns_when_training_images_are_blurrier_than_test_images():
    from types import SimpleNamespace

    from fercuda.data.diagnostics import splits_differ_warning

    gen = torch.Generator().manual_seed(0)
    sharp = torch.randint(0, 256, (20, 1, 48, 48), dtype=torch.uint8, generator=gen)
    blurred = torch.nn.functional.avg_pool2d(sharp.float(), 7, 1, 3).round().to(torch.uint8)
    data = SimpleNamespace(images=torch.cat([blurred, sharp]))
    assert "Training images are blurrier than the test images" in splits_differ_warning(
        data, np.arange(20), np.arange(20, 40), "test")
    assert splits_differ_warning(data, np.arange(20), np.arange(20), "test") is None


def _torchrun(run_args, log_path):
    """`torchrun --nproc-per-node 2 -m fercuda.train ...` on the CPU (gloo), in its own process group."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "fercuda.train", *run_args]
    return subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def _kill_tree(pid):
    """SIGKILL a process and all its descendants. torchrun starts each worker in a session of its
    own (start_new_session), so neither a process group nor a session holds the whole job: the
    tree is collected from /proc's parent links before anything is killed, the launcher first so
    that it cannot react to its workers' deaths."""
    import os
    import signal
    from pathlib import Path

    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))  # ppid, the 4th field
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return tree


def test_ddp_two_processes_agree_write_once_and_resume_after_a_kill(small_fer, tmp_path):
    import time

    cache = tmp_path / "cache"
    # train_args() starts with the "train" subcommand, which `python -m fercuda.train` does not take.
    base = train_args(small_fer, tmp_path / "unused", cache)[1:]
    out = tmp_path / "ddp"
    base[base.index("--out") + 1] = str(out)
    epochs = 3
    job = _torchrun([*base, "--epochs", str(epochs)], tmp_path / "first.log")
    last = out / "official" / "last.pt"
    metrics = out / "official" / "metrics.json"  # written after last.pt
    deadline = time.time() + 600
    while not metrics.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert last.exists(), (tmp_path / "first.log").read_text()[-3000:]
    tree = _kill_tree(job.pid)  # the whole job, the launcher and both ranks, mid-run
    job.wait()
    assert len(tree) >= 3, f"expected the launcher and two ranks, found processes {tree}"
    for _ in range(100):  # the ranks are reaped by init, not by us: wait until they are gone
        if all(_proc_state(p) in ("gone", "Z") for p in tree[1:]):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"ranks {tree[1:]} outlived SIGKILL")
    killed_after = torch.load(last, weights_only=True)["epoch"]
    assert 1 <= killed_after < epochs, "the kill came too late to test --resume"
    before = json.loads(metrics.read_text())

    job = _torchrun(["--resume", str(out), "--no-progress"], tmp_path / "resume.log")
    assert job.wait(timeout=600) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    assert f"resuming {out / 'official'} after epoch {killed_after}" in (tmp_path / "resume.log").read_text()
    history = json.loads((out / "official" / "metrics.json").read_text())
    assert history[:len(before)] == before  # continued from the checkpoint, not restarted
    # Written once: one row per epoch (not one per rank), no temporary files left behind.
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    results = json.loads((out / "official" / "results.json").read_text())
    assert results["world_size"] == 2
    # The two replicas hold identical weights at the end (gradients averaged by DDP).
    assert results["rank_weight_spread"] == 0.0
    # Each process takes --batch-size images a step: 2 x 16 per step over the 168 training images.
    assert history[-1]["steps"] == math.ceil(math.ceil(7 * PER_CLASS_TRAIN / 2) / 16)


def _proc_state(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
