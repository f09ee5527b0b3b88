"""A run as the engine reads it back: one typed record of what the worker stored, and one fold of
its event stream. Every reader goes through here: the runs screen and compare (ui/), ``runs show``
and ``run`` (engine/cli/runs.py), the report's runs, calibration's measured-vs-estimated pairs and
the advisor's measured evidence.

    RunRecord.of(run: dict) -> RunRecord      a row of the run store (engine.runs.api.get_run,
                                              engine.runs.store.finished_runs): its stages with what
                                              each measured, the evaluation before/after, metrics,
                                              artifacts, the error of a failed run
    fold(events, into=None) -> EventFold      the events folded, incrementally (``into``: the fold so
                                              far; events it has seen are skipped, so re-delivery is
                                              harmless)

Plain data (dataclasses), no I/O: the run store is engine/runs/store.py, a layer above.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

STAGE_KEYS = ("stage", "index", "duration_s", "peak_mem_bytes", "mem_source")


@dataclass(frozen=True)
class StageResult:
    """One stage as the worker measured it (the ``stage_finished`` event, kept in the result)."""
    stage: str
    index: int | None = None
    duration_s: float | None = None
    peak_mem_bytes: int | None = None
    mem_source: str | None = None            # cuda_max_memory_allocated | cpu_peak_rss
    cpu_peak_rss_bytes: int | None = None
    cuda_max_reserved_bytes: int | None = None
    stopped: bool | None = None              # True: the stage ended on a stop request
    failed: bool | None = None               # True: the stage raised (the run's error says why)
    result: dict = field(default_factory=dict)   # what the stage function returned
    processes: int | None = None             # a multi-process stage (resources): how many ranks ran it
    ranks: list | None = None                # and each rank's peak memory (peak_mem_bytes is the largest)

    @classmethod
    def of(cls, d: dict) -> "StageResult":
        names = {f.name for f in fields(cls)}
        return cls(**{k: (v if k != "result" else (v or {})) for k, v in d.items() if k in names})

    @property
    def on_cuda(self) -> bool:
        """Whether peak_mem_bytes is a CUDA allocation figure (max_memory_allocated), not process RSS."""
        return "cuda" in str(self.mem_source or "")

    def summary(self) -> dict:
        """stage, index, duration_s, peak_mem_bytes, mem_source (what the run views list)."""
        return {k: getattr(self, k) for k in STAGE_KEYS}


@dataclass(frozen=True)
class Evaluation:
    """The evaluate stage's measurements: the 16-bit model (``before``) and the run's own
    (``after``) on the same held-out rows."""
    task: str | None = None
    rows: int | None = None
    before: dict | None = None
    after: dict | None = None


@dataclass(frozen=True)
class RunRecord:
    id: str
    name: str = ""
    strategy: str | None = None
    model: str | None = None
    device: str | None = None
    status: str | None = None
    reason: str | None = None
    created: float | None = None
    started: float | None = None
    ended: float | None = None
    workdir: str | None = None
    spec: dict = field(default_factory=dict)
    estimate: dict = field(default_factory=dict)      # the planner's estimate stored with the run
    versions: dict = field(default_factory=dict)
    machine: dict = field(default_factory=dict)
    stages: tuple[StageResult, ...] = ()
    evals: dict = field(default_factory=dict)          # eval name (before, after ...) -> metrics
    metrics: dict = field(default_factory=dict)        # metric name -> {"value", "unit"}
    artifacts: tuple[dict, ...] = ()
    error: dict | None = None

    @classmethod
    def of(cls, run: dict) -> "RunRecord":
        """The typed record of a run row (missing parts are empty, never an exception)."""
        res = run.get("result") or {}
        return cls(id=run.get("id"), name=run.get("name") or "", strategy=run.get("strategy") or (run.get("spec") or {}).get("strategy"),
                   model=run.get("model") or (run.get("spec") or {}).get("model"), device=run.get("device"),
                   status=run.get("status"), reason=run.get("reason"), created=run.get("created"),
                   started=run.get("started"), ended=run.get("ended"), workdir=run.get("workdir"),
                   spec=run.get("spec") or {}, estimate=run.get("estimate") or {},
                   versions=run.get("versions") or {}, machine=run.get("machine") or {},
                   stages=tuple(StageResult.of(s) for s in res.get("stages") or [] if isinstance(s, dict)),
                   evals=res.get("eval") or {},
                   metrics={k: v for k, v in (res.get("metrics") or {}).items() if isinstance(v, dict)},
                   artifacts=tuple(res.get("artifacts") or []), error=res.get("error"))

    def stage(self, name: str) -> StageResult | None:
        """The first stage of that name (train, quantize, evaluate ...), or None."""
        return next((s for s in self.stages if s.stage == name), None)

    @property
    def evaluation(self) -> Evaluation | None:
        """Before/after of the evaluate stage (its result, else the run's eval events); None when
        the run did not measure both."""
        ev = (self.stage("evaluate") or StageResult("evaluate")).result or {}
        before = ev.get("before") or self.evals.get("before")
        after = ev.get("after") or self.evals.get("after")
        if not (isinstance(before, dict) and isinstance(after, dict)):
            return None
        return Evaluation(task=ev.get("task"), rows=ev.get("eval_rows"), before=before, after=after)

    @property
    def runtime_evals(self) -> list[dict]:
        """The exported artifacts measured in their runtimes (evaluate's ``runtimes``: runtime, format,
        role, path, perplexity, prefill_ms, decode_tokens_per_s, ... or ``skipped`` with the reason);
        else the run's ``<runtime>:<format>`` eval events."""
        ev = (self.stage("evaluate") or StageResult("evaluate")).result or {}
        got = ev.get("runtimes")
        if isinstance(got, list):
            return [m for m in got if isinstance(m, dict)]
        return [m for name, m in self.evals.items() if ":" in str(name) and isinstance(m, dict)]

    @property
    def before(self) -> dict:
        return self.evals.get("before") or {}

    @property
    def after(self) -> dict:
        return self.evals.get("after") or {}

    def metric(self, name: str, default=None):
        return (self.metrics.get(name) or {}).get("value", default)

    @property
    def wall_s(self) -> float | None:
        return (self.ended - self.started) if self.started and self.ended else None

    @property
    def dataset(self) -> str:
        """The dataset the run used, as people name it: demo:NAME or the file's name."""
        ds = self.spec.get("dataset") or {}
        if ds.get("demo"):
            return f"demo:{ds['demo']}"
        if ds.get("path"):
            return str(ds["path"]).replace("\\", "/").rstrip("/").split("/")[-1]
        return "?"


# ---- the event stream ---------------------------------------------------------------------------

def payload(ev: dict) -> dict:
    """An event's payload: events come as {seq, ts, type, payload} or flat {seq, ts, type, **payload}."""
    p = ev.get("payload")
    return p if isinstance(p, dict) else {k: v for k, v in ev.items() if k not in ("seq", "ts", "type", "run_id")}


@dataclass
class EventFold:
    """What a run's events say, folded in sequence order (a JSON-able dict with ``to_dict``)."""
    seq: int = 0                       # the last sequence number folded
    count: int = 0
    by_type: dict = field(default_factory=dict)
    status: str | None = None
    reason: str | None = None
    started_ts: float | None = None
    ended_ts: float | None = None
    stage: str | None = None           # the stage running (the last stage_started)
    stage_index: int | None = None
    stage_total: int | None = None
    last_step: dict = field(default_factory=dict)        # the last step's payload, with its stage and ts
    last_step_event: dict | None = None                  # the last step event as given
    last_tokens_per_s: float | None = None               # the last step that reported a speed
    points: list = field(default_factory=list)           # [step, loss, stage, lr, tokens_per_s]
    stages_done: list = field(default_factory=list)      # STAGE_KEYS (+ stopped, failed) of each stage_finished
    prepare: dict = field(default_factory=dict)          # the last prepare event: what, step, total, done,
                                                         # duration_s, started_ts (before the first stage)
    evals: list = field(default_factory=list)            # {"name", "metrics", "stage"}
    metrics: list = field(default_factory=list)          # {"name", "value", "unit", "stage"}
    artifacts: list = field(default_factory=list)        # {"path", "kind"}
    errors: list = field(default_factory=list)           # {"stage", "message", "kind"}
    warnings: list = field(default_factory=list)
    logs: list = field(default_factory=list)
    max_points: int | None = None                        # keep only the newest loss points
    max_logs: int | None = None                          # and the newest log and warning messages

    def add(self, ev: dict) -> bool:
        """Fold one event; False (and nothing changes) when its seq was folded already."""
        seq = ev.get("seq")
        if seq is not None and seq <= self.seq:
            return False
        if seq is not None:
            self.seq = seq
        t, p = ev["type"], payload(ev)
        self.count += 1
        self.by_type[t] = self.by_type.get(t, 0) + 1
        if t == "queued" and self.started_ts is None:
            self.status = "queued"
        elif t == "started":
            self.status, self.started_ts = "running", ev.get("ts")
        elif t == "stage_started":
            self.stage, self.stage_index, self.stage_total = p.get("stage"), p.get("index"), p.get("total")
            self.last_step = {}
        elif t == "step":
            self.last_step = {**p, "stage": self.stage, "ts": ev.get("ts")}
            self.last_step_event = ev
            if p.get("tokens_per_s") is not None:
                self.last_tokens_per_s = p["tokens_per_s"]
            if p.get("loss") is not None:
                x = p.get("step")
                if x is None:
                    x = self.points[-1][0] + 1 if self.points else 1
                self.points.append([x, p["loss"], self.stage, p.get("lr"), p.get("tokens_per_s")])
                if self.max_points:
                    self.points = self.points[-self.max_points:]
        elif t == "prepare":
            started = self.prepare.get("started_ts") if self.prepare.get("what") == p.get("what") else None
            self.prepare = {**p, "started_ts": started or ev.get("ts")}
        elif t == "stage_finished":
            self.stages_done.append({**{k: p.get(k) for k in STAGE_KEYS},
                                     "stopped": bool(p.get("stopped")), "failed": bool(p.get("failed"))})
        elif t == "eval":
            self.evals.append({"name": p.get("name"), "metrics": p.get("metrics") or {}, "stage": self.stage})
        elif t == "metric":
            self.metrics.append({"name": p.get("name"), "value": p.get("value"), "unit": p.get("unit"),
                                 "stage": self.stage})
        elif t == "artifact":
            self.artifacts.append({"path": p.get("path"), "kind": p.get("kind")})
        elif t == "error":
            self.errors.append({"stage": p.get("stage"), "message": p.get("message"), "kind": p.get("kind")})
        elif t in ("warning", "log"):
            kept = self.warnings if t == "warning" else self.logs
            kept.append(p.get("message"))
            if self.max_logs:
                del kept[:-self.max_logs]
        elif t == "finished":
            self.status, self.reason, self.ended_ts = p.get("status"), p.get("reason"), ev.get("ts")
        return True

    def evals_by_name(self) -> dict[str, dict]:
        """Eval metrics merged per eval name (before, after ...)."""
        out: dict[str, dict] = {}
        for e in self.evals:
            out.setdefault(e["name"] or "eval", {}).update(e["metrics"])
        return out

    def metrics_by_name(self) -> dict[str, tuple]:
        """Metric name -> (value, unit), the last one reported."""
        return {m["name"]: (m["value"], m["unit"] or "") for m in self.metrics if m["name"]}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EventFold":
        names = {f.name for f in fields(cls)}
        return cls(**{k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
                      for k, v in d.items() if k in names})


def fold(events, into: EventFold | None = None) -> EventFold:
    """Fold events into a copy of ``into`` (or a new fold); events already folded are skipped."""
    f = EventFold.from_dict(into.to_dict()) if into is not None else EventFold()
    for ev in events or []:
        f.add(ev)
    return f
