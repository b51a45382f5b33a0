"""The job manager in process: real tiny model on disk, real engine, real store.

No HTTP here (tests/server/test_admin_api.py covers it); these check the job
life cycle itself: queueing, progress, cancellation, failure keeping the served
model, start-up from the cache without quantising.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from quantizers.artifacts import ArtifactStore
from quantizers.artifacts.keys import file_sha256
from quantizers.calibration import CalibrationConfig
from quantizers.loading import load_model
from server import quantization_jobs
from server.engine import Engine, Finish, GenerationRequest, SamplingParams
from server.engine.device import InsufficientDeviceMemory
from server.quantization_jobs import Job, JobAlreadyFinished, JobManager, JobState
from server.variant_pipeline import BaseModelRef
from tests.helpers.tiny_model_dir import write_tiny_model

QUALITY_TOKENS = 64
LINEARS = 2 * 7 + 1  # two decoder layers of q, k, v, o, gate, up, down, and the tied lm_head


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def engine(model_dir: Path) -> Iterator[Engine]:
    engine = Engine(load_model(model_dir), max_num_seqs=4, max_model_len=256, max_queue=8,
                    num_threads=1)
    engine.start()
    yield engine
    engine.shutdown(drain_timeout_s=5)


def make_manager(model_dir: Path, cache: Path, engine: Engine | None) -> JobManager:
    return JobManager(ArtifactStore(cache), base=lambda: BaseModelRef.resolve(str(model_dir),
                      "tiny", "cpu"), engine=lambda: engine, serve_dtype="float32",
                      quality_tokens=QUALITY_TOKENS)


@pytest.fixture
def jobs(model_dir: Path, tmp_path: Path, engine: Engine) -> Iterator[JobManager]:
    manager = make_manager(model_dir, tmp_path / "cache", engine)
    yield manager
    manager.shutdown()


def wait_finished(job: Job, timeout: float = 60.0) -> Job:
    deadline = time.monotonic() + timeout
    while not job.state.finished:
        assert time.monotonic() < deadline, f"job still {job.state} in phase {job.phase}"
        time.sleep(0.01)
    return job


def generate_variant(engine: Engine) -> str:
    async def run() -> str:
        request = GenerationRequest("probe", [1, 2, 3], SamplingParams(max_tokens=2,
                                                                       temperature=0))
        events = [event async for event in engine.generate(request)]
        finish = events[-1]
        assert isinstance(finish, Finish) and finish.error is None
        return finish.variant

    return asyncio.run(run())


def test_progress_never_goes_back_within_a_job(jobs: JobManager) -> None:
    job = Job(id="progress", spec=jobs.resolve("int8", {}, None))
    for done in (1, 5, 10):  # a method's measuring stage, layer by layer
        job.progress(done, 10)
    job.progress(1, 10)  # its final swaps count from 1 again
    assert (job.layers_done, job.layers_total, job.percent) == (10, 10, 100.0)


def test_job_quantises_stores_and_swaps(jobs: JobManager, engine: Engine) -> None:
    assert generate_variant(engine) == "float"
    job = wait_finished(jobs.submit(jobs.resolve("int8", {}, None)))
    assert job.state == JobState.SUCCEEDED, job.error
    assert (job.layers_done, job.layers_total, job.percent) == (LINEARS, LINEARS, 100.0)
    assert {"queued_s", "load_base_s", "quantize_s", "evaluate_s", "store_s", "swap_s",
            "total_s"} <= job.timings.keys()
    assert job.quality is not None and 0.0 <= job.quality["top1"] <= 1.0
    assert job.quality["weight_bytes"] < job.quality["base_weight_bytes"]
    assert engine.loaded.variant == "int8"
    assert engine.loaded.metadata["artifact"] == job.artifact == jobs.active_key
    assert generate_variant(engine) == "int8"
    stored = jobs.store.get(job.artifact)
    assert stored is not None and stored.manifest["quality"] == job.quality
    assert stored.manifest["config"] == job.spec.config


def test_jobs_run_one_at_a_time_in_order(jobs: JobManager, engine: Engine) -> None:
    first = jobs.submit(jobs.resolve("int8", {}, None))
    second = jobs.submit(jobs.resolve("int4", {"group_size": 32}, None))
    assert jobs.submit(jobs.resolve("int4", {"group_size": 32}, None)) is second
    assert second.state == JobState.QUEUED
    wait_finished(second)
    assert first.state == second.state == JobState.SUCCEEDED
    assert first.finished_at <= second.started_at
    assert engine.loaded.quantization == {"method": "int4", "group_size": 32, "pad": True}
    assert [job.id for job in jobs.list()] == [second.id, first.id]


def test_cancel_queued_and_running_jobs_keeps_the_served_model(
    jobs: JobManager, engine: Engine
) -> None:
    running = jobs.submit(jobs.resolve("int8", {}, None))
    queued = jobs.submit(jobs.resolve("int4", {"group_size": 64}, None))
    assert jobs.cancel(queued.id).state == JobState.CANCELLED
    deadline = time.monotonic() + 30
    while running.state == JobState.QUEUED:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    jobs.cancel(running.id)
    wait_finished(running)
    assert running.state == JobState.CANCELLED, (running.phase, running.error)
    with pytest.raises(JobAlreadyFinished):
        jobs.cancel(running.id)
    assert jobs.cancel("qjob-unknown") is None
    assert engine.loaded.variant == "float"
    assert generate_variant(engine) == "float"
    assert queued.started_at is None, "a cancelled queued job never runs"
    assert jobs.submit(queued.spec) is not queued, "a new request is not tied to a cancelled job"


def test_failing_job_reports_why_and_keeps_serving(
    model_dir: Path, tmp_path: Path, engine: Engine
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    jobs = make_manager(broken, tmp_path / "cache", engine)
    spec = jobs.resolve("int8", {}, None)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    try:
        job = wait_finished(jobs.submit(spec))
    finally:
        jobs.shutdown()
    assert job.state == JobState.FAILED
    assert job.error["type"] == "internal_error"
    assert str(broken) in job.error["message"]
    assert engine.loaded.variant == "float"
    assert generate_variant(engine) == "float"
    assert jobs.store.list() == [], "nothing half-built is stored"


def test_startup_builds_once_then_loads_from_the_cache(model_dir: Path, tmp_path: Path) -> None:
    cold = make_manager(model_dir, tmp_path / "cache", engine=None)
    loaded = cold.startup_variant("int4", {"group_size": 32}, None)
    cold_job = cold.list()[0]
    assert (cold_job.origin, cold_job.cache_hit, cold_job.state) == ("startup", False,
                                                                    JobState.SUCCEEDED)
    assert "quantize_s" in cold_job.timings

    warm = make_manager(model_dir, tmp_path / "cache", engine=None)
    reloaded = warm.startup_variant("int4", {"group_size": 32}, None)
    warm_job = warm.list()[0]
    assert warm_job.cache_hit and warm_job.artifact == cold_job.artifact
    assert "quantize_s" not in warm_job.timings and "load_artifact_s" in warm_job.timings
    assert (warm.store.hits, warm.store.misses) == (1, 0)
    assert reloaded.quantization == loaded.quantization
    assert reloaded.metadata["quality"] == loaded.metadata["quality"]
    assert warm.store.get(warm_job.artifact).has_file("tokenizer.json"), "tokenizer cached too"
    text = "héllo wörld 👋"
    assert reloaded.tokenizer(text)["input_ids"] == loaded.tokenizer(text)["input_ids"]
    messages = [{"role": "user", "content": text}]
    assert reloaded.tokenizer.apply_chat_template(messages, tokenize=False) == (
        loaded.tokenizer.apply_chat_template(messages, tokenize=False))
    assert reloaded.tokenizer.eos_token_id == loaded.tokenizer.eos_token_id
    assert reloaded.metadata["artifact"] == cold_job.artifact
    assert warm.active_key is None, "nothing is served until an engine serves it"


def test_activate_artifact_and_back_to_base(jobs: JobManager, engine: Engine) -> None:
    job = wait_finished(jobs.submit(jobs.resolve("int8", {}, None)))
    jobs.activate_base()
    assert engine.loaded.variant == "float" and jobs.active_key is None
    assert generate_variant(engine) == "float"
    jobs.activate_artifact(jobs.store.get(job.artifact))
    assert engine.loaded.variant == "int8" and jobs.active_key == job.artifact
    assert job.artifact in jobs.protected_keys()


def test_calibrated_method_keys_on_the_calibration_text(
    jobs: JobManager, engine: Engine, tmp_path: Path
) -> None:
    calibration = CalibrationConfig(dataset="alice", samples=4, seq_len=64)
    without = jobs.resolve("gptq", {"group_size": 32}, None)
    spec = jobs.resolve("gptq", {"group_size": 32}, calibration)
    # no calibration object: the documented default, keyed as if it had been given
    assert without.calibration == CalibrationConfig()
    assert without.key == jobs.resolve("gptq", {"group_size": 32}, CalibrationConfig()).key
    assert spec.key != without.key
    assert jobs.resolve("int8", {}, None).calibration is None

    job = wait_finished(jobs.submit(spec))
    assert job.state == JobState.SUCCEEDED, job.error
    inputs = jobs.store.get(job.artifact).manifest["inputs"]
    assert inputs["calibration"]["dataset"] == "alice"
    assert inputs["calibration"]["data_sha256"] == file_sha256(calibration.path())

    edited = tmp_path / "alice-edited.txt"
    edited.write_text(calibration.path().read_text() + " One more line.")
    other = jobs.resolve("gptq", {"group_size": 32}, CalibrationConfig(
        dataset=str(edited), samples=4, seq_len=64))
    assert other.key != spec.key


def test_job_without_device_memory_fails_with_the_reason_and_keeps_serving(
    jobs: JobManager, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def short(device: object, needed: int, what: str) -> None:
        raise InsufficientDeviceMemory(f"{what} needs about {needed} bytes, 0 are free")

    monkeypatch.setattr(quantization_jobs, "ensure_free", short)
    job = wait_finished(jobs.submit(jobs.resolve("int8", {}, None)))
    assert job.state == JobState.FAILED
    assert job.error["type"] == "insufficient_device_memory"
    assert "quantising with int8 needs about" in job.error["message"]
    assert generate_variant(engine) == "float"
    assert jobs.store.list() == []
