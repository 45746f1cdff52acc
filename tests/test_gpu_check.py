"""benchmarks/gpu_check.sh's plumbing, through its fast dry run: the stages in order, each with a
status, caps within the budget, at most 6 files in $OUT, and a sanitizer that refuses the device
reported as such. The GPU work itself runs only on a GPU machine (BENCHMARKS.md)."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402
from fercuda.compare import emit  # noqa: E402

STAGES = list(gpu_check.CAPS)
STATUSES = {"ok", "FAILED", "TIMEOUT", "SKIPPED", "REFUSED", "WARN", "INTERRUPTED"}
CLASSES = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
# The GPU machine's caps fit its work; here each Python process that imports torch takes seconds
# (many more on a loaded machine), so the dry run shares the same 540 s out by what runs here.
DRY_RUN_CAPS = ("environment=60,build=90,bench_canny_gpu=10,bench_dwconv_gpu=10,bench_fernet_train=10,"
                "fernet_train_run=150,tests=120,memcheck=30,racecheck=30,initcheck=30")


def tiny_fer2013(root: Path, rng) -> Path:
    """The FER2013 folder layout with two faces per class and split: what the training run reads."""
    for cls in CLASSES:
        for split, prefix in (("train", "Training"), ("test", "PublicTest"), ("test", "PrivateTest")):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(2):
                face = cv2.GaussianBlur(rng.integers(0, 256, (48, 48), dtype=np.uint8), (5, 5), 0)
                cv2.imwrite(str(folder / f"{prefix}_{cls}{i}.jpg"), face)
    return root


def refusing_sanitizer(folder: Path) -> Path:
    """What compute-sanitizer does on a machine whose device it does not support."""
    path = folder / "compute-sanitizer"
    path.write_text("#!/bin/sh\necho '========= Error: Device not supported'\nexit 1\n")
    path.chmod(0o755)
    return path


def test_caps_add_up_within_the_budget():
    assert sum(gpu_check.CAPS.values()) <= 540
    assert all(cap > 0 for cap in gpu_check.CAPS.values())


def test_emit_prints_the_row_and_keeps_it(tmp_path, monkeypatch, capsys):
    rows = tmp_path / "rows.jsonl"
    monkeypatch.setenv("FERCUDA_BENCH_ROWS", str(rows))
    emit("demo", "a", "row a: 1.0 ms", header="the header", ms=1.0)
    emit("demo", "b", "row b: 2.0 ms", header="the header", ms=2.0)
    printed = capsys.readouterr().out
    assert printed.count("the header") == 1 and "row a: 1.0 ms" in printed and "row b: 2.0 ms" in printed
    kept = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [(r["case"], r["ms"]) for r in kept] == [("a", 1.0), ("b", 2.0)]


def test_pack_and_unpack_fer2013(tmp_path):
    src = tiny_fer2013(tmp_path / "fer", np.random.default_rng(0))
    archive = tmp_path / "fer.tar.gz"
    script = str(REPO / "benchmarks" / "pack_fer2013.py")
    subprocess.run([sys.executable, script, "--src", str(src), "--out", str(archive)], check=True,
                   capture_output=True)
    first = archive.read_bytes()
    subprocess.run([sys.executable, script, "--src", str(src), "--out", str(archive)], check=True,
                   capture_output=True)
    assert archive.read_bytes() == first, "the archive is not reproducible"
    out = tmp_path / "unpacked"
    subprocess.run([sys.executable, script, "--unpack", str(archive), "--to", str(out)], check=True,
                   capture_output=True)
    for path in src.rglob("*.jpg"):
        assert (out / path.relative_to(src)).read_bytes() == path.read_bytes()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    fer = tiny_fer2013(tmp / "fer", np.random.default_rng(0))
    archive = tmp / "fer2013.tar.gz"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "pack_fer2013.py"), "--src", str(fer),
                    "--out", str(archive)], check=True, capture_output=True)
    out = tmp / "out"
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "fast", "OUT": str(out), "PYTHON": sys.executable,
           "GPU_CHECK_WORK": str(tmp / "work"), "GPU_CHECK_FER2013_ARCHIVE": str(archive),
           "GPU_CHECK_SANITIZER": str(refusing_sanitizer(tmp)), "GPU_CHECK_CAPS": DRY_RUN_CAPS}
    env.pop("FERCUDA_FER2013", None)
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=400)
    return done, out


def test_dry_run_exits_0(dry_run):
    done, _ = dry_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_dry_run_writes_at_most_6_files(dry_run):
    _, out = dry_run
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 6 and set(files) <= set(gpu_check.OUT_FILES), files
    assert {"summary.txt", "benchmarks.json", "logs.tar.gz", "tests.xml"} <= set(files)


def test_dry_run_stages_ran_in_order_with_a_status(dry_run):
    done, out = dry_run
    record = json.loads((out / "benchmarks.json").read_text())
    stages = record["stages"]
    assert [s["name"] for s in stages] == STAGES
    assert all(s["status"] in STATUSES for s in stages), [(s["name"], s["status"]) for s in stages]
    started = [s["started_s"] for s in stages]
    assert started == sorted(started)
    assert record["complete"] and record["caps_total_s"] <= record["budget_s"] == 540
    # the stage headers on stdout come in the same order
    printed = [line.split()[1].rstrip(":") for line in done.stdout.splitlines() if line.startswith(("=== ", "--- "))]
    assert [name for i, name in enumerate(printed) if name not in printed[:i]] == STAGES
    by_name = {s["name"]: s for s in stages}
    assert by_name["environment"]["status"] == "ok"
    assert by_name["build"]["status"] == "ok"
    assert {b["name"]: b["status"] for b in by_name["build"]["background"]} == {
        "fer2013_data": "ok", "warmup_triton": "ok"}
    assert by_name["fernet_train_run"]["status"] == "ok"
    assert by_name["tests"]["status"] in ("ok", "SKIPPED")
    for tool in ("memcheck", "racecheck", "initcheck"):
        assert by_name[tool]["status"] == "REFUSED", by_name[tool]


def test_dry_run_summary_lists_every_stage(dry_run):
    _, out = dry_run
    summary = (out / "summary.txt").read_text()
    lines = {line.split()[0]: line for line in summary.splitlines() if line.split() and line.split()[0] in STAGES}
    assert list(lines) == STAGES
    for line in lines.values():
        assert any(word in STATUSES for word in line.split()), line
    assert "FERNet training run:" in summary  # the training run's figures
    assert "finished after" in summary


def test_dry_run_archive_holds_every_log(dry_run):
    _, out = dry_run
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    ran = [s["name"] for s in json.loads((out / "benchmarks.json").read_text())["stages"] if s["seconds"]]
    for name in ran:
        assert f"gpu_check/logs/{name}.log" in names, (name, names)
    assert not any(n.endswith(".pt") for n in names)


def test_gpu_run_plan(tmp_path, monkeypatch):
    """What the GPU machine runs (nothing runs here): the build for sm_90, the warm-up beside it,
    the benchmarks on cuda, the GPU tests under xdist and a timeout, the sanitizers' settings."""
    archive = tmp_path / "fer2013.tar.gz"
    archive.write_bytes(b"")
    for name in ("GPU_CHECK_DRY_RUN", "GPU_CHECK_CAPS", "FERCUDA_FER2013", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GPU_CHECK_WORK", str(tmp_path / "work"))
    monkeypatch.setenv("GPU_CHECK_FER2013_ARCHIVE", str(archive))
    monkeypatch.setenv("GPU_CHECK_SANITIZER", "/usr/local/cuda/bin/compute-sanitizer")
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: object())  # xdist, pytest_timeout
    check = gpu_check.GpuCheck()
    stages = {s.name: s for s in check.plan()}
    assert list(stages) == STAGES and not any(s.skip for s in stages.values())
    command = {name: " ".join(s.command(s.cap)) for name, s in stages.items()}

    build = stages["build"]
    assert "setup.py build_ext --inplace" in command["build"]
    assert build.env["FORCE_CUDA"] == "1" and build.env["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert [(j.name, j.awaited) for j in build.background] == [
        ("fer2013_data", True), ("warmup_canny", True), *[(f"warmup_dwconv_{k}", True) for k in range(4)],
        *[(f"warmup_compile_{k}", True) for k in range(2)], ("warmup_tests", False)]
    assert all(j.env["GPU_WARMUP_BUILD_DONE"] == str(check.build_done) for j in build.background)
    for name in ("bench_canny_gpu", "bench_dwconv_gpu", "bench_fernet_train"):
        assert f"benchmarks/{name}.py" in command[name] and " -s " in command[name]
    assert stages["bench_fernet_train"].env["FERCUDA_BENCH_DEVICE"] == "cuda"
    assert "--device cuda" in command["fernet_train_run"] and "--time-limit" in command["fernet_train_run"]
    assert str(check.fer2013) in command["fernet_train_run"]
    for path in gpu_check.GPU_TEST_FILES:
        assert path in command["tests"] and (REPO / path).is_file()
    assert " -n " in command["tests"] and "--timeout 60" in command["tests"] and "--junitxml=" in command["tests"]
    assert f"-k {gpu_check.GPU_TEST_SELECTION}" in command["tests"]
    for tool in ("memcheck", "racecheck", "initcheck"):
        assert command[tool].startswith(f"/usr/local/cuda/bin/compute-sanitizer --tool {tool} --error-exitcode 99")
        assert ("kns=fercuda" in command[tool]) == (tool != "initcheck")
        assert ("PYTORCH_NO_CUDA_MEMORY_CACHING" in stages[tool].env) == (tool != "racecheck")


def test_sanitizer_subsets_select_tests():
    """The sanitizers' -k expressions still name tests (a rename would make them select none)."""
    from _pytest.mark.expression import Expression

    listed = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                             *gpu_check.SANITIZER_FILES], cwd=REPO, capture_output=True, text=True, check=True)
    ids = [line for line in listed.stdout.splitlines() if "::" in line]
    for tool, expression in gpu_check.SANITIZER_SUBSET.items():
        compiled = Expression.compile(expression)
        chosen = [i for i in ids if compiled.evaluate(lambda name, i=i: name.lower() in i.lower())]
        assert any("canny" in i for i in chosen) and any("dwconv" in i for i in chosen), (tool, chosen)
        assert len(chosen) <= 30, (tool, len(chosen))
        assert not any("cpu" in i or "triton" in i for i in chosen), (tool, chosen)


def test_a_partly_unpacked_archive_is_not_read(tmp_path, monkeypatch):
    archive = tmp_path / "fer2013.tar.gz"
    archive.write_bytes(b"")
    monkeypatch.delenv("FERCUDA_FER2013", raising=False)
    monkeypatch.setenv("GPU_CHECK_WORK", str(tmp_path / "work"))
    monkeypatch.setenv("GPU_CHECK_FER2013_ARCHIVE", str(archive))
    check = gpu_check.GpuCheck()
    check.stages = check.plan()
    build = check.stages[1]
    unpack = next(j for j in build.background if j.name == "fer2013_data")
    unpack.rc, unpack.timed_out = -9, True
    check.forget_unfinished_data(build)
    assert check.fer2013 is None and "FERCUDA_FER2013" not in check.base_env()
    assert "not unpacked (TIMEOUT" in check.stages[STAGES.index("fernet_train_run")].skip
