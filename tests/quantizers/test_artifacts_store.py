"""The artifact store with real files: round trip, integrity checks, LRU, keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quantizers.artifacts import (
    ArtifactStore,
    artifact_key,
    calibration_identity,
)


def make_tensors(seed: int, rows: int = 64) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "layers.0.q": torch.randint(-128, 127, (rows, 96), dtype=torch.int8, generator=generator),
        "layers.0.scale": torch.rand(rows, generator=generator),
        "embed.weight": torch.randn(32, 16, generator=generator).to(torch.bfloat16),
    }


def key_for(name: str) -> str:
    return artifact_key("b" * 64, name, {"bits": 8}, None, 1)


def payload_file(store: ArtifactStore, key: str) -> Path:
    return next((store.root / "objects" / key).glob("*.safetensors"))


CONTENT = {"method": "int8", "config": {"bits": 8}, "plan": {"layers.0": {"kind": "Int8"}},
           "quality": {"perplexity": 12.5}}


def test_round_trip_returns_identical_tensors_and_manifest(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    tensors = make_tensors(0)
    key = key_for("int8")
    written = store.put(key, tensors, CONTENT)

    reopened = ArtifactStore(tmp_path)
    artifact = reopened.get(key)
    assert artifact is not None
    loaded = artifact.load_tensors()
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)
    manifest = artifact.manifest
    assert manifest["plan"] == CONTENT["plan"]
    assert manifest["quality"] == {"perplexity": 12.5}
    assert manifest["key"] == key == written.key
    assert manifest["bytes"] == artifact.bytes == written.bytes
    assert {"torch", "safetensors", "python"} <= manifest["library_versions"].keys()
    on_disk = sum(p.stat().st_size for p in artifact.path.iterdir() if p.name != "manifest.json")
    assert on_disk == manifest["bytes"]
    assert (reopened.hits, reopened.misses, reopened.corrupt) == (1, 0, 0)


def test_sharded_artifact_round_trips(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, max_shard_bytes=4096)
    tensors = make_tensors(1)
    artifact = store.put(key_for("sharded"), tensors, CONTENT)
    assert len(artifact.manifest["files"]) == 3
    loaded = store.get(artifact.key).load_tensors()
    assert all(torch.equal(loaded[name], tensors[name]) for name in tensors)


def test_missing_key_is_a_miss(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    assert store.get(key_for("absent")) is None
    assert store.get("../../etc/passwd") is None
    assert (store.hits, store.misses) == (0, 1)


@pytest.mark.parametrize("offset", [0, 5000, -1])
def test_one_flipped_byte_is_detected_quarantined_and_counted(tmp_path: Path, offset: int) -> None:
    store = ArtifactStore(tmp_path)
    key = key_for("int8")
    store.put(key, make_tensors(0), CONTENT)
    path = payload_file(store, key)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))

    reopened = ArtifactStore(tmp_path)
    assert reopened.get(key) is None
    assert (reopened.corrupt, reopened.misses, reopened.hits) == (1, 1, 0)
    assert not (tmp_path / "objects" / key).exists()
    quarantined = list((tmp_path / "quarantine").iterdir())
    assert len(quarantined) == 1 and quarantined[0].name.startswith(key)
    assert reopened.get(key) is None
    assert reopened.corrupt == 1, "a quarantined artifact is gone, not corrupt again"

    rebuilt = reopened.put(key, make_tensors(0), CONTENT)
    assert rebuilt.key == key
    reloaded = reopened.get(key).load_tensors()["layers.0.q"]
    assert torch.equal(reloaded, make_tensors(0)["layers.0.q"])


def test_truncated_file_is_detected(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    key = key_for("int8")
    store.put(key, make_tensors(0), CONTENT)
    path = payload_file(store, key)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert store.get(key) is None
    assert store.corrupt == 1


@pytest.mark.parametrize("damage", ["delete_payload", "garbage_manifest", "edit_manifest"])
def test_damaged_manifest_or_missing_file_is_detected(tmp_path: Path, damage: str) -> None:
    store = ArtifactStore(tmp_path)
    key = key_for("int8")
    artifact = store.put(key, make_tensors(0), CONTENT)
    manifest_path = artifact.path / "manifest.json"
    if damage == "delete_payload":
        payload_file(store, key).unlink()
    elif damage == "garbage_manifest":
        manifest_path.write_bytes(b"{\"key\": ")
    else:
        manifest = json.loads(manifest_path.read_text())
        name = next(iter(manifest["files"]))
        manifest["files"][name]["sha256"] = "0" * 64
        manifest_path.write_text(json.dumps(manifest))
    assert store.get(key) is None
    assert store.corrupt == 1


def test_lru_eviction_removes_least_recently_used_first(tmp_path: Path) -> None:
    probe = ArtifactStore(tmp_path / "probe")
    size = probe.put(key_for("probe"), make_tensors(9), CONTENT).bytes
    manifest_size = (probe.root / "objects" / key_for("probe") / "manifest.json").stat().st_size
    per_artifact = size + manifest_size + 64

    store = ArtifactStore(tmp_path / "store", max_bytes=3 * per_artifact)
    a, b, c, d = (key_for(name) for name in "abcd")
    for index, key in enumerate((a, b, c)):
        store.put(key, make_tensors(index), CONTENT)
    assert store.get(a) is not None  # a is now more recent than b and c

    store.put(d, make_tensors(3), CONTENT)
    assert store.evictions == 1
    assert {info.key for info in store.list()} == {a, c, d}, "b was the least recently used"
    assert store.total_bytes() <= store.max_bytes

    store.put(key_for("e"), make_tensors(4), CONTENT, protected={c})
    assert {info.key for info in store.list()} == {c, d, key_for("e")}
    assert store.evictions == 2, "a went, c was protected"


def test_eviction_never_removes_the_artifact_being_written(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, max_bytes=1)
    key = key_for("big")
    store.put(key, make_tensors(0), CONTENT)
    assert [info.key for info in store.list()] == [key]
    other = key_for("other")
    store.put(other, make_tensors(1), CONTENT, protected={key})
    assert {info.key for info in store.list()} == {key, other}
    assert store.evictions == 0


def test_lowering_the_limit_evicts_on_open(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    for index, name in enumerate("xyz"):
        store.put(key_for(name), make_tensors(index), CONTENT)
    reopened = ArtifactStore(tmp_path, max_bytes=0)
    assert reopened.list() == []
    assert reopened.evictions == 3


def test_list_reports_manifest_fields_most_recent_first(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    first, second = key_for("first"), key_for("second")
    store.put(first, make_tensors(0), CONTENT)
    store.put(second, make_tensors(1), {**CONTENT, "method": "int4", "config": {"group": 128}})
    store.get(first)
    infos = store.list()
    assert [info.key for info in infos] == [first, second]
    assert infos[1].method == "int4" and infos[1].config == {"group": 128}
    assert infos[0].quality == {"perplexity": 12.5}
    assert infos[0].last_used >= infos[0].created > 0
    assert infos[0].bytes > store.get(first).bytes, "on-disk bytes include the manifest"
    assert store.info(second) == infos[1]
    assert store.info(key_for("absent")) is None and store.info("..") is None


def test_delete_removes_the_artifact(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    key = key_for("gone")
    store.put(key, make_tensors(0), CONTENT)
    assert store.delete(key) is True
    assert store.delete(key) is False
    assert store.delete("..") is False
    assert store.get(key) is None
    assert list((tmp_path / "tmp").iterdir()) == []


def test_put_refuses_reserved_manifest_fields_and_bad_keys(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    with pytest.raises(ValueError, match="files"):
        store.put(key_for("x"), make_tensors(0), {"files": {}})
    with pytest.raises(ValueError, match="not an artifact key"):
        store.put("../escape", make_tensors(0), CONTENT)
    with pytest.raises(TypeError):
        store.put(key_for("x"), make_tensors(0), {"plan": object()})
    assert store.list() == []
    assert list((tmp_path / "tmp").iterdir()) == []


def test_key_depends_on_every_input_and_not_on_dict_order(tmp_path: Path) -> None:
    base = artifact_key("a" * 64, "int4", {"group_size": 128, "bits": 4}, {"samples": 8}, 1)
    assert base == artifact_key("a" * 64, "int4", {"bits": 4, "group_size": 128}, {"samples": 8}, 1)
    variants = {
        artifact_key("c" * 64, "int4", {"group_size": 128, "bits": 4}, {"samples": 8}, 1),
        artifact_key("a" * 64, "int8", {"group_size": 128, "bits": 4}, {"samples": 8}, 1),
        artifact_key("a" * 64, "int4", {"group_size": 64, "bits": 4}, {"samples": 8}, 1),
        artifact_key("a" * 64, "int4", {"group_size": 128, "bits": 4}, {"samples": 16}, 1),
        artifact_key("a" * 64, "int4", {"group_size": 128, "bits": 4}, None, 1),
        artifact_key("a" * 64, "int4", {"group_size": 128, "bits": 4}, {"samples": 8}, 2),
    }
    assert base not in variants and len(variants) == 6
    with pytest.raises(ValueError, match="canonical JSON"):
        artifact_key("a" * 64, "int4", {"ratio": float("nan")}, None, 1)

    data = tmp_path / "calibration.txt"
    data.write_text("to be or not to be")
    before = calibration_identity({"dataset": "custom", "samples": 8}, data)
    data.write_text("to be or not to be!")
    after = calibration_identity({"dataset": "custom", "samples": 8}, data)
    assert before["samples"] == 8 and before["data_sha256"] != after["data_sha256"]


def test_extra_files_are_stored_verified_and_kept_apart_from_tensors(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    key = key_for("with-tokenizer")
    extra = {"tokenizer.json": b'{"model": "bpe"}', "chat_template.jinja": b"{{ messages }}"}
    store.put(key, make_tensors(0), CONTENT, extra_files=extra)
    artifact = ArtifactStore(tmp_path).get(key)
    assert artifact.has_file("tokenizer.json") and not artifact.has_file("missing.json")
    assert (artifact.path / "tokenizer.json").read_bytes() == extra["tokenizer.json"]
    assert artifact.load_tensors().keys() == make_tensors(0).keys()

    (artifact.path / "chat_template.jinja").write_bytes(b"{{ evil }}")
    reopened = ArtifactStore(tmp_path)
    assert reopened.get(key) is None and reopened.corrupt == 1


@pytest.mark.parametrize("name", ["manifest.json", "tensors-00009.safetensors", "../x",
                                  "sub/file", "", ".hidden"])
def test_extra_file_names_cannot_clash_or_escape(tmp_path: Path, name: str) -> None:
    store = ArtifactStore(tmp_path)
    with pytest.raises(ValueError, match="extra file name"):
        store.put(key_for("x"), make_tensors(0), CONTENT, extra_files={name: b"x"})
    assert store.list() == [] and list((tmp_path / "tmp").iterdir()) == []
