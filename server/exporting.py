"""Exports for download: written to a private temporary folder, streamed, then deleted.

The export of a cached artifact is built on request (seconds for SmolLM2) rather
than cached beside it, so the cache never holds a second copy of every variant.
A compressed-tensors export is a directory; it is sent as one uncompressed tar
(safetensors barely compress).
"""

from __future__ import annotations

import shutil
import tarfile
import tempfile
from pathlib import Path

from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from quantizers import QuantizationError
from quantizers.artifacts import Artifact
from quantizers.export import export_artifact, export_file_name


class ExportFailed(Exception):
    """The artifact cannot be expressed in the requested format."""


def export_download(artifact: Artifact, fmt: str) -> FileResponse:
    """A response streaming the export of `artifact`; its files go when it is sent."""
    directory = Path(tempfile.mkdtemp(prefix="quantserve-export-"))
    cleanup = BackgroundTask(shutil.rmtree, directory, ignore_errors=True)
    name = export_file_name(artifact, fmt)
    try:
        output = directory / name
        export_artifact(artifact, fmt, output)
        if fmt != "gguf":
            archive = directory / f"{name}.tar"
            with tarfile.open(archive, "w") as tar:
                tar.add(output, arcname=name)
            shutil.rmtree(output)
            output, name = archive, archive.name
    except QuantizationError as exc:
        shutil.rmtree(directory, ignore_errors=True)
        raise ExportFailed(exc.message) from exc
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    media = "application/octet-stream" if fmt == "gguf" else "application/x-tar"
    return FileResponse(output, media_type=media, filename=name, background=cleanup)
