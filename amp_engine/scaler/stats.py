"""AmpStats: a GradScaler's overflow counters, kept on the device, read lazily.

What is kept (all on the scale's device, updated without a host sync):

* ``counts`` int64 ``[n_columns]``: per parameter, the number of non-finite grad
  elements seen so far. The check kernels add into it directly (their
  ``counts`` argument), so attribution costs no extra pass over the grads.
* ``counters`` int64 ``[3]``: updates so far, updates at which an overflow was
  found (skipped steps), and the last update that ended with the scale above
  its floor (the updates since then, ``floor_run``, are the ones spent at the floor).
* ``ring`` int64 ``[history + 2, 1 + n_columns]``: the last ``history`` overflow
  events, each row the update index then the cumulative ``counts`` at it. The
  difference of consecutive snapshots says which parameters overflowed at that
  step. Every update writes its snapshot into the ring's next free row and
  advances the write position (``counters[1]``) by the overflow flag on the
  device: a clean step's snapshot is simply overwritten by the next one, so
  recording "only on overflow steps" needs no host decision.

Cost per update: nothing of its own. ``update_scale_`` (the launch that updates
the scale anyway) does all of the above (``update_args`` hands it the tensors);
its only size-dependent part is one row copy of ``counts`` (8 bytes per
parameter). Memory: ``8 * (history + 2) * n_params`` bytes for the ring.
Nothing is copied to the host until :meth:`report` / :meth:`state_dict` are
called (GradScaler.overflow_report, GradScaler.stats).
"""
from __future__ import annotations

import ctypes
import re
import weakref
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from amp_engine.ops.reference.scaling import after_update_

__all__ = ["AmpStats"]


def _host_view(t: Tensor) -> ctypes.c_int64:
    """A ctypes int64 over the memory of `t` (0-dim int64, host): ``.value`` reads it
    calling no tensor method (no dispatcher cost per read, no Tensor.numpy/item that a
    host-sync check counts) and needs no numpy. The caller keeps `t` alive beside it."""
    if t.dtype != torch.int64 or t.numel() != 1 or t.device.type != "cpu":
        raise ValueError(f"expected a one-element int64 host tensor, got {t.dtype} {tuple(t.shape)} on {t.device}")
    return ctypes.c_int64.from_address(t.data_ptr())


class AmpStats:
    """Device-side overflow counters and per-parameter attribution.

    Args:
        history: how many overflow steps per run the ring remembers (the
            ``steps`` of a report list at most this many; ``count`` is exact).
        track_overflow: keep per-parameter counts and the ring; False keeps
            only the step / skipped-step / floor counters.
    """

    def __init__(self, history: int = 64, track_overflow: bool = True) -> None:
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"overflow_history must be an int >= 1, got {history!r}")
        self.history = history
        self.track_overflow = bool(track_overflow)
        self.device: torch.device | None = None
        self.updates = 0  # host-side: the number of update() calls that consumed inf checks
        self._rows = history + 2  # + a baseline for the oldest event + a scratch row
        # column bookkeeping: column -> (weakref to the param, fallback name)
        self._columns: list[tuple[weakref.ref, str]] = []
        self._column_of: dict[int, int] = {}
        self._pending: dict[str, int] = {"events": 0, "floor_run": 0}  # from a checkpoint

    # ------------------------------------------------------------------ state
    def lazy_init(self, device: torch.device) -> None:
        """Create the device tensors next to the scale (first call to scale())."""
        if self.device is not None:
            return
        self.device = torch.device(device)
        n = len(self._columns)
        self.counts = torch.zeros(n, dtype=torch.int64, device=self.device)
        self.ring = torch.zeros(self._rows, 1 + n, dtype=torch.int64, device=self.device)
        last_above = self.updates - 1 - self._pending["floor_run"]
        values = [self.updates, self._pending["events"], last_above]
        if self.device.type == "cpu":
            # host memory: the kernels write it, floor_run_lagged reads it through _host_view
            self.counters = torch.tensor(values, dtype=torch.int64)
            self._floor_host = self.counters[2]  # a view made once: counters keeps it alive
            self._floor_host_view = _host_view(self._floor_host)
        else:
            self.counters = torch.tensor(values, dtype=torch.int64, device=self.device)
            self._last_above = self.counters[2]  # a view made once: the async copy's source
            self._floor_host = torch.zeros((), dtype=torch.int64, pin_memory=True)
            self._floor_host_view = _host_view(self._floor_host)
        self._floor_event = None  # (event, updates when the copy was issued) on CUDA

    def columns_for(self, params: Sequence[Tensor], names: Sequence[str]) -> list[int]:
        """The counts column of each param, allocating columns for new ones."""
        cols, new = [], 0
        for p, name in zip(params, names):
            col = self._column_of.get(id(p))
            if col is None or self._columns[col][0]() is not p:  # unseen, or id reused
                col = len(self._columns)
                self._columns.append((weakref.ref(p), name))
                self._column_of[id(p)] = col
                new += 1
            cols.append(col)
        if new and self.device is not None:
            self.counts = torch.cat([self.counts, self.counts.new_zeros(new)])
            self.ring = torch.cat([self.ring, self.ring.new_zeros(self._rows, new)], dim=1)
        return cols

    def name_grad_error(self, error: Exception, cols: list[int], names: dict[int, str]) -> Exception:
        """An op's error about ``grads[i]`` (its index in one call, ``cols`` its columns),
        reworded to name the param (``names``: {id(param): name})."""
        match = re.search(r"grads\[(\d+)\]", str(error))
        if match is None or int(match.group(1)) >= len(cols):
            return error
        ref, where = self._columns[cols[int(match.group(1))]]
        name = names.get(id(ref()))
        where = f"{where} ({name!r})" if name else where
        return type(error)(f"the grad of param {where}: {error}")

    def update_args(self) -> dict:
        """The bookkeeping arguments of ``ops.update_scale_`` for one update.

        The kernel counts the update on the device; call :meth:`counted` after it.
        """
        if self.track_overflow and self.counts.numel():
            return {"counters": self.counters, "counts": self.counts, "ring": self.ring}
        return {"counters": self.counters, "counts": None, "ring": None}

    def counted(self) -> None:
        """The host's twin of ``counters[0]`` (the update index, for lagged floor reads)."""
        self.updates += 1

    def record_update(self, found_inf: Tensor, scale: Tensor, min_scale: float) -> None:
        """Account an update that did not run ``update_scale_`` (``update(new_scale)``):
        the same bookkeeping in plain tensor ops."""
        after_update_(scale, found_inf, min_scale, None, None, **self.update_args())
        self.counted()

    # ------------------------------------------------------------ host reads
    def floor_run_lagged(self, every: int) -> int | None:
        """floor_run as seen at most ``every`` updates ago, never waiting on the device.

        Checked every ``every`` updates. On the CPU the counter is host memory,
        read through a ctypes view made once. On CUDA an async copy into pinned
        memory is issued and read at the next check once its event has
        completed (None until then): no host sync either way.
        """
        if self.device is None or self.updates % every:
            return None
        if self.device.type == "cpu":
            return self.updates - 1 - self._floor_host_view.value
        value = None
        if self._floor_event is not None:
            event, updates = self._floor_event
            if not event.query():
                return None  # the previous copy is still in flight: try next time
            value = updates - 1 - self._floor_host_view.value
        self._floor_host.copy_(self._last_above, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._floor_event = (event, self.updates)
        return value

    def floor_run_now(self) -> int:
        """Consecutive updates so far that ended at the floor (syncs)."""
        if self.device is None:
            return self._pending["floor_run"]
        return self.updates - 1 - int(self.counters[2].item())

    def skipped_steps(self) -> int:
        """Updates at which an overflow was found (syncs)."""
        return self._pending["events"] if self.device is None else int(self.counters[1].item())

    def report(self, names: dict[int, str] | None = None, top_k: int | None = 10) -> list[dict]:
        """The parameters that overflowed most (syncs: copies the counters to the host).

        Returns up to ``top_k`` dicts ``{"name", "count", "steps"}`` sorted by
        ``count`` (non-finite grad elements seen, all steps) then name; ``steps``
        are the update indices (0-based) among the last ``history`` overflow
        steps at which the parameter had non-finite grads. Columns of the same
        name (a param seen by several optimizers) are merged.
        """
        if self.device is None or not self._columns or not self.track_overflow:
            return []
        counts = self.counts.tolist()
        ring = self.ring.tolist()  # rows: [update index, counts...]
        n_events = int(self.counters[1].item())
        steps_of: dict[int, list[int]] = {}
        for e in range(max(0, n_events - self.history), n_events):
            step, *row = ring[e % self._rows]
            base = ring[(e - 1) % self._rows][1:] if e > 0 else None
            for col, c in enumerate(row):
                if c > (base[col] if base is not None else 0):
                    steps_of.setdefault(col, []).append(step)
        merged: dict[str, dict] = {}
        for col, (ref, fallback) in enumerate(self._columns):
            if counts[col] == 0:
                continue
            p = ref()
            name = (names or {}).get(id(p), fallback) if p is not None else fallback
            entry = merged.setdefault(name, {"name": name, "count": 0, "steps": []})
            entry["count"] += counts[col]
            entry["steps"] = sorted(set(entry["steps"]) | set(steps_of.get(col, [])))
        out = sorted(merged.values(), key=lambda d: (-d["count"], d["name"]))
        return out if top_k is None else out[: max(0, int(top_k))]

    # ----------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """JSON-able counters (syncs). The ring is not saved: it is diagnostics."""
        return {"steps": self.updates, "skipped_steps": self.skipped_steps(),
                "steps_at_floor": self.floor_run_now()}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state.get("steps", self.updates))
        events = int(state.get("skipped_steps", 0))
        floor_run = int(state.get("steps_at_floor", 0))
        self._pending = {"events": events, "floor_run": floor_run}
        if self.device is not None:
            self.counters.copy_(torch.tensor([self.updates, events, self.updates - 1 - floor_run]))

    def __getstate__(self) -> dict:
        # tensors and weakrefs do not pickle: keep the counters, restart lazily
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("counts", "ring", "counters", "_last_above",
                              "_floor_host", "_floor_host_view", "_floor_event",
                              "_columns", "_column_of")}
        state["_pending"] = {"events": self.skipped_steps(), "floor_run": self.floor_run_now()}
        state["device"] = None
        state["_columns"], state["_column_of"] = [], {}
        return state


def named_parameter_ids(named: Iterable[tuple[str, Tensor]]) -> dict[int, str]:
    """{id(param): name} from ``model.named_parameters()`` (or any (name, tensor) pairs)."""
    return {id(p): name for name, p in named}
