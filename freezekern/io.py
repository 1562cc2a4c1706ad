"""Small file helpers: writes that never leave a half-written file behind."""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see ``atomic_write_bytes``)."""
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path, data, **kwargs) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, **kwargs))


def save_png(fig, path) -> None:
    """Write a matplotlib figure to ``path`` atomically and close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=110)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


class JsonRecord:
    """Mixin for plain dataclasses that round-trip through JSON (and files)."""

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping):
        return cls(**dict(data))

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))

    def save(self, path) -> None:
        """Write the record as indented JSON, atomically."""
        atomic_write_text(path, self.to_json(indent=2))

    @classmethod
    def load(cls, path):
        with open(path) as f:
            return cls.from_json(f.read())
