"""A LightningModule that accumulates Σ k kᵀ over streamed text for several layers in one pass.

Run through ``trainer.predict`` (each rank sees only its own shards, no duplicated samples). The forward
stops right before the deepest requested down-projection (nothing after it can change the keys) and runs
without an attention mask: the batches are right-padded and attention is causal, so a real token never sees
a pad, and the model takes its fastest (causal) attention path with no mask to build or inspect. The step
does no host-device sync: token counts, shard positions and the real tokens' positions come from the
dataloader worker as host values, the keys of the real tokens are gathered with that precomputed index.

The HF model is held as a plain attribute, not a registered child module: Lightning's checkpoints (its
SLURM requeue writes one) then hold nothing of it, and this module moves it to its rank's device itself.

Resumable state (``PartialStats``, one file per rank, atomic) is written every ``checkpoint_minutes``,
every ``checkpoint_every_batches`` batches and when a stop is requested (SIGTERM / SIGINT, armed by
``train.py`` through ``pipeline.core.signals``: the batch in flight is finished first, then ``Interrupted``).
It includes the convergence readouts (rank 0, at each doubling of its tokens): a resumed run redoes those
after its checkpoint, at the same token counts.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from tqdm.auto import tqdm

from rome.pipeline.core.arch import ArchSpec
from rome.pipeline.core.atomic import atomic_path
from rome.pipeline.core.digest import file_sha256
from rome.pipeline.core.hooks import TraceDict
from rome.pipeline.core.signals import check_stop, stop_requested
from rome.pipeline.errors import UserError
from rome.pipeline.stats.convergence import Readout, converged_hint, pick_probes, take_readout
from rome.pipeline.stats.second_moment import accumulate_second_moment

NEW_SHARD = {"window": 0, "batches": 0, "before": 0, "tokens": 0}
# the partial state's layout and meaning; 3: the shards' budgets are their parts of the stream's first
# stats.tokens tokens (2 split the budget evenly over the shards: other texts with several shards)
PARTIAL_FORMAT = 3


class PartialStats:
    """``dir/rank<r>.pt``: the resumable state of one rank, checked against the run it belongs to."""

    def __init__(self, directory: Path, run: dict[str, Any]) -> None:
        self.dir, self.run = Path(directory), run
        self._cache: dict[int, dict[str, Any] | None] = {}

    def path(self, rank: int) -> Path:
        return self.dir / f"rank{rank}.pt"

    def checksum_path(self, rank: int) -> Path:
        return self.dir / f"rank{rank}.pt.sha256"

    def load(self, rank: int) -> dict[str, Any] | None:
        """The rank's state, checked against its checksum first: a damaged or unverifiable state is removed
        with one line and the rank starts again from zero (it never resumes into wrong statistics)."""
        if rank not in self._cache:
            p = self.path(rank)
            state = None
            if p.exists():
                try:
                    recorded = self.checksum_path(rank).read_text().strip()
                except (OSError, UnicodeDecodeError):  # missing or damaged: the state cannot be trusted
                    recorded = None
                if recorded != file_sha256(p):
                    why = "has no checksum" if recorded is None else "fails its checksum (damaged)"
                    p.unlink()
                    self.checksum_path(rank).unlink(missing_ok=True)
                    print(f"partial statistics {p} {why}: removed; this rank starts again from zero", file=sys.stderr)
                    self._cache[rank] = None
                    return None
                try:
                    state = torch.load(p, map_location="cpu", weights_only=True)
                except Exception as err:
                    p.unlink()
                    raise UserError(
                        f"partial statistics {p} were corrupt and have been removed; run the command again"
                    ) from err
                run = state.get("run") or {}
                if run.get("format") != self.run.get("format"):
                    raise UserError(
                        f"{self.dir} holds a partial run written by another version of the stats stage (format "
                        f"{run.get('format')}, now {self.run.get('format')}) that cannot be resumed; delete {self.dir} "
                        "and run the command again"
                    )
                if run != self.run:
                    raise UserError(
                        f"{self.dir} holds a partial run with other settings "
                        f"({_diff(run, self.run)}); "
                        f"rerun with those settings to resume, or delete {self.dir}"
                    )
            self._cache[rank] = state
        return self._cache[rank]

    def shards(self, rank: int) -> dict[int, dict[str, int]]:
        state = self.load(rank)
        return {int(s): dict(v) for s, v in state["shards"].items()} if state else {}

    def save(self, rank: int, state: dict[str, Any]) -> None:
        """The state, then its checksum (a crash between them leaves a state that fails its check: it is
        recomputed, never trusted)."""
        with atomic_path(self.path(rank)) as tmp:
            torch.save({"run": self.run, **state}, tmp)
            digest = file_sha256(tmp)
        with atomic_path(self.checksum_path(rank)) as tmp:
            tmp.write_text(digest + "\n")
        self._cache.pop(rank, None)

    def clear(self) -> None:
        # rank files, the temporaries of a save that a kill interrupted (atomic_path's ".rank<r>.pt.*.tmp"),
        # and the checkpoints Lightning's SLURM requeue wrote here (its default_root_dir)
        for p in [
            *self.dir.glob("rank*.pt"),
            *self.dir.glob("rank*.pt.sha256"),
            *self.dir.glob(".rank*.pt*.tmp"),
            *self.dir.glob("hpc_ckpt_*.ckpt"),
        ]:
            p.unlink(missing_ok=True)
        if self.dir.exists() and not any(self.dir.iterdir()):
            self.dir.rmdir()


def _diff(a: dict, b: dict) -> str:
    return ", ".join(f"{k}: {a.get(k)} vs now {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


@dataclasses.dataclass(frozen=True)
class ConvergenceSettings:
    """``stats.convergence`` (its defaults are in configs/) and the run's seed."""

    probes: int  # probe keys from the first batch
    first_tokens: int  # first readout; then every doubling
    threshold: float  # the hint's bound on u's relative change over a doubling
    seed: int


class SecondMomentModule(L.LightningModule):
    def __init__(
        self,
        model: torch.nn.Module,
        spec: ArchSpec,
        layers: list[int],
        *,
        dtype: torch.dtype,
        product: str,
        partial: PartialStats | None,
        checkpoint_minutes: float,
        checkpoint_every_batches: int,
        convergence: ConvergenceSettings | None,
        report: Callable[[str], None] = tqdm.write,
    ) -> None:
        """``dtype``, ``product``, ``checkpoint_*``: ``stats.*`` (configs/config.yaml holds their defaults);
        ``partial``: where the resumable state goes (None: nowhere); ``convergence``: None for no readouts."""
        super().__init__()
        object.__setattr__(self, "model", model)  # a plain attribute: never registered, saved or moved by Lightning
        self.spec = spec
        self.layers = sorted(layers)
        self.names = [spec.down_proj_name(layer) for layer in self.layers]
        self.acc_dtype, self.product = dtype, product
        self.partial, self.report = partial, report
        self.checkpoint_seconds, self.checkpoint_every_batches = 60.0 * checkpoint_minutes, checkpoint_every_batches
        self.convergence = convergence
        self.sums: dict[int, torch.Tensor] = {}
        self.count = 0  # this rank's tokens (all ranks' after on_predict_end)
        self.resumed = 0  # tokens counted by an earlier, interrupted run
        self.shards: dict[int, dict[str, int]] = {}
        self.steps = 0
        self.seconds = 0.0
        # convergence readout (rank 0): probes per layer, the last readout per layer, the curve per layer
        self.probes: dict[int, torch.Tensor] = {}
        self.readouts: dict[int, Readout] = {}
        self.curves: dict[int, list[dict[str, Any]]] = {layer: [] for layer in self.layers}
        self.next_readout = convergence.first_tokens if convergence else 0
        self.hinted = False
        self._state: dict[str, Any] | None = None

    # -- set up: state first (the progress bar starts from it), then tensors on the device ---------------

    def setup(self, stage: str) -> None:
        state = self.partial.load(self.global_rank) if self.partial else None
        self._state = state
        if state:
            self.count, self.steps = int(state["count"]), int(state["steps"])
            self.resumed = self.count
            self.shards = {int(s): dict(v) for s, v in state["shards"].items()}
            self.seconds = float(state["seconds"])
            conv = state.get("convergence") or {}
            self.probes = dict(conv.get("probes", {}))
            self.readouts = {layer: Readout(**r) for layer, r in conv.get("readouts", {}).items()}
            self.curves = {layer: list(conv.get("curves", {}).get(layer, [])) for layer in self.layers}
            self.next_readout = int(conv.get("next_readout", self.next_readout))
            self.hinted = bool(conv.get("hinted", False))

    def on_predict_start(self) -> None:
        self.model.to(self.device).eval()
        d = self.spec.key_size(self.model, self.layers[0])
        # the Trainer predicts in inference mode; the sums are made outside it, as normal tensors, so that once the
        # pass is over C can be divided in them in place (``StatsEntry.save``) instead of in a second d x d buffer
        with torch.inference_mode(False):
            self.sums = {layer: torch.zeros(d, d, dtype=self.acc_dtype, device=self.device) for layer in self.layers}
        if self._state:
            for layer in self.layers:
                self.sums[layer].copy_(self._state["sums"][layer])
        self._state = None
        resumed = self.resumed
        if self.trainer.world_size > 1:
            ours = torch.tensor(float(resumed), dtype=torch.float64, device=self.device)
            resumed = int(self.trainer.strategy.reduce(ours, reduce_op="sum"))
        if resumed and self.trainer.is_global_zero:
            self.report(f"stats: resuming from {resumed:,} tokens (partial state in {self.partial.dir})")
        self._t0 = self._last_save = time.monotonic()

    # -- the step ------------------------------------------------------------------------------------------

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        with TraceDict(self.model, self.names, retain_input=True, stop=self.names[-1]) as traces:
            self.model(input_ids=batch["input_ids"], use_cache=False)  # causal, right-padded: no mask needed
        index, tokens = batch["index"], batch["tokens"]  # tokens: a host int from the worker
        for layer, name in zip(self.layers, self.names):
            keys = traces[name].input
            keys = keys.reshape(-1, keys.shape[-1])
            if index is not None:
                keys = keys.index_select(0, index)
            if self.convergence and self.global_rank == 0 and layer not in self.probes:
                self.probes[layer] = pick_probes(keys, tokens, self.convergence.probes, self.convergence.seed)
            accumulate_second_moment(self.sums[layer], keys, self.product)
        self._advance(batch)
        self._after_batch()

    def _advance(self, batch: dict[str, Any]) -> None:
        """This shard's resume point after ``batch``: windows done, batches of the current window done,
        tokens of the windows done (the budget is cut against them), tokens counted."""
        shard, window, tokens = batch["shard"], batch["window"], batch["tokens"]
        old = self.shards.get(shard, NEW_SHARD)
        total = old["tokens"] + tokens
        before = old["before"] if window == old["window"] else old["tokens"]
        self.shards[shard] = (
            {"window": window + 1, "batches": 0, "before": total, "tokens": total}
            if batch["last"]
            else {"window": window, "batches": batch["batch"] + 1, "before": before, "tokens": total}
        )
        self.count += tokens
        self.steps += 1

    def _after_batch(self) -> None:
        """A convergence readout at each doubling of the tokens; a checkpoint when one is due; the stop."""
        if self.convergence and self.count >= self.next_readout:
            while self.next_readout <= self.count:
                self.next_readout *= 2
            if self.global_rank == 0:
                self._readout()
        stop = stop_requested()  # a SIGTERM / SIGINT arrived (train.py armed pipeline.signals)
        due = (
            stop
            or (self.checkpoint_every_batches and self.steps % self.checkpoint_every_batches == 0)
            or (self.checkpoint_seconds and time.monotonic() - self._last_save >= self.checkpoint_seconds)
        )
        if due and self.partial:
            self._save_partial()
        if stop:
            where = f"saved in {self.partial.dir}" if self.partial else "not saved (no partial state configured)"
            ranks = f" on rank {self.global_rank} of {self.trainer.world_size}" if self.trainer.world_size > 1 else ""
            check_stop(f"partial statistics ({self.count:,} tokens{ranks}) {where}; to resume, run the same command")

    def _readout(self) -> None:
        for layer in self.layers:
            if layer in self.probes:
                self.readouts[layer], point = take_readout(
                    self.sums[layer], self.count, self.probes[layer], self.readouts.get(layer)
                )
                self.curves[layer].append(point)
        hint = None if self.hinted else converged_hint(self.curves, self.convergence.threshold, self.trainer.world_size)
        if hint:
            self.hinted = True
            self.report(hint)

    def _elapsed(self) -> float:
        return self.seconds + time.monotonic() - self._t0

    def _save_partial(self) -> None:
        self.partial.save(
            self.global_rank,
            {
                "sums": {layer: t.cpu() for layer, t in self.sums.items()},
                "count": self.count,
                "steps": self.steps,
                "shards": {s: dict(v) for s, v in self.shards.items()},
                "seconds": self._elapsed(),
                "convergence": {
                    "probes": self.probes,
                    "readouts": {layer: r.as_dict() for layer, r in self.readouts.items()},
                    "curves": self.curves,
                    "next_readout": self.next_readout,
                    "hinted": self.hinted,
                },
            },
        )
        self._last_save = time.monotonic()

    def on_predict_end(self) -> None:
        """Sum the statistics of all ranks; every rank ends with the merged totals."""
        self.seconds = self._elapsed()
        counts = torch.tensor([self.count, self.resumed], dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            for layer in self.layers:
                self.sums[layer] = self.trainer.strategy.reduce(self.sums[layer], reduce_op="sum")
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        self.count, self.resumed = (int(c) for c in counts.tolist())
