"""The edit ledger: every applied rank-one edit, enough to rebuild or revert the model exactly.

``DIR/ledger.json`` lists the entries in order (request, layer, module, norms, probabilities, timings,
model and statistics identities, status, the sha256 of the entry's file, and the request list and position
it came from); ``DIR/edits/<id>.safetensors`` holds u = C⁻¹k* and Λ in float64. A model is rebuilt from its
base weights by applying the entries still ``applied``, in order, with the same ``apply_rank_one`` the edit
used -- so a revert is bitwise exact, never a floating-point subtraction. Every file is checked against its
checksum before anything is applied: a damaged ledger changes no weight.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes

from rome.pipeline.config import plain
from rome.pipeline.core.arch import ArchSpec
from rome.pipeline.core.atomic import write_json, write_tensors
from rome.pipeline.core.hooks import get_module
from rome.pipeline.core.locks import LOCK_FILE
from rome.pipeline.core.paths import contained
from rome.pipeline.editors.rank_one import LowRank, RankOne, apply_low_rank, apply_rank_one
from rome.pipeline.errors import UserError

__all__ = ["Ledger"]


class Ledger:
    def __init__(self, directory: str | Path, data: dict[str, Any]) -> None:
        self.dir, self.data = Path(directory), data

    @classmethod
    def open(
        cls,
        directory: str | Path,
        model: dict[str, str] | None = None,
        model_dtype: str | None = None,
        create: bool = True,
    ) -> Ledger:
        directory = Path(directory)
        path = directory / "ledger.json"
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise UserError(f"ledger {path} is not valid JSON; restore it or use another directory") from err
            if not isinstance(data, dict) or not isinstance(data.get("entries"), list) or "model" not in data:
                raise UserError(f"{path} is not a ledger of this project (no model and entries); use another directory")
            _authenticate(path, data)
            if model is not None and data["model"] != model:
                raise UserError(
                    f"ledger {directory} belongs to model {data['model']['name']} "
                    f"({data['model']['revision']}); use another edit.out for this model"
                )
            return cls(directory, data)
        if not create:
            raise UserError(f"no ledger at {path}; pass the edit.out directory of an earlier edit as ledger=")
        if directory.is_dir() and any(p.name != LOCK_FILE for p in directory.iterdir()):
            raise UserError(
                f"edit.out={directory} holds files but no ledger.json; name a new directory or the "
                "edit.out of earlier edits"
            )
        return cls(directory, {"model": model, "model_dtype": model_dtype, "entries": [], "saved_to": None})

    @property
    def entries(self) -> list[dict[str, Any]]:
        return self.data["entries"]

    def active(self) -> list[dict[str, Any]]:
        return [e for e in self.entries if e["status"] == "applied"]

    def next_id(self) -> int:
        return 1 + max((e["id"] for e in self.entries), default=0)

    def append(self, entry: dict[str, Any], edit: RankOne) -> int:
        """Record a ROME edit under the next id; returns the id."""
        return self._append(entry, {"u": edit.u, "lam": edit.lam}, {"denominator": repr(edit.denominator)})

    def done_in_run(self, run: str) -> set[int]:
        """Positions of the request list ``run`` (its digest) already recorded here: what a resumed run skips."""
        return {e["run"]["index"] for e in self.entries if (e.get("run") or {}).get("requests") == run}

    def discard_since(self, count: int) -> list[int]:
        """Forget the entries after the first ``count`` (a run whose model could not be saved): the ledger
        first, then their files."""
        dropped = self.entries[count:]
        del self.entries[count:]
        self.save()
        for e in dropped:
            contained(self.dir, e.get("file"), self.dir / "ledger.json").unlink(missing_ok=True)
        return [e["id"] for e in dropped]

    def save(self) -> None:
        """``ledger.json``, with the checksum of its content (``_authenticate`` checks it on every read)."""
        self.data.pop("checksum", None)
        self.data["checksum"] = content_checksum(self.data)
        write_json(self.dir / "ledger.json", self.data)

    def tensors(self, entry: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The entry's file, checked against the sha256 recorded with it (one read)."""
        path = contained(self.dir, entry.get("file"), self.dir / "ledger.json")
        try:
            data = path.read_bytes()
        except OSError as err:
            raise UserError(
                f"ledger file {path} of edit {entry['id']} cannot be read ({err.strerror}); "
                "restore it from a copy of the ledger"
            ) from None
        want = entry.get("sha256")
        if not isinstance(want, str):
            raise UserError(
                f"edit {entry.get('id')} in {self.dir / 'ledger.json'} records no checksum of its file {path}; "
                "its factors cannot be trusted: restore the ledger from a copy"
            )
        if hashlib.sha256(data).hexdigest() != want:
            raise UserError(
                f"ledger file {path} of edit {entry['id']} fails its checksum (damaged or changed: "
                f"{len(data)} bytes); nothing was changed; restore it from a copy of the ledger"
            )
        try:
            return load_bytes(data)
        except (SafetensorError, ValueError) as err:
            raise UserError(
                f"ledger file {path} of edit {entry['id']} is not a readable safetensors file ({err}); "
                "restore it from a copy of the ledger"
            ) from None

    def rank_one(self, entry: dict[str, Any]) -> RankOne:
        t = self.tensors(entry)
        return RankOne(u=t["u"], lam=t["lam"], denominator=float(entry["denominator"]))

    def append_batch(
        self,
        ctx: Any,
        result: Any,
        model_identity: dict[str, str],
        stats: dict | None,
        run: dict[str, Any] | None = None,
        verification: dict[str, Any] | None = None,
    ) -> int:
        """Record a MEMIT / AlphaEdit batch: its requests and, per layer, ΔW = L Rᵀ as the factors L, R
        (float64), plus for AlphaEdit (and MEMIT with preserve_edits) the batch's keys K, whose K Kᵀ later
        batches preserve; ``verification``: what its checks found (``verification.verification_record``)."""
        tensors = {}
        for layer, update in result.updates.items():
            tensors[f"left.{layer}"], tensors[f"right.{layer}"] = update.left, update.right
            if ctx.keeps_keys:
                tensors[f"keys.{layer}"] = result.keys[layer]
        entry = {
            "kind": "batch",
            "method": ctx.method,
            "status": "applied",
            "layers": list(result.layers),
            "modules": [ctx.spec.down_proj_name(layer) for layer in result.layers],
            "conv1d": ctx.spec.down_proj_conv1d,
            "requests": [r.as_dict() for r in result.requests],
            "norms": {str(layer): v for layer, v in result.norms.items()},
            "residual": result.residual,
            "losses": result.losses,
            "p_target": result.p_target,
            "timings": result.timings,
            "model": model_identity,
            "stats": stats,
            "hparams": {"memit": plain(ctx.hp.memit), "alphaedit": plain(ctx.hp.alphaedit)},
            **({"run": run} if run else {}),
            **(verification or {}),
        }
        return self._append(entry, tensors)

    def append_low_rank(
        self, entry: dict[str, Any], updates: dict[int, LowRank], extra: dict[str, torch.Tensor] | None = None
    ) -> int:
        """Record a batch edit whose update of each layer is ΔW = L Rᵀ (``updates``: the factors, float64) with
        ``extra`` tensors of the method's own beside them (UltraEdit: its normalisation statistics after the
        batch); ``rebuild`` applies it as it applies a MEMIT batch. Returns the id."""
        tensors = {}
        for layer, update in updates.items():
            tensors[f"left.{layer}"], tensors[f"right.{layer}"] = update.left, update.right
        clash = sorted(set(tensors) & set(extra or {}))
        if clash:
            raise ValueError(f"extra tensors {clash} would replace the factors")
        entry = {"kind": "batch", "status": "applied", **entry, "layers": sorted(updates)}
        return self._append(entry, {**tensors, **(extra or {})})

    def _append(
        self, entry: dict[str, Any], tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
    ) -> int:
        """Record ``entry`` under the next id with its tensors and their checksum; returns the id. The file
        first, then the ledger that names it: a crash leaves no entry without its file."""
        entry = {"id": self.next_id(), **entry}
        name = f"edits/{entry['id']:06d}.safetensors"
        cpu_tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        digest = write_tensors(self.dir / name, cpu_tensors, metadata)
        self.entries.append({**entry, "file": name, "sha256": digest})
        self.save()
        return entry["id"]

    def low_rank(self, entry: dict[str, Any]) -> dict[int, LowRank]:
        t = self.tensors(entry)
        return {layer: LowRank(t[f"left.{layer}"], t[f"right.{layer}"]) for layer in entry["layers"]}

    def preserved_keys(self, method: str = "alphaedit") -> dict[int, torch.Tensor]:
        """Σ K Kᵀ per layer over the active batches of ``method`` that recorded their keys (AlphaEdit's all do,
        MEMIT's with preserve_edits): what a new batch of that method must preserve."""
        out: dict[int, torch.Tensor] = {}
        for e in self.active():
            if e.get("kind") == "batch" and e["method"] == method:
                t = self.tensors(e)
                for layer in e["layers"]:
                    if f"keys.{layer}" not in t:
                        continue
                    k = t[f"keys.{layer}"].double()
                    out[layer] = k @ k.T if layer not in out else out[layer] + k @ k.T
        return out

    def rebuild(self, model: torch.nn.Module, spec: ArchSpec) -> int:
        """Apply every active entry, in order, to a model holding the base weights, each to the modules it
        records. Every file is read and every module found first: a damaged file or a missing module raises
        before any weight changes."""
        updates = [(e, self.low_rank(e) if e.get("kind") == "batch" else self.rank_one(e)) for e in self.active()]
        weights = {e["id"]: {layer: weight(model, name) for layer, name in self.modules(e).items()} for e, _ in updates}
        for e, update in updates:
            conv1d = e.get("conv1d", spec.down_proj_conv1d)
            if e.get("kind") == "batch":
                for layer, factors in update.items():
                    apply_low_rank(weights[e["id"]][layer], factors, conv1d)
            else:
                apply_rank_one(weights[e["id"]][e["layer"]], update, conv1d)
        return len(updates)

    def edited_weights(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        """The weights the active entries change, by module name (what a caller restores after ``rebuild``)."""
        return {name: weight(model, name) for e in self.active() for name in self.modules(e).values()}

    @staticmethod
    def modules(entry: dict[str, Any]) -> dict[int, str]:
        """layer -> the module ``entry`` changed there, by the name it records: a run under model.arch.down_proj or
        model.arch.down_proj_by_layer edits other modules than the down-projection, and a rebuild must not depend
        on repeating those settings. A batch records its layers and modules side by side, in the same order."""
        if entry.get("kind") != "batch":
            return {entry["layer"]: entry["module"]}
        layers, modules = entry.get("layers") or [], entry.get("modules") or []
        pairs = dict(zip(layers, modules))
        if len(layers) != len(modules) or any(str(layer) not in m.split(".") for layer, m in pairs.items()):
            raise UserError(
                f"ledger edit {entry.get('id')} records layers {layers} but modules {modules}; "
                "restore the ledger from a copy"
            )
        return pairs

    def solved_after(self, reverted: list[int]) -> list[int]:
        """The active edits made after one of ``reverted`` while it was in the weights: they were solved on
        weights that held it, and a rebuild re-applies them as recorded, not re-solved."""
        first = min(reverted, default=None)
        return [] if first is None else [e["id"] for e in self.active() if e["id"] > first]

    def revert(self, edit_id: int | str) -> list[int]:
        """Mark ``edit_id`` (or ``"all"``) reverted; returns the ids that changed."""
        if str(edit_id) == "all":
            targets = self.active()
        else:
            targets = [e for e in self.entries if e["id"] == int(edit_id)]
            if not targets:
                raise UserError(f"edit_id={edit_id} is not in the ledger (ids: {[e['id'] for e in self.entries]})")
            if targets[0]["status"] != "applied":
                raise UserError(f"edit {edit_id} is already {targets[0]['status']}")
        for e in targets:
            e["status"] = "reverted"
        return [e["id"] for e in targets]


def weight(model: torch.nn.Module, name: str) -> torch.nn.Parameter:
    try:
        return get_module(model, name).weight
    except KeyError:
        raise UserError(
            f"the ledger edits {name}, which this model does not have; rebuild it on the model it was made on"
        ) from None


def content_checksum(data: dict[str, Any]) -> str:
    """sha256 of a ledger's content (every field but the checksum itself), as canonical JSON."""
    text = json.dumps({k: v for k, v in data.items() if k != "checksum"}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _authenticate(path: Path, data: dict[str, Any]) -> None:
    """A ledger read back is the one this project wrote: its content matches its checksum. A ledger written
    before checksums existed is taken as written (its files are still checked one by one), with one line."""
    if "checksum" not in data:
        print(f"note: {path} has no checksum (written by an earlier version); its next save adds one", file=sys.stderr)
        return
    if data["checksum"] != content_checksum(data):
        raise UserError(
            f"ledger {path} was changed outside this project (its content does not match its checksum); nothing was "
            "applied or changed: restore it from a copy"
        )
