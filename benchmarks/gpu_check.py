"""Everything fercuda checks on a GPU machine, in one command that fits one device call.

benchmarks/gpu_check.sh runs this with the machine's Python. Figures first, then correctness:

  environment         the record of fercuda.compare.environment (CPU and its flags, versions, threads,
                      load, the GPU), once; carried wheels (.whl/: kornia) installed first
  build               FORCE_CUDA=1 setup.py build_ext --inplace for sm_90, and beside it, in the
                      background: the FER2013 archive unpacked, Triton's and torch.compile's caches
                      warmed at the benchmarks' cases (gpu_warmup.py), then at the tests' variants
  bench_canny_gpu     benchmarks/bench_canny_gpu.py
  bench_dwconv_gpu    benchmarks/bench_dwconv_gpu.py
  bench_fernet_train  FERNet training throughput, fused vs plain, on cuda
  fernet_train_run    a short training run on FER2013, where it travelled (.fer2013/fer2013.tar.gz)
  tests               the GPU test files (CI runs the rest), pytest-xdist, a timeout per test
  memcheck, racecheck, initcheck   compute-sanitizer on a small subset of the CUDA kernels' tests

Each stage has a cap in seconds; the caps add up to no more than the budget (GPU_CHECK_BUDGET_S,
default 540: a device call's 10 minutes less one for transfers). A stage may run for its cap plus
whatever the stages before it left unused, never into the caps of the stages after it. A stage
that fails or runs out of time is recorded and the next one runs.

Nothing waits for a clean end: every stage's output goes to its log as it is printed, benchmark
rows are kept the moment they are measured (fercuda.compare.emit), and the files in $OUT are rewritten
after every stage and every REFRESH_S seconds within one. $OUT receives at most these 4 files:

  summary.txt      the stage table (cap, limit, seconds, status) and every figure measured
  benchmarks.json  the same, machine-readable: environment, stages, benchmark rows
  tests.xml        JUnit XML of the tests stage
  logs.tar.gz      every log, the pytest-benchmark JSON, the training run's metrics

Environment: OUT (default ./gpu_results), GPU_CHECK_BUDGET_S, GPU_CHECK_CAPS ("stage=seconds,..."),
GPU_CHECK_WORK (the scratch folder, default a new one in /tmp), GPU_CHECK_FER2013_ARCHIVE (default
.fer2013/fer2013.tar.gz), FERCUDA_FER2013 (an unpacked FER2013 folder instead), GPU_CHECK_SANITIZER
(compute-sanitizer's path), MAX_JOBS, TORCH_CUDA_ARCH_LIST (default 9.0).

GPU_CHECK_DRY_RUN=1 runs the same stages on a machine without a GPU: the extension already built
is imported instead of built, GPU work runs in its CPU form (Triton under TRITON_INTERPRET=1,
FERNet on the CPU, tiny) or is skipped with the reason; GPU_CHECK_DRY_RUN=fast makes it tinier
still (tests/test_gpu_check.py uses it).
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFRESH_S = 15  # rewrite $OUT this often while a stage runs
GRACE_S = 3  # from the SIGINT at a stage's limit to the SIGKILL; part of the stage's cap
OUT_FILES = ("summary.txt", "benchmarks.json", "tests.xml", "logs.tar.gz")
ARCHIVE_SKIP_BYTES = 4 * 2**20  # checkpoints and the like stay out of the log archive

# The test files whose tests need a GPU (CUDA kernels, Triton on CUDA tensors); CI runs the rest.
GPU_TEST_FILES = ["tests/test_canny.py", "tests/test_dwconv.py", "tests/test_package.py"]
# Their cases on a GPU backend: the op families' tests are parametrized over cpu, cuda, triton
# and emulated (the CUDA device code on the CPU); every GPU case has "cuda" or "triton" in its id.
GPU_TEST_SELECTION = "(cuda or triton or test_package) and not cpu and not emulated"
# The sanitizers' subset: both Canny paths and every stage kernel, and the dwconv kernels (inference,
# training, backward) at a shape whose planes fit no tile and whose channels fill no group of 32.
SANITIZER_FILES = ["tests/test_canny.py", "tests/test_dwconv.py"]
# Their CUDA C++ cases only: not the CPU kernel's nor the Triton kernels' (parameters cpu, triton).
SANITIZER_SUBSET = {
    "memcheck": "(test_small_cases_for_sanitizers or 3x37x9x11) and not cpu and not triton and not emulated",
    "racecheck": "(test_small_cases_for_sanitizers or 3x37x9x11) and not cpu and not triton and not emulated "
                 "and not float16 and not bfloat16",
    "initcheck": "(test_small_cases_for_sanitizers or 3x37x9x11-s1) and not cpu and not triton and not emulated "
                 "and not float16 and not bfloat16",
}
# What compute-sanitizer prints where it cannot run on this device (seen on gVisor machines).
SANITIZER_REFUSED = re.compile(r"Device not supported|not supported on this (device|platform)|"
                               r"Unable to (find|load) (the )?injection library|Target application terminated "
                               r"before first instrumented API call", re.IGNORECASE)

# Seconds per stage, in order. They add up to the budget: see BENCHMARKS.md for the reasoning.
CAPS = {
    "environment": 20,
    "build": 145,
    "bench_canny_gpu": 45,
    "bench_dwconv_gpu": 70,
    "bench_fernet_train": 40,
    "fernet_train_run": 65,
    "tests": 95,
    "memcheck": 25,
    "racecheck": 20,
    "initcheck": 15,
}


def now() -> float:
    return time.monotonic()


@dataclass
class Job:
    """One process: a stage's main command or a background job started with it."""
    name: str
    command: list[str]
    env: dict = field(default_factory=dict)
    awaited: bool = True  # background: the stage waits for it (else it is stopped when the stage ends)
    proc: subprocess.Popen | None = None
    log: Path | None = None
    started: float = 0.0
    ended: float | None = None
    rc: int | None = None
    timed_out: bool = False
    stopped: bool = False


@dataclass
class Stage:
    name: str
    cap: int
    command: Callable[[float], list[str]] | None = None  # given the stage's limit in seconds
    env: dict = field(default_factory=dict)
    skip: str | None = None  # the reason, where the stage cannot run here
    background: list[Job] = field(default_factory=list)
    judge: Callable[["Stage", int, str], tuple[str, str]] | None = None  # (rc, log text) -> (status, note)
    # filled in by the run
    status: str = "PENDING"
    note: str = ""
    limit: float | None = None
    started: float | None = None
    seconds: float | None = None
    job: Job | None = None


class Interrupted(Exception):
    pass


class GpuCheck:
    def __init__(self):
        env = os.environ
        self.dry = env.get("GPU_CHECK_DRY_RUN", "") not in ("", "0")
        self.fast = env.get("GPU_CHECK_DRY_RUN", "") == "fast"
        self.mode = "fast dry run" if self.fast else "dry run" if self.dry else "GPU run"
        self.py = env.get("PYTHON") or sys.executable
        self.out = Path(env.get("OUT") or ROOT / "gpu_results").resolve()
        self.work = Path(env.get("GPU_CHECK_WORK") or tempfile.mkdtemp(prefix="gpu_check_")).resolve()
        self.logs = self.work / "logs"
        self.rows_file = self.work / "rows.jsonl"
        self.budget = int(env.get("GPU_CHECK_BUDGET_S", "540"))
        self.caps = dict(CAPS)
        for item in filter(None, env.get("GPU_CHECK_CAPS", "").split(",")):
            name, _, seconds = item.partition("=")
            if name.strip() not in self.caps:
                raise SystemExit(f"gpu_check: GPU_CHECK_CAPS names no stage {name.strip()!r} (stages: {list(CAPS)})")
            self.caps[name.strip()] = int(seconds)
        if sum(self.caps.values()) > self.budget:
            raise SystemExit(f"gpu_check: the stage caps add up to {sum(self.caps.values())} s, over the "
                             f"{self.budget} s budget: {self.caps}")
        self.start = now()
        self.started_at = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        self.rows: list[dict] = []
        self.rows_read = 0
        self.environment: dict = {}
        self.stages: list[Stage] = []
        self.current: Stage | None = None
        self.last_refresh = 0.0
        self.finished = False
        self.fer2013: Path | None = None
        self.build_done = self.work / "build.done"  # the build's exit status, for the warm-up waiting on it

    # ------------------------------------------------------------------ the stages
    def base_env(self) -> dict:
        env = dict(os.environ)
        site = self.work / "site"
        paths = [str(ROOT)] + ([str(site)] if (ROOT / ".whl").is_dir() and not self.dry else [])
        env.update(
            PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])),
            FERCUDA_BENCH_ROWS=str(self.rows_file),
            MPLBACKEND="Agg",
            TORCHINDUCTOR_FX_GRAPH_CACHE="1",
            TORCHINDUCTOR_AUTOGRAD_CACHE="1",
        )
        if self.fer2013 is not None:
            env["FERCUDA_FER2013"] = str(self.fer2013)
        if self.dry:
            env["TRITON_INTERPRET"] = "1"
        return env

    def pytest(self, *args) -> list[str]:
        return [self.py, "-m", "pytest", "-p", "no:cacheprovider", *args]

    def plan(self) -> list[Stage]:
        py, dry, fast, caps, work = self.py, self.dry, self.fast, self.caps, self.work
        stages = []

        # environment: the record, after the carried wheels are installed (into a private folder).
        wheels = sorted((ROOT / ".whl").glob("*.whl"))
        install = ""
        if wheels and not dry:
            install = (f"{py} -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
                       f"--target {work / 'site'} .whl/*.whl && echo 'installed {len(wheels)} carried wheels' "
                       f"|| echo 'installing the carried wheels FAILED'; ")
        script = (install + "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem "
                  "--format=csv || echo 'no nvidia-smi'; "
                  f"exec {py} fercuda/compare/environment.py --json {work / 'environment.json'}")
        stages.append(Stage("environment", caps["environment"], lambda limit: ["bash", "-c", script],
                            judge=self.judge_environment))

        # build, with the data unpacking and the cache warm-up beside it.
        background = []
        archive = Path(os.environ.get("GPU_CHECK_FER2013_ARCHIVE", ROOT / ".fer2013" / "fer2013.tar.gz"))
        preset = os.environ.get("FERCUDA_FER2013")
        if preset and (Path(preset) / "train").is_dir():
            self.fer2013 = Path(preset)
        elif (ROOT / ".fer2013" / "train").is_dir():
            self.fer2013 = ROOT / ".fer2013"
        elif archive.is_file():
            self.fer2013 = work / "fer2013"
            background.append(Job("fer2013_data", [py, "benchmarks/pack_fer2013.py", "--unpack", str(archive),
                                                   "--to", str(self.fer2013)]))
        warm = [py, "benchmarks/gpu_warmup.py"] + (["--dry"] if dry else [])
        if fast:  # the part that loads before the build ends; each process that imports torch costs seconds here
            background.append(Job("warmup_triton", warm + ["canny"]))
        else:
            # dwconv and compile in shards on the GPU machine: 10 cases each, compiled in parallel once
            # nvcc is done with the cores
            dw, cmp = (1, 1) if dry else (4, 2)
            background.append(Job("warmup_canny", warm + ["canny"]))
            background += [Job(f"warmup_dwconv_{k}", warm + ["dwconv", "--shard", f"{k}/{dw}"]) for k in range(dw)]
            background += [Job(f"warmup_compile_{k}", warm + ["compile", "--shard", f"{k}/{cmp}"]) for k in range(cmp)]
            background.append(Job("warmup_tests", warm + ["tests"], awaited=False))
        for job in background:
            job.env["GPU_WARMUP_BUILD_DONE"] = str(self.build_done)
        if dry:
            check = ("import fercuda, fercuda._build_info as b; "
                     "print('dry run: the installed extension', fercuda._C.__file__, '| CUDA kernels:', b.WITH_CUDA, "
                     "'| arch list:', b.TORCH_CUDA_ARCH_LIST)")
            build = [py, "-c", check]
            build_env = {}
        else:
            build = [py, "setup.py", "build_ext", "--inplace"]
            build_env = {"FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"),
                         "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 8))}
        stages.append(Stage("build", caps["build"], lambda limit: build, env=build_env, background=background))

        # the GPU benchmarks (pytest-benchmark modules; -s shows each row as it is measured)
        for name in ("bench_canny_gpu", "bench_dwconv_gpu"):
            stage = Stage(name, caps[name], lambda limit, name=name: self.pytest(
                f"benchmarks/{name}.py", "-q", "-s", "-rfEs", f"--benchmark-json={work / (name + '.json')}"),
                judge=judge_pytest)
            if fast:
                stage.skip = "dry run: needs a CUDA device"
            stages.append(stage)

        widths = "0.125" if fast else "0.25"
        # Two configurations (fp32, and AMP + channels_last) keep the stage within its cap: each
        # torch.compile configuration would add a compile per case.
        bench_env = ({"FERCUDA_BENCH_DEVICE": "cpu", "FERCUDA_BENCH_WIDTHS": widths, "FERCUDA_BENCH_ROUNDS": "1",
                      "FERCUDA_BENCH_CONFIGS": "fp32"}
                     if dry else {"FERCUDA_BENCH_DEVICE": "cuda", "FERCUDA_BENCH_ROUNDS": "20",
                                  "FERCUDA_BENCH_CONFIGS": "fp32,fp16-cl"})
        bench_args = ["benchmarks/bench_fernet_train.py", "-q", "-s", "-rfEs",
                      *(["-k", "train_step"] if dry else []),
                      f"--benchmark-json={work / 'bench_fernet_train.json'}"]
        stages.append(Stage("bench_fernet_train", caps["bench_fernet_train"], lambda limit: self.pytest(*bench_args),
                            env=bench_env, judge=judge_pytest,
                            skip="fast dry run (GPU_CHECK_DRY_RUN=1 runs it on the CPU)" if fast else None))

        # a short real training run: its time limit is the stage's limit less loading and evaluation
        def train_command(limit):
            minutes = max(0.25, (limit - 40) / 60)
            common = [py, "-m", "fercuda.train", "--data", str(self.fer2013), "--format", "folder",
                      "--out", str(work / "fernet_run"), "--cache-dir", str(work / "cache"), "--no-progress",
                      "--time-limit", f"{minutes:.2f}"]
            if dry:
                return common + ["--device", "cpu", "--width-mult", widths, "--epochs", "1", "--limit", "64"]
            return common + ["--device", "cuda"]

        train = Stage("fernet_train_run", caps["fernet_train_run"], train_command, judge=self.judge_training)
        if self.fer2013 is None:
            train.skip = (f"no FER2013 here: neither {archive} (python benchmarks/pack_fer2013.py, carried as "
                          ".fer2013) nor FERCUDA_FER2013")
        stages.append(train)

        # the GPU test files, in parallel, each test under a timeout
        xdist = importlib.util.find_spec("xdist") is not None
        timeout = importlib.util.find_spec("pytest_timeout") is not None
        workers = max(1, min(8, os.cpu_count() or 1))
        files = ["tests/test_canny.py"] if fast else GPU_TEST_FILES
        # their CPU cases (parameters cpu, emulated) run in CI: not here
        selection = "triton and not cpu" if fast else GPU_TEST_SELECTION
        args = list(files) + ["-q", "-rfE", "-k", selection, f"--junitxml={self.out / 'tests.xml'}"]
        args += ["-n", str(2 if dry else workers)] if xdist and not fast else []
        args += ["--timeout", "60"] if timeout else []
        args += ["-m", "needs_cuda"] if dry else []  # here: each one skips, through the same plumbing
        tests = Stage("tests", caps["tests"], lambda limit: self.pytest(*args), judge=self.judge_tests)
        tests.note = "" if xdist and timeout else (
            "without " + " and ".join(n for n, ok in (("pytest-xdist", xdist), ("pytest-timeout", timeout)) if not ok))
        stages.append(tests)

        # compute-sanitizer on the small subset; PyTorch's caching allocator hides out-of-bounds
        # accesses inside its blocks and reused memory looks initialized, hence no caching there.
        sanitizer = os.environ.get("GPU_CHECK_SANITIZER") or shutil.which("compute-sanitizer") or next(
            (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.access(p, os.X_OK)), None)
        for tool in ("memcheck", "racecheck", "initcheck"):
            # memcheck and racecheck instrument fercuda's kernels alone (faster; nothing of theirs
            # depends on other kernels); initcheck must see every kernel's writes, so all of them.
            only_ours = ["--kernel-name", "kns=fercuda"] if tool != "initcheck" else []
            command = ([sanitizer, "--tool", tool, "--error-exitcode", "99", *only_ours] if sanitizer else []) + \
                self.pytest(*SANITIZER_FILES, "-q", "-rfE", "-k", SANITIZER_SUBSET[tool],
                            *(["-m", "needs_cuda"] if dry else []))
            stage = Stage(tool, caps[tool], lambda limit, command=command: command, judge=judge_sanitizer,
                          env={} if tool == "racecheck" else {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})
            if sanitizer is None:
                stage.skip = "compute-sanitizer not found (set GPU_CHECK_SANITIZER)"
            stages.append(stage)

        if [s.name for s in stages] != list(CAPS):
            raise RuntimeError(f"gpu_check: the stages {[s.name for s in stages]} and CAPS {list(CAPS)} differ")
        return stages

    # ------------------------------------------------------------------ judging what a stage did
    def judge_environment(self, stage, rc, text):
        env_file = self.work / "environment.json"
        if env_file.is_file():
            self.environment = json.loads(env_file.read_text())
        env = self.environment
        wheels = re.search(r"installed \d+ carried wheels|installing the carried wheels FAILED", text)
        note = (f"{env.get('gpu') or 'no GPU'}, torch {env.get('torch')}, triton {env.get('triton')}, "
                f"kornia {env.get('kornia')}" if env else last_line(text))
        return ("ok" if rc == 0 and env else "FAILED"), note + (f"; {wheels.group(0)}" if wheels else "")

    def judge_tests(self, stage, rc, text):
        status, note = judge_pytest(stage, rc, text)
        counts = junit_counts(self.out / "tests.xml")
        if counts:
            note = counts
        return status, note + (f"; {stage.note}" if stage.note else "")

    def judge_training(self, stage, rc, text):
        status = "ok" if rc == 0 else "FAILED"
        figures = training_figures(self.work / "fernet_run", text)
        if figures:
            self.add_row({"bench": "fernet_train_run", "case": "official split", "table": figures.pop("table"),
                          **figures})
        return status, self.rows[-1]["table"] if figures else f"rc {rc}"

    # ------------------------------------------------------------------ running
    def elapsed(self) -> float:
        return now() - self.start

    def run(self) -> int:
        # a scratch folder used before (GPU_CHECK_WORK) keeps its unpacked data, not its results
        for stale in [self.logs, self.work / "fernet_run"]:
            shutil.rmtree(stale, ignore_errors=True)
        for stale in [self.rows_file, self.build_done, self.work / "environment.json",
                      *self.work.glob("bench_*.json")]:
            stale.unlink(missing_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        for name in OUT_FILES:
            (self.out / name).unlink(missing_ok=True)
        self.stages = self.plan()
        print(f"gpu_check: {self.mode}, budget {self.budget} s (stage caps {sum(self.caps.values())} s), "
              f"results in {self.out}, scratch {self.work}", flush=True)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self.on_signal)
        try:
            for i, stage in enumerate(self.stages):
                self.current = stage
                self.run_stage(stage, later=sum(s.cap for s in self.stages[i + 1:]))
                if stage.name == "build":
                    self.forget_unfinished_data(stage)
                self.refresh(force=True)
        except Interrupted:
            for stage in self.stages:
                if stage.status == "PENDING":
                    stage.status, stage.note = "SKIPPED", "the check was interrupted"
        finally:
            self.current = None
            self.finished = True
            self.refresh(force=True)
        print("\n" + self.summary_text(), flush=True)
        return 1 if any(s.status in ("FAILED", "TIMEOUT", "INTERRUPTED") for s in self.stages) else 0

    def forget_unfinished_data(self, build: Stage):
        """A FER2013 archive not (wholly) unpacked is not read: no stage trains or times on a part of it."""
        job = next((j for j in build.background if j.name == "fer2013_data"), None)
        if job is not None and job_status(job) != "ok":
            self.fer2013 = None
            train = next(s for s in self.stages if s.name == "fernet_train_run")
            train.skip = f"the FER2013 archive was not unpacked ({job_status(job)}, see fer2013_data.log)"

    def on_signal(self, signum, frame):
        stage = self.current
        if stage is not None and stage.job is not None:
            stop(stage.job, *stage.background)
            stage.status, stage.note = "INTERRUPTED", f"signal {signum} after {now() - stage.started:.0f} s"
            stage.seconds = now() - stage.started
        raise Interrupted()

    def run_stage(self, stage: Stage, later: int):
        stage.started = self.elapsed()
        if stage.skip:
            stage.status, stage.note, stage.seconds = "SKIPPED", stage.skip, 0.0
            print(f"--- {stage.name}: SKIPPED ({stage.skip})", flush=True)
            return
        stage.limit = self.budget - self.elapsed() - later - GRACE_S
        if stage.limit < 3:
            stage.status, stage.note, stage.seconds = "SKIPPED", "the time budget is spent", 0.0
            print(f"--- {stage.name}: SKIPPED (the time budget is spent)", flush=True)
            return
        print(f"=== {stage.name} (cap {stage.cap} s, limit {stage.limit:.0f} s)", flush=True)
        env = {**self.base_env(), **stage.env}
        deadline = now() + stage.limit
        for job in stage.background:
            start(job, self.logs, env)
        stage.job = Job(stage.name, stage.command(stage.limit))
        start(stage.job, self.logs, env)
        stage.status = "RUNNING"
        main = stage.job
        while True:
            self.poll_background(stage)
            if main.rc is None and main.proc.poll() is not None:
                finish(main)
                if stage.name == "build":
                    write_atomic(self.build_done, f"{main.rc}\n")
            awaited = [j for j in stage.background if j.awaited and j.rc is None and not j.stopped]
            if main.rc is not None and not awaited:
                break
            if now() >= deadline:
                late = [job for job in [main] + awaited if job.rc is None]
                for job in late:
                    job.timed_out = True
                stop(*late, *stage.background)
                break
            self.refresh()
            time.sleep(0.2)
        stop(*stage.background)
        stage.seconds = self.elapsed() - stage.started
        text = main.log.read_text(errors="replace")
        if main.timed_out:
            _, note = stage.judge(stage, main.rc, text) if stage.judge else ("", "")
            stage.status = "TIMEOUT"
            stage.note = f"stopped at its limit of {stage.limit:.0f} s" + (f"; {note}" if note else "")
        elif stage.judge is not None:
            stage.status, stage.note = stage.judge(stage, main.rc, text)
        else:
            stage.status = "ok" if main.rc == 0 else "FAILED"
            stage.note = last_line(text) if main.rc == 0 else f"rc {main.rc}: {last_line(text)}"
        print(f"--- {stage.name}: {stage.status} ({stage.seconds:.0f} s) {stage.note}", flush=True)
        for job in stage.background:
            print(f"    {job.name}: {job_status(job)} ({job_seconds(job):.0f} s) {job_note(job)}", flush=True)

    def poll_background(self, stage):
        for job in stage.background:
            if job.rc is None and job.proc is not None and job.proc.poll() is not None:
                finish(job)
        # the tests' warm-up is best effort: it ends when the build and the awaited jobs have
        if stage.job is not None and stage.job.rc is not None and all(
                j.rc is not None for j in stage.background if j.awaited):
            stop(*[job for job in stage.background if not job.awaited])

    # ------------------------------------------------------------------ results
    def add_row(self, row):
        self.rows.append(row)
        print(f"  [{row['bench']}] {row['table']}", flush=True)

    def collect_rows(self):
        if not self.rows_file.is_file():
            return
        with open(self.rows_file) as f:
            lines = f.read().splitlines()
        for line in lines[self.rows_read:]:
            try:
                self.add_row(json.loads(line))
            except json.JSONDecodeError:  # a line being written: read it next time
                break
            self.rows_read += 1

    def refresh(self, force=False):
        if not force and now() - self.last_refresh < REFRESH_S:
            return
        self.last_refresh = now()
        self.collect_rows()
        write_atomic(self.out / "summary.txt", self.summary_text() + "\n")
        write_atomic(self.out / "benchmarks.json", json.dumps(self.record(), indent=1, default=str) + "\n")
        self.write_archive()

    def record(self) -> dict:
        stages = []
        for s in self.stages:
            stages.append({"name": s.name, "cap_s": s.cap, "limit_s": round(s.limit, 1) if s.limit else None,
                           "started_s": round(s.started, 1) if s.started is not None else None,
                           "seconds": round(s.seconds, 1) if s.seconds is not None else None,
                           "status": s.status, "note": s.note,
                           "background": [{"name": j.name, "status": job_status(j), "seconds": round(job_seconds(j), 1),
                                           "note": job_note(j)} for j in s.background if j.proc is not None]})
        return {"mode": self.mode, "started": self.started_at, "complete": self.finished,
                "elapsed_s": round(self.elapsed(), 1), "budget_s": self.budget,
                "caps_total_s": sum(s.cap for s in self.stages), "environment": self.environment,
                "stages": stages, "rows": self.rows, "pytest_benchmark": self.pytest_benchmark()}

    def pytest_benchmark(self) -> dict:
        """Median host times from pytest-benchmark's JSON, where a session ended and wrote one."""
        result = {}
        for path in sorted(self.work.glob("bench_*.json")):
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            result[path.stem] = {b["name"]: b["stats"]["median"] for b in data.get("benchmarks", [])}
        return result

    def summary_text(self) -> str:
        env = self.environment
        state = "finished" if self.finished else f"in progress ({self.current.name if self.current else '...'})"
        lines = [f"fercuda gpu_check: {self.mode} started {self.started_at}, {state} after {self.elapsed():.0f} s "
                 f"of a {self.budget} s budget"]
        if env:
            gpu = env.get("gpu") or "no GPU"
            if env.get("gpu_memory_GiB"):
                gpu += f" ({env['gpu_memory_GiB']} GiB, {env.get('gpu_sm_count')} SMs, sm_{env.get('gpu_capability', '').replace('.', '')})"
            lines.append(f"{gpu}; python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('cuda')}), "
                         f"triton {env.get('triton')}, cv2 {env.get('cv2')}, kornia {env.get('kornia')}, "
                         f"pytest-xdist {env.get('xdist')}, pytest-timeout {env.get('pytest_timeout')}")
            lines.append(f"{env.get('cpu')} ({env.get('cpu_count')} cores; {' '.join(env.get('cpu_flags') or [])}), "
                         f"{env.get('threads')} threads, load average {env.get('load_average')}")
        lines += ["", f"{'stage':<22}{'cap s':>6}{'limit s':>9}{'used s':>8}  status"]
        for s in self.stages:
            limit = f"{s.limit:.0f}" if s.limit else "-"
            used = f"{s.seconds:.0f}" if s.seconds is not None else "-"
            lines.append(f"{s.name:<22}{s.cap:>6}{limit:>9}{used:>8}  {s.status}" + (f"  {s.note}" if s.note else ""))
            for j in s.background:
                if j.proc is not None:
                    lines.append(f"  + {j.name:<18}{'':>6}{'':>9}{job_seconds(j):>8.0f}  {job_status(j)}"
                                 + (f"  {job_note(j)}" if job_note(j) else ""))
        lines.append(f"caps: {sum(s.cap for s in self.stages)} s in all, budget {self.budget} s")
        lines += ["", f"figures ({len(self.rows)} rows; benchmarks.json has every number):"]
        header = None
        for row in self.rows:
            if row.get("header") and row["header"] != header:
                header = row["header"]
                lines.append("  " + header)
            lines.append(f"  [{row['bench']}] {row['table']}")
        if not self.rows:
            lines.append("  (none yet)")
        lines += ["", "files: " + " ".join(n for n in OUT_FILES if (self.out / n).exists() or n == "summary.txt")]
        return "\n".join(lines)

    def write_archive(self):
        tmp = self.out / "logs.tar.gz.tmp"
        with tarfile.open(tmp, "w:gz", compresslevel=6) as tar:
            for path in sorted(self.work.rglob("*")):
                rel = path.relative_to(self.work)
                if rel.parts[0] in ("site", "fer2013", "cache") or not path.is_file():
                    continue
                if path.suffix == ".pt" or path.stat().st_size > ARCHIVE_SKIP_BYTES:
                    continue
                try:
                    tar.add(path, arcname=str(Path("gpu_check") / rel))
                except OSError:  # a file replaced while being read: next time
                    pass
        os.replace(tmp, self.out / "logs.tar.gz")


# ---------------------------------------------------------------------- processes
def start(job: Job, logs: Path, env: dict):
    job.log = logs / f"{job.name}.log"
    with open(job.log, "w") as log:
        log.write(f"$ {' '.join(job.command)}\n")
        log.flush()
        # its own process group (not session): a stop reaches its children (xdist workers,
        # compile workers), and the device machine still ends them all with this command.
        job.proc = subprocess.Popen(job.command, cwd=ROOT, env={**env, **job.env}, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, process_group=0)
    job.started = now()


def finish(job: Job):
    job.rc = job.proc.wait()
    job.ended = now()
    kill_group(job, signal.SIGKILL)  # leftovers of the group (workers a crash left behind)


def stop(*jobs: Job):
    """SIGINT first (pytest then writes its JUnit XML and summary), SIGKILL to the whole process
    group GRACE_S later: all the jobs at once, so stopping several costs GRACE_S once."""
    running = [j for j in jobs if j.proc is not None and j.rc is None]
    for job in running:
        job.stopped = True
        try:
            job.proc.send_signal(signal.SIGINT)
        except ProcessLookupError:
            pass
    deadline = now() + GRACE_S
    while any(j.proc.poll() is None for j in running) and now() < deadline:
        time.sleep(0.1)
    for job in running:
        kill_group(job, signal.SIGKILL)
        job.rc = job.proc.wait()
        job.ended = now()


def kill_group(job: Job, sig):
    try:
        os.killpg(job.proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def job_seconds(job: Job) -> float:
    return ((job.ended or now()) - job.started) if job.proc is not None else 0.0


def job_status(job: Job) -> str:
    if job.rc is None:
        return "RUNNING"
    if job.timed_out:
        return "TIMEOUT"
    if job.stopped and not job.awaited:
        return "STOPPED"
    return "ok" if job.rc == 0 else f"FAILED rc {job.rc}"


def job_note(job: Job) -> str:
    if job.stopped and not job.awaited and not job.timed_out:
        return "best effort: stopped when the build and the awaited jobs had ended"
    return last_line(job.log.read_text(errors="replace")) if job.log and job.log.is_file() else ""


# ---------------------------------------------------------------------- reading logs
def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed|warnings?)")


def pytest_counts(text: str) -> dict:
    """The counts of pytest's last summary line ("3 passed, 1 skipped in 2.0s")."""
    for line in reversed(text.splitlines()):
        found = PYTEST_COUNT.findall(line)
        if found and (" in " in line or "no tests ran" in line):
            return {kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in found}
    return {}


def judge_pytest(stage, rc, text):
    counts = pytest_counts(text)
    note = ", ".join(f"{n} {k}" for k, n in counts.items() if k not in ("warning", "warnings"))
    # a module that skips itself (no GPU) collects nothing: pytest's exit status 5
    if rc in (0, 5) and counts.get("skipped") and not counts.get("passed") and not counts.get("failed"):
        reason = re.search(r"SKIPPED \[\d+\] [^:]+:\d+: (.+)", text)
        return "SKIPPED", reason.group(1).strip() if reason else note
    if rc == 0:
        return "ok", note
    if rc == 5:
        return "FAILED", "no tests collected"
    return "FAILED", f"rc {rc}" + (f": {note}" if note else f": {last_line(text)}")


def junit_counts(path: Path) -> str:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return ""
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return ""
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return (f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped "
            f"in {float(suite.get('time', 0)):.0f} s (tests.xml)")


SANITIZER_FRAME = re.compile(r"^=+\s+at (?:0x[0-9a-f]+ in )?(.+?)(?:\+0x[0-9a-f]+)?(?: in \S+:\d+)?$", re.MULTILINE)


def judge_sanitizer(stage, rc, text):
    """ok; REFUSED where compute-sanitizer cannot run on this device (not fercuda's failure);
    FAILED where it reports an error in a fercuda kernel or a test fails; WARN where every
    report is in another library's kernel."""
    if SANITIZER_REFUSED.search(text):
        return "REFUSED", "compute-sanitizer refused this device: " + SANITIZER_REFUSED.search(text).group(0)
    errors = re.search(r"ERROR SUMMARY: (\d+) error", text)
    n_errors = int(errors.group(1)) if errors else 0
    counts = pytest_counts(text)
    tests = ", ".join(f"{n} {k}" for k, n in counts.items() if k not in ("warning", "warnings"))
    if rc == 0 or (rc != 99 and n_errors == 0 and not counts.get("failed")):
        status, note = judge_pytest(stage, rc, text)
        return status, f"0 errors; {note}" if status == "ok" else note
    kernels = sorted({m.group(1).strip()[:120] for m in SANITIZER_FRAME.finditer(text)})
    ours = [k for k in kernels if "fercuda" in k]
    if n_errors and not ours and kernels and not counts.get("failed"):
        return "WARN", f"{n_errors} reports, none in fercuda's kernels ({'; '.join(kernels[:3])}); {tests}"
    return "FAILED", f"{n_errors} errors" + (f" in {'; '.join(ours[:3])}" if ours else "") + f"; {tests}"


def training_figures(run_dir: Path, text: str) -> dict:
    """Epochs, throughput and accuracies of the training run, from its files and its log."""
    epochs = []
    for path in sorted(run_dir.rglob("metrics.json")):
        try:
            epochs = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            pass
    if not epochs:
        for line in text.splitlines():
            if line.startswith("{") and '"epoch"' in line:
                try:
                    epochs.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    final = re.search(r"final test accuracy: ([\d.]+)%", text)
    if not epochs and not final:
        return {}
    last = epochs[-1] if epochs else {}
    figures = {"epochs": len(epochs), "images_per_s": last.get("images_per_s"), "val_acc": last.get("val_acc"),
               "test_accuracy": float(final.group(1)) / 100 if final else None}
    parts = [f"{len(epochs)} epochs"]
    if last.get("images_per_s"):
        parts.append(f"{last['images_per_s']:.0f} images/s (last epoch)")
    if last.get("val_acc") is not None:
        parts.append(f"PublicTest {100 * last['val_acc']:.1f}% (last epoch)")
    if final:
        parts.append(f"PrivateTest {final.group(1)}% (best PublicTest checkpoint)")
    figures["table"] = "FERNet training run: " + ", ".join(parts)
    return figures


def write_atomic(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def print_plan(check: GpuCheck):
    """The stages this machine would run, their caps and commands; nothing is run."""
    for stage in check.plan():
        print(f"{stage.name} (cap {stage.cap} s)" + (f": SKIPPED, {stage.skip}" if stage.skip else ""))
        if stage.skip:
            continue
        env = " ".join(f"{k}={v}" for k, v in stage.env.items())
        print(f"    {env + ' ' if env else ''}{' '.join(stage.command(stage.cap - GRACE_S))}")
        for job in stage.background:
            print(f"    + {'' if job.awaited else '(best effort) '}{' '.join(job.command)}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--plan"]:
        print_plan(GpuCheck())
        sys.exit(0)
    sys.exit(GpuCheck().run())
