"""Content-addressed on-disk cache of quantised models (tensors + JSON manifest).

Quantising a model takes seconds to minutes; loading a verified artifact takes
about as long as reading its bytes. The server keys artifacts by everything
that shapes them (`artifact_key`), so a restart finds the artifact an earlier
run built, and the store guarantees that what it hands out is complete and
bit-exact (`ArtifactStore.get`).
"""

from quantizers.artifacts.artifact import Artifact, ArtifactInfo
from quantizers.artifacts.errors import ArtifactWriteError
from quantizers.artifacts.keys import artifact_key, calibration_identity, canonical_json, key_inputs
from quantizers.artifacts.manifest import ManifestError
from quantizers.artifacts.store import ArtifactStore

__all__ = [
    "Artifact",
    "ArtifactInfo",
    "ArtifactStore",
    "ArtifactWriteError",
    "ManifestError",
    "artifact_key",
    "calibration_identity",
    "canonical_json",
    "key_inputs",
]
