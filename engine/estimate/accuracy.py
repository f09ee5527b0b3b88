"""Accuracy estimate: how much a quantization strategy costs in task score and perplexity.

    estimate_accuracy(family, params_b, method, w_bits, a_bits=16, group_size=None,
                      per_channel=False, finetune="none", measured=None) -> dict

Pure Python (no numpy, no torch). The evidence is presets/evidence/published_quant_results.csv
(published results, every row with its source); the vocabulary (method ids, metric chance
levels, exclusion rules, fit settings) is presets/evidence/accuracy_model.yaml. docs/accuracy.md
explains the model and reports its leave-one-source-out error (bench/accuracy_loso.py).

The model in one paragraph. Every published row is turned into a *damage* D in nats of
WikiText-2 perplexity, D = ln(ppl_q / ppl_16). Perplexity rows give D directly; accuracy rows
(zero-shot, MMLU) give it through a retention mapping fitted on configurations that report
both, in which only the part of a score above chance decays:

    retention = c + (1 - c) * exp(-k_metric * (P / 7B)^-kappa * D),   c = chance / 16-bit score

Then ln(D + eps) is a linear function of explainable terms, fitted by ridge least squares:
an intercept, a method offset shrunk toward its class (rounding < calibrated < learned <
vector), weight bits (common slope + a per-class slope), group granularity log2(g / 128)
(per-channel = one group per row), model size ln(P / 7B), a family offset (llama-3 is harder
than llama-2; unknown families pooled), fine-tuning recovery (qlora, qat; constrained to
help) and a corpus offset (C4, PTB). Quantized activations add a second damage (fitted after
the weight terms, on what the W8A8/W4A4 rows leave unexplained). A request's D gives
ppl_ratio = exp(D) and retention through the mapping; the interval comes from the residuals
of the evidence nearest the request (wider when the method or family has no rows of its own).
Measured runs (`measured=`) pull the estimate toward themselves by precision.
"""
from __future__ import annotations

import csv
import functools
import math
import re
from dataclasses import dataclass, field, replace

from engine.errors import InputError
from engine.presets import PRESETS_DIR, load_yaml
from engine.vocab import FINETUNES, MODEL_FAMILIES

SPEC_FILE = "evidence/accuracy_model.yaml"
CSV_FILE = "evidence/published_quant_results.csv"
# published rows added here (not in the shared verbatim copy above): the same columns plus
# a_granularity, the activation scale's granularity as the source states it
EXTRA_CSV_FILES = ("evidence/act_quant_results.csv",)


@functools.lru_cache(maxsize=None)
def spec() -> dict:
    """The vocabulary and settings of presets/evidence/accuracy_model.yaml."""
    return load_yaml(SPEC_FILE)


def methods() -> dict[str, dict]:
    """Method id -> its entry (class, act, finetune, aliases, note)."""
    return {m["id"]: m for m in spec()["methods"]}


def _families() -> tuple[str, ...]:
    return MODEL_FAMILIES


# ---------------------------------------------------------------------------------------
# Normalising the published rows
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    """One result, normalised. `ratio` is value / baseline (None without a baseline)."""

    idx: int                 # 0-based row of the CSV (header not counted); -1 for measured rows
    model: str
    family: str              # one of engine.vocab.MODEL_FAMILIES, or "other"
    params_b: float
    method: str              # method id (accuracy_model.yaml)
    w_bits: float
    a_bits: float
    group: object            # int group size, "per-channel", "vector" (codebook/lattice), or None
    finetune: str            # none | lora | qlora | qat
    metric: str              # the metric as published
    metric_class: str        # ppl | zeroshot | mmlu
    value: float
    baseline: float | None
    source: str
    method_raw: str = ""
    finetune_raw: str = ""
    group_raw: str = ""
    notes: str = ""
    instruct: bool = False
    excluded: str = ""       # reason this row is left out of the fit ("" = used)
    flags: tuple = ()        # caveats of a row that is used
    a_granularity: str = "per-token"   # activation scale: per-token | per-tensor-dynamic | per-tensor-static

    @property
    def ratio(self) -> float | None:
        if self.baseline in (None, 0) or not math.isfinite(self.value):
            return None
        return self.value / self.baseline

    @property
    def chance(self) -> float:
        return float(spec()["metrics"].get(self.metric, {}).get("chance", 0.0))

    @property
    def corpus(self) -> str:
        return spec()["metrics"].get(self.metric, {}).get("corpus", "")

    def to_dict(self) -> dict:
        return {"row": self.idx, "model": self.model, "family": self.family, "params_b": self.params_b,
                "method": self.method, "w_bits": self.w_bits, "a_bits": self.a_bits, "group": self.group,
                "finetune": self.finetune, "metric": self.metric, "value": self.value,
                "baseline": self.baseline, "source": self.source,
                **({"a_granularity": self.a_granularity} if self.a_bits < 16 else {}),
                **({"excluded": self.excluded} if self.excluded else {}),
                **({"flags": list(self.flags)} if self.flags else {})}


def parse_group(text: str):
    """The CSV's group_size strings -> int, "per-channel", "vector" or None.

    "128" -> 128; "NF4 (64)" -> 64 (bitsandbytes blocksize); "per-channel" -> "per-channel";
    "vector-wise" -> "per-channel" (LLM.int8()'s row-wise scales); "vector ...", "vector
    codebook 1x16", "vector/incoherence" -> "vector" (codebook / lattice, no scalar groups);
    "n/a" or empty -> None.
    """
    t = (text or "").strip().lower()
    if t in ("", "n/a", "na", "none"):
        return None
    if t in ("per-channel", "per channel", "channel", "vector-wise", "row-wise"):
        return "per-channel"
    if t.startswith("vector"):
        return "vector"
    m = re.fullmatch(r"(?:[a-z][a-z0-9]*\s*)?\(?\s*g?(\d+)\s*\)?", t)
    if m:
        return int(m.group(1))
    raise ValueError(f"unparsed group_size {text!r}")


def finetune_class(text: str) -> str:
    """The CSV's free-text finetune column -> none | lora | qlora | qat (first rule that matches)."""
    t = (text or "").strip().lower()
    for rule in spec()["finetune"]["csv"]:
        if rule["contains"] in t:
            return rule["class"]
    return "none"


@functools.lru_cache(maxsize=None)
def _alias_map() -> dict[str, str]:
    out = {}
    for m in spec()["methods"]:
        out[m["id"].lower()] = m["id"]
        for a in m.get("aliases", []):
            out[str(a).strip().lower()] = m["id"]
    return out


def method_id(text: str) -> str | None:
    """A published method name (or an id) -> method id, None if unknown."""
    return _alias_map().get(str(text).strip().lower())


def family_of(model: str) -> str:
    for rule in spec()["families"]:
        if re.search(rule["match"], model.strip(), flags=re.IGNORECASE):
            return rule["family"]
    return "other"


def _match(rule: dict, row: Row) -> bool:
    def has(value, wanted):
        wanted = wanted if isinstance(wanted, list) else [wanted]
        return value in wanted
    if "notes" in rule and rule["notes"].lower() not in row.notes.lower():
        return False
    if "source" in rule and rule["source"].lower() not in row.source.lower():
        return False
    if "metric_class" in rule and not has(row.metric_class, rule["metric_class"]):
        return False
    if "finetune_class" in rule and not has(row.finetune, rule["finetune_class"]):
        return False
    if "method" in rule and not has(row.method, rule["method"]):
        return False
    if "instruct" in rule and row.instruct != rule["instruct"]:
        return False
    return True


def _apply_rules(row: Row) -> Row:
    """Exclusion and flag rules of the YAML, then the ones every row obeys."""
    reasons, flags = [], []
    for rule in spec()["rules"]:
        if _match(rule, row):
            (reasons if rule["action"] == "exclude" else flags).append(rule["reason"])
    if row.baseline is None:
        reasons.append("no 16-bit baseline reported")
    if not math.isfinite(row.value):
        reasons.append("reported as NaN (the method failed) in the source")
    if row.method is None:
        reasons.append(f"unknown method {row.method_raw!r}")
    if row.metric_class is None:
        reasons.append(f"unknown metric {row.metric!r}")
    if row.metric_class and row.corpus.endswith("longctx"):
        reasons.append("long-context perplexity, not comparable to the 2k-context rows")
    if reasons:
        return replace(row, excluded=reasons[0], flags=tuple(flags))
    return replace(row, flags=tuple(flags))


def _float(text) -> float | None:
    t = str(text).strip()
    if t == "":
        return None
    try:
        return float(t)
    except ValueError:
        return float("nan")


def act_granularities() -> tuple[str, ...]:
    return tuple(spec()["activations"]["granularities"])


def row_granularity(raw: dict) -> str:
    """A CSV record's activation granularity: its a_granularity column, else the one its method
    string states (accuracy_model.yaml activations.by_method: SmoothQuant's table of baselines),
    else the default (per-token: what every weight-activation method of the CSV uses)."""
    act = spec()["activations"]
    g = (raw.get("a_granularity") or "").strip() or act["by_method"].get(str(raw["method"]).strip()) \
        or act["default"]
    if g not in act["granularities"]:
        raise ValueError(f"unknown activation granularity {g!r} (known: {', '.join(act['granularities'])})")
    return g


def normalise(raw: dict, idx: int) -> Row:
    """One CSV record (a dict of its columns) -> Row, with exclusions and flags applied."""
    metric = raw["metric"].strip()
    mspec = spec()["metrics"].get(metric)
    value = _float(raw["value"])
    row = Row(idx=idx, model=raw["model"].strip(), family=family_of(raw["model"]),
              params_b=float(raw["params_b"]), method=method_id(raw["method"]),
              w_bits=float(raw["w_bits"]), a_bits=float(raw["a_bits"] or 16),
              group=parse_group(raw["group_size"]), finetune=finetune_class(raw["finetune"]),
              metric=metric, metric_class=mspec["class"] if mspec else None,
              value=float("nan") if value is None else value, baseline=_float(raw["baseline_fp16"]),
              source=raw["source"].strip(), method_raw=raw["method"], finetune_raw=raw["finetune"],
              group_raw=raw["group_size"], notes=raw.get("notes", "") or "",
              instruct=raw["model"].strip().lower().endswith("-instruct")
              or "-instruct-" in raw["model"].strip().lower(),
              a_granularity=row_granularity(raw))
    return _apply_rules(row)


@functools.lru_cache(maxsize=None)
def load_evidence() -> tuple[Row, ...]:
    """Every row of the published CSVs, normalised (excluded rows included, with their reason).
    The shared verbatim copy first (idx = its row), then the rows added here (idx continues)."""
    records = []
    for name in (CSV_FILE, *EXTRA_CSV_FILES):
        with open(PRESETS_DIR / name, encoding="utf-8", newline="") as f:
            records.extend(csv.DictReader(f))
    return tuple(normalise(r, i) for i, r in enumerate(records))


# ---------------------------------------------------------------------------------------
# The retention mapping: accuracy <-> damage D (nats of WikiText-2 perplexity)
# ---------------------------------------------------------------------------------------

def _study(source: str) -> str:
    """'Chen et al. 2024 EfficientQAT arXiv:...' -> 'Chen et al. 2024 EfficientQAT' (one paper)."""
    m = re.match(r"^(.*? et al\. \d{4} [A-Za-z0-9#.\-]+)", source)
    return m.group(1).rstrip(".") if m else source


def _config_key(r: Row) -> tuple:
    """Rows with this key describe the same quantized model (codebook variants kept apart)."""
    variant = " ".join(sorted(re.findall(r"[a-z0-9]+", r.group_raw.lower())))
    return (r.model.lower(), r.method, r.w_bits, r.a_bits, r.group, r.finetune, variant)


@dataclass(frozen=True)
class Mapping:
    """retention = c + (1 - c) * exp(-k[metric_class] * (params_b / 7) ** -kappa * D)."""

    k: dict                  # metric class (zeroshot, mmlu) -> k
    kappa: float
    pairs: int               # accuracy rows paired with a WikiText-2 row of the same model
    rms: float               # RMS retention error on those pairs
    rms_ln_damage: float = 0.0   # the same error as ln(D + eps): implied vs perplexity damage

    def rate(self, metric_class: str, params_b: float) -> float:
        return self.k[metric_class] * (params_b / 7.0) ** (-self.kappa)

    def retention(self, damage: float, chance_frac: float, metric_class: str, params_b: float) -> float:
        return chance_frac + (1 - chance_frac) * math.exp(-self.rate(metric_class, params_b) * damage)

    def damage(self, retention: float, chance_frac: float, metric_class: str, params_b: float, d_max: float) -> float:
        """The inverse: the damage an accuracy ratio implies (0 at or above 1, d_max at chance)."""
        f = (retention - chance_frac) / (1 - chance_frac)
        if f >= 1:
            return 0.0
        k = self.rate(metric_class, params_b)
        if f <= math.exp(-k * d_max):
            return d_max
        return -math.log(f) / k


def _pairs(rows) -> list[tuple[Row, float]]:
    """Accuracy rows with the WikiText-2 damage of the same configuration (same paper first)."""
    ppl = {}
    for r in rows:
        if r.metric_class == "ppl" and r.corpus == "wikitext2":
            ppl.setdefault(_config_key(r), []).append(r)
    out = []
    for r in rows:
        if r.metric_class in ("zeroshot", "mmlu"):
            cands = ppl.get(_config_key(r))
            if cands:
                same = [c for c in cands if _study(c.source) == _study(r.source)]
                out.append((r, math.log((same or cands)[0].ratio)))
    return out


def _grid(lo, hi, n, log=False):
    if log:
        return [math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * i / (n - 1)) for i in range(n)]
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def fit_mapping(rows) -> Mapping:
    """Grid-search kappa and k (zero-shot) on the pairs, then k (MMLU) with that kappa."""
    cfg = spec()["fit"]["mapping"]
    k0, k1, nk = cfg["k"]
    ks = _grid(k0, k1, int(nk), log=True)
    a0, a1, step = cfg["kappa"]
    kappas = _grid(a0, a1, int(round((a1 - a0) / step)) + 1)
    pairs = _pairs(rows)
    prepared = [(r.metric_class, r.chance / r.baseline, r.params_b / 7.0, d, r.ratio) for r, d in pairs]

    def sse(cls, k, kappa):
        return sum((c + (1 - c) * math.exp(-k * p ** (-kappa) * d) - ret) ** 2
                   for mc, c, p, d, ret in prepared if mc == cls)

    def refine(cls, k, kappa):
        """Golden-section search on ln k between the grid neighbours of the best grid point."""
        step = (math.log(k1) - math.log(k0)) / (nk - 1)
        lo, hi = math.log(k) - step, math.log(k) + step
        g = (math.sqrt(5) - 1) / 2
        for _ in range(30):
            a, b = hi - g * (hi - lo), lo + g * (hi - lo)
            if sse(cls, math.exp(a), kappa) < sse(cls, math.exp(b), kappa):
                hi = b
            else:
                lo = a
        return math.exp((lo + hi) / 2)

    zs = [x for x in prepared if x[0] == "zeroshot"]
    if not zs:
        raise InputError("the evidence has no zero-shot rows paired with perplexity rows: cannot fit the mapping")
    _, kz, kappa = min((sse("zeroshot", k, a), k, a) for a in kappas for k in ks)
    k = {"zeroshot": refine("zeroshot", kz, kappa)}
    kz = k["zeroshot"]
    has_mmlu = any(x[0] == "mmlu" for x in prepared)
    k["mmlu"] = refine("mmlu", min((sse("mmlu", kk, kappa), kk) for kk in ks)[1], kappa) if has_mmlu else kz
    err = sse("zeroshot", kz, kappa) + (sse("mmlu", k["mmlu"], kappa) if has_mmlu else 0.0)
    mapping = Mapping(k=k, kappa=kappa, pairs=len(prepared), rms=math.sqrt(err / len(prepared)))
    eps, d_max = spec()["fit"]["eps"], spec()["fit"]["d_max"]
    ln_err = [math.log(mapping.damage(ret, c, mc, 7.0 * p, d_max) + eps) - math.log(max(d, 0.0) + eps)
              for mc, c, p, d, ret in prepared]
    return replace(mapping, rms_ln_damage=math.sqrt(sum(e * e for e in ln_err) / len(ln_err)))


# ---------------------------------------------------------------------------------------
# The damage model: ln(D + eps) = sum of explainable terms, ridge least squares
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Point:
    """A configuration to predict (a request, or a published row's configuration)."""

    method: str
    w_bits: float
    a_bits: float
    group: object            # int, "per-channel", "vector"
    params_b: float
    family: str
    finetune: str            # the effective class (a method's own training included)
    corpus: str = "wikitext2"
    a_granularity: str = "per-token"

    @classmethod
    def of(cls, r: Row) -> "Point":
        return cls(r.method, r.w_bits, r.a_bits, r.group, r.params_b, r.family,
                   effective_finetune(r.method, r.finetune), r.corpus or "wikitext2", r.a_granularity)


def effective_finetune(method: str, finetune: str) -> str:
    """A method that trains by itself (QAT, QA-LoRA) raises the fine-tuning class to its own."""
    return methods()[method].get("finetune") or finetune


def _granularity(group) -> float:
    """log2(group / 128): 0 for g128, -1 for g64, +5 for per-channel (one group per 4096-wide row)."""
    if group in (None, "vector"):
        return 0.0
    if group == "per-channel":
        group = spec()["fit"]["per_channel_group"]
    return math.log2(group / 128)


def effective_bits(w_bits: float, group) -> float:
    """Bits per weight with the group metadata (fp16 scale + zero per group) spread over the group."""
    return w_bits + (spec()["fit"]["scale_bits"] / group if isinstance(group, int) else 0.0)


def features(p: Point) -> dict[str, float]:
    """The named terms of one configuration (a sparse row of the design matrix)."""
    cls = methods()[p.method]["class"]
    b = effective_bits(p.w_bits, p.group) - 4.0
    g = _granularity(p.group)
    f = {"intercept": 1.0, f"class:{cls}": 1.0, f"method:{p.method}": 1.0,
         "bits": b, f"bits|{cls}": b, "collapse": max(0.0, 3.0 - p.w_bits) ** 2,
         "group": g, f"group|{cls}": g, "size": math.log(p.params_b / 7.0), f"family:{p.family}": 1.0}
    if p.a_bits < 16:
        f["act_base"] = 1.0
        f["act_bits"] = max(0.0, 8.0 - p.a_bits)
        if methods()[p.method]["act"] == "naive":
            # plain integer activations: a scale that must span an outlier the grid cannot hold
            # (act_naive) or one that need not (act_token): see outlier_spanned
            f["act_naive" if outlier_spanned(p) else "act_token"] = 1.0
    if p.finetune in spec()["finetune"]["recovery"]:
        f[f"ft:{p.finetune}"] = 1.0
    if p.corpus not in ("wikitext2", ""):
        f[f"corpus:{p.corpus}"] = 1.0
    return {k: v for k, v in f.items() if v != 0.0 or k == "intercept"}


def outlier_spanned(p: Point) -> bool:
    """Whether plain integer activations of this configuration put an outlier inside every
    scale: a per-tensor scale spans all tokens, so the few tokens with massive activations
    (hundreds to thousands of times the median, in every LLM family studied) set the step for
    all of them; a per-token scale isolates those tokens, and spans an outlier only where whole
    channels carry it for every token (the emergent outlier features of OPT from 6.7B on:
    accuracy_model.yaml activations.outlier_channels)."""
    if p.a_granularity != "per-token":
        return True
    return any(p.family == c["family"] and p.params_b >= c["from_params_b"]
               for c in spec()["activations"]["outlier_channels"])


def _penalty(name: str) -> float:
    ridge = spec()["fit"]["ridge"]
    best = max((p for p in ridge if name.startswith(p)), key=len)
    return float(ridge[best])


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (the systems are ~50 x 50)."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for c in range(n):
        piv = max(range(c, n), key=lambda r: abs(m[r][c]))
        m[c], m[piv] = m[piv], m[c]
        if abs(m[c][c]) < 1e-12:
            raise ArithmeticError("singular system")
        for r in range(c + 1, n):
            f = m[r][c] / m[c][c]
            if f:
                mr, mc = m[r], m[c]
                for j in range(c, n + 1):
                    mr[j] -= f * mc[j]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][j] * x[j] for j in range(r + 1, n))) / m[r][r]
    return x


def ridge(rows_x: list[dict], y: list[float], signs: dict | None = None) -> dict[str, float]:
    """min sum (y - x.beta)^2 + sum lambda_j beta_j^2, with sign constraints by active set.

    A constrained coefficient that comes out with the wrong sign is pinned at 0 and the rest
    refitted, until none is wrong.
    """
    signs = signs or {}
    names = sorted({k for x in rows_x for k in x})
    pinned: set[str] = set()
    while True:
        free = [n for n in names if n not in pinned]
        idx = {n: i for i, n in enumerate(free)}
        p = len(free)
        xtx = [[0.0] * p for _ in range(p)]
        xty = [0.0] * p
        for x, yi in zip(rows_x, y):
            items = [(idx[k], v) for k, v in x.items() if k in idx]
            for i, vi in items:
                xty[i] += vi * yi
                row = xtx[i]
                for j, vj in items:
                    row[j] += vi * vj
        for n, i in idx.items():
            xtx[i][i] += _penalty(n)
        beta = dict(zip(free, _solve(xtx, xty)))
        wrong = [n for n, s in signs.items() if n in beta and beta[n] * s < 0]
        if not wrong:
            return {**beta, **{n: 0.0 for n in pinned}}
        pinned.update(wrong)


@dataclass
class Fit:
    """A fitted model: coefficients, the mapping, and each used row's residual."""

    beta: dict
    mapping: Mapping
    rows: list               # used rows (Row)
    points: list             # their Point
    y: list                  # observed ln(D + eps)
    yhat: list               # fitted ln(D + eps)
    rms: float               # residual RMS in ln(D + eps)
    chance_ref: float        # c of the request's retention (reference metric)
    by_method: dict = field(default_factory=dict)   # method -> rows used
    by_family: dict = field(default_factory=dict)

    def predict(self, p: Point) -> float:
        """ln(D + eps) of a configuration."""
        return _ln_damage(self.beta, features(p))


def _ln_damage(beta: dict, x: dict) -> float:
    """ln(D + eps) with D = D_weights + D_activations, each exp(sum of its terms) - eps."""
    yw = sum(beta.get(k, 0.0) * v for k, v in x.items() if not k.startswith("act"))
    d = damage_of(yw)
    if "act_base" in x:
        d += damage_of(sum(beta.get(k, 0.0) * v for k, v in x.items() if k.startswith("act")))
    return math.log(min(d, spec()["fit"]["d_max"]) + spec()["fit"]["eps"])


def observed_damage(r: Row, mapping: Mapping) -> float:
    """A row's damage in nats: ln(ratio) for perplexity, through the mapping for accuracy."""
    d_max = spec()["fit"]["d_max"]
    if r.metric_class == "ppl":
        return min(math.log(r.ratio), d_max)
    return mapping.damage(r.ratio, r.chance / r.baseline, r.metric_class, r.params_b, d_max)


def fit(rows, terms: tuple[str, ...] | None = None) -> Fit:
    """Fit the mapping and the damage model on the used rows of `rows`.

    `terms`: keep only the terms whose names start with one of these prefixes (the benchmark
    uses it to compare the full model with a bits-only one); None keeps all.
    """
    used = [r for r in rows if not r.excluded]
    mapping = fit_mapping(used)
    eps = spec()["fit"]["eps"]
    points = [Point.of(r) for r in used]
    y = [math.log(max(observed_damage(r, mapping), 0.0) + eps) for r in used]
    xs = [features(p) for p in points]
    if terms is not None:
        xs = [{k: v for k, v in x.items() if k.startswith(terms)} for x in xs]
    signs = spec()["fit"]["sign"]
    # Stage 1: weight-only rows fit the weight terms. Stage 2: rows that also quantize
    # activations fit the activation terms on the damage stage 1 leaves unexplained
    # (D = D_weights + D_activations), so the few W8A8/W4A4 rows cannot bend the weight terms.
    wo = [i for i, p in enumerate(points) if p.a_bits >= 16]
    wa = [i for i, p in enumerate(points) if p.a_bits < 16]
    beta = ridge([{k: v for k, v in xs[i].items() if not k.startswith("act")} for i in wo],
                 [y[i] for i in wo], signs)
    x2 = [{k: v for k, v in xs[i].items() if k.startswith("act")} for i in wa]
    if any(x2):
        def weight_damage(x):
            return damage_of(sum(beta.get(k, 0.0) * v for k, v in x.items() if not k.startswith("act")))
        rest = [math.log(max(math.exp(y[i]) - eps - weight_damage(xs[i]), 0.0) + eps) for i in wa]
        beta.update(ridge(x2, rest, signs))
    yhat = [_ln_damage(beta, x) for x in xs]
    rms = math.sqrt(sum((a - b) ** 2 for a, b in zip(y, yhat)) / len(y))
    ref = spec()["reference_metric"]
    cs = sorted(r.chance / r.baseline for r in used if r.metric == ref)
    chance_ref = cs[len(cs) // 2] if cs else 0.5
    by_method, by_family = {}, {}
    for r in used:
        by_method[r.method] = by_method.get(r.method, 0) + 1
        by_family[r.family] = by_family.get(r.family, 0) + 1
    return Fit(beta=beta, mapping=mapping, rows=used, points=points, y=y, yhat=yhat, rms=rms,
               chance_ref=chance_ref, by_method=by_method, by_family=by_family)


@functools.lru_cache(maxsize=1)
def default_fit() -> Fit:
    """The model fitted on every usable published row (cached: fitted once per process)."""
    return fit(load_evidence())


# ---------------------------------------------------------------------------------------
# Predicting: damage -> ppl_ratio, retention, interval, evidence
# ---------------------------------------------------------------------------------------

def damage_of(y: float) -> float:
    """ln(D + eps) -> D, clipped to [0, d_max]."""
    f = spec()["fit"]
    return min(max(math.exp(y) - f["eps"], 0.0), f["d_max"])


def predict_row(model: Fit, r: Row) -> tuple[float, float, float]:
    """The model's value of a row's own ratio with its 80% interval: (point, low, high); the
    ppl ratio for perplexity rows, the retention for accuracy rows (with the row's own chance)."""
    p = Point.of(r)
    y = model.predict(p)
    spread, _, _ = _prior_spread(model, p, y, _neighbours(model, p))
    z = spec()["fit"]["interval"]["z"]
    if r.metric_class == "ppl":
        return tuple(math.exp(damage_of(y + z * spread * t)) for t in (0, -1, 1))
    spread = math.hypot(spread, model.mapping.rms_ln_damage)
    ds = [damage_of(y), damage_of(y - z * spread), damage_of(y + z * spread)]
    ret = [model.mapping.retention(d, r.chance / r.baseline, r.metric_class, r.params_b) for d in ds]
    return ret[0], ret[2], ret[1]


def _distance2(a: Point, b: Point) -> float:
    """Squared distance between two configurations, in rough 'one unit = clearly different'."""
    ms = methods()
    d = 0.0 if a.method == b.method else (1.0 if ms[a.method]["class"] == ms[b.method]["class"] else 4.0)
    d += (effective_bits(a.w_bits, a.group) - effective_bits(b.w_bits, b.group)) ** 2
    d += (_granularity(a.group) - _granularity(b.group)) ** 2 / 4.0
    d += (math.log(a.params_b / b.params_b) / 1.5) ** 2
    d += 0.0 if a.family == b.family else 1.0
    d += 0.0 if a.finetune == b.finetune else 1.0
    d += 0.0 if (a.a_bits < 16) == (b.a_bits < 16) else 2.0
    d += ((min(a.a_bits, 16) - min(b.a_bits, 16)) / 4.0) ** 2
    if a.a_bits < 16 and b.a_bits < 16 and a.a_granularity != b.a_granularity:
        d += 1.0
    return d


def _neighbours(model: Fit, p: Point) -> list[tuple[float, int]]:
    """(weight, index) of every used row, nearest first; weight = exp(-distance^2 / 2)."""
    ws = [(math.exp(-_distance2(p, q) / 2.0), i) for i, q in enumerate(model.points)]
    ws.sort(key=lambda t: -t[0])
    return ws


def _local_spread(model: Fit, p: Point, neigh) -> tuple[float, float]:
    """(spread of ln damage near p, effective count of rows near p)."""
    cfg = spec()["fit"]["interval"]
    k0 = cfg["prior_count"]
    sw = sum(w for w, _ in neigh)
    swr = sum(w * (model.y[i] - model.yhat[i]) ** 2 for w, i in neigh)
    var = (swr + k0 * model.rms ** 2) / (sw + k0)
    if p.method not in model.by_method:
        var += cfg["extrapolate_method"] ** 2
    if p.family not in model.by_family:
        var += cfg["extrapolate_family"] ** 2
    return math.sqrt(var * (1.0 + 1.0 / (sw + 1.0))), sw


def _prior_spread(model: Fit, p: Point, y: float, neigh) -> tuple[float, float, dict]:
    """(spread of ln damage, effective count of rows near p, the evidence basis): the local spread,
    widened by the distance from the evidence and a research method's maturity, never below the
    spread of the rows it rests on, and for a method without rows of its own reaching the worst of them."""
    spread, near = _local_spread(model, p, neigh)
    basis = _evidence_basis(model, p, neigh)
    spread = math.sqrt(spread ** 2 + basis.pop("extra_var"))
    spread = max(spread, basis["floor_ln_damage"])
    if basis["cover_ln_damage"] is not None:
        spread = max(spread, (basis["cover_ln_damage"] - y) / spec()["fit"]["interval"]["z"])
    return spread, near, basis


def _evidence_basis(model: Fit, p: Point, neigh) -> dict:
    """What the estimate rests on and how far it is from it (docs/accuracy.md "Honest intervals").

    The nearest published row's squared configuration distance (method, bits, group, size, family,
    fine-tuning, activations: ``_distance2``) beyond ``free_distance`` adds ``per_distance``^2 per
    unit to the variance; a method of maturity research adds ``research_method``^2; the spread
    is never below the spread of the residuals of the ``evidence_floor_rows`` nearest rows (their
    values carried to the request: the evidence disagrees with itself at least that much); and a
    method with no rows of its own gets an interval that reaches the worst of those rows
    (``cover_ln_damage``: without its own evidence it cannot claim to beat all of it).
    ``text``: 'extrapolated from N rows of <nearest>' or 'from N rows of <nearest>'."""
    cfg = spec()["fit"]["interval"]
    d2 = [(_distance2(p, model.points[i]), i) for _, i in neigh[:max(1, cfg.get("evidence_floor_rows", 8))]]
    d2.sort()
    d2_near = d2[0][0] if d2 else math.inf
    extra = cfg.get("per_distance", 0.0) ** 2 * max(0.0, d2_near - cfg.get("free_distance", 0.0))
    research = methods()[p.method].get("maturity") == "research"
    if research:
        extra += cfg.get("research_method", 0.0) ** 2
    rest = [i for _, i in d2]
    res = [model.y[i] - model.yhat[i] for i in rest]
    floor = 0.0
    if len(res) >= 2:
        mean = sum(res) / len(res)
        floor = math.sqrt(sum((r - mean) ** 2 for r in res) / (len(res) - 1))
    near = model.rows[d2[0][1]] if d2 else None
    same = [model.rows[i] for i in rest if near and (model.rows[i].method, model.rows[i].w_bits)
            == (near.method, near.w_bits)]
    label = ""
    if near:
        sizes = sorted({r.params_b for r in same})
        fams = sorted({r.family for r in same})
        label = (f"{near.method} {near.w_bits:g}-bit" + (f" {near.finetune}" if near.finetune not in ("", "none") else "")
                 + f" ({', '.join(fams)}, {sizes[0]:g}" + (f"-{sizes[-1]:g}" if sizes[-1] != sizes[0] else "") + "B)")
    extrapolated = (d2_near > cfg.get("free_distance", 0.0)) or p.method not in model.by_method
    cover = max(model.y[i] for i in rest) if rest and p.method not in model.by_method else None
    text = (f"{'extrapolated from' if extrapolated else 'from'} {len(same)} row{'s' if len(same) != 1 else ''} of "
            f"{label}" + (f" (nearest at configuration distance {math.sqrt(d2_near):.1f})" if extrapolated else "")
            + ("; research method: interval widened" if research else "")) if near else "no published rows"
    return {"nearest_distance": round(math.sqrt(d2_near), 3) if d2 else None, "rows": len(same),
            "nearest": label, "extrapolated": extrapolated, "research": research,
            "floor_ln_damage": round(floor, 4), "cover_ln_damage": round(cover, 4) if cover is not None else None,
            "extra_var": extra, "text": text}


def _measured_metric(metric) -> str | None:
    """A measured row's metric -> a metric id of accuracy_model.yaml (None if unknown)."""
    ms = spec()["measured"]
    alias = {"ppl": ms["ppl_metric"], "perplexity": ms["ppl_metric"], "zeroshot": spec()["reference_metric"],
             **{t: ms["task_metric"] for t in ms["task_metrics"]}}
    metric = alias.get(metric, metric)
    return metric if metric in spec()["metrics"] else None


def _measured_rows(measured, request: dict) -> tuple[list[Row], list[dict]]:
    """Measured results of runs -> (Rows with source 'run:<id>', rows left out with why).

    Missing config keys are the request's. Left out: rows marked ``comparable: False`` (a run
    that fine-tuned: its 16-bit reference is the base before fine-tuning, so the ratio mixes
    the fine-tuning gain with the quantization loss, the published rows' exclusion rule) and
    rows whose 16-bit baseline is 0 (no ratio)."""
    out, skipped = [], []
    for i, m in enumerate(measured or []):
        if not isinstance(m, dict):
            raise InputError(f"measured[{i}] must be a mapping with run_id, metric, value, baseline", field="measured")
        run_id = m.get("run_id", m.get("id"))
        metric = _measured_metric(m.get("metric"))
        if run_id is None or metric is None:
            names = ["ppl", "perplexity", "zeroshot", *spec()["measured"]["task_metrics"], *spec()["metrics"]]
            raise InputError(f"measured[{i}]: needs run_id and a metric among {', '.join(names)}", field="measured")
        try:
            value, baseline = float(m["value"]), float(m["baseline"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"measured[{i}]: value and baseline must be numbers", field="measured")
        cls = spec()["metrics"][metric]["class"]
        if not (value > 0 or (cls != "ppl" and value == 0)) or baseline < 0 or (cls == "ppl" and baseline == 0):
            raise InputError(f"measured[{i}]: value and baseline must be > 0 (a task score may be 0)",
                             field="measured")
        if m.get("comparable") is False:
            skipped.append({"run_id": run_id, "metric": m.get("metric"),
                            "why": m.get("why") or "not comparable with a quantization loss"})
            continue
        if baseline == 0:
            skipped.append({"run_id": run_id, "metric": m.get("metric"),
                            "why": "the 16-bit model scores 0 on this metric: no ratio"})
            continue
        group = m.get("group", request["group"])
        method = method_id(m.get("method", request["method"])) or request["method"]
        out.append(Row(idx=-1, model=str(m.get("model", f"run {run_id}")), family=m.get("family", request["family"]),
                       params_b=float(m.get("params_b", request["params_b"])), method=method,
                       w_bits=float(m.get("w_bits", request["w_bits"])),
                       a_bits=float(m.get("a_bits", request["a_bits"])), group=group,
                       finetune=m.get("finetune", request["finetune"]), metric=metric,
                       metric_class=cls, value=value, baseline=baseline,
                       source=f"run:{run_id}", notes=str(m.get("notes", "")),
                       a_granularity=m.get("act_granularity", request["act_granularity"])))
    return out, skipped


def validate_request(family, params_b, method, w_bits, a_bits, group_size, per_channel, finetune,
                     act_granularity=None) -> dict:
    from engine.errors import choices
    fam = str(family or "").strip().lower()
    if fam not in _families():
        raise choices("family", family, _families())
    try:
        params_b = float(params_b)
    except (TypeError, ValueError):
        raise InputError(f"params_b must be a number of billions of parameters, got {params_b!r}", field="params_b")
    if not (math.isfinite(params_b) and 0 < params_b <= 10000):
        raise InputError(f"params_b must be > 0 (billions of parameters, e.g. 7 or 0.5), got {params_b!r}",
                         field="params_b")
    mid = str(method or "").strip().lower()
    if mid not in methods():
        raise choices("method", method, methods())
    for name, val in (("w_bits", w_bits), ("a_bits", a_bits)):
        try:
            ok = 1 <= float(val) <= 16
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise InputError(f"{name} must be a number of bits from 1 to 16, got {val!r}", field=name)
    ft = str(finetune or "none").strip().lower()
    if ft not in FINETUNES:
        raise choices("finetune", finetune, FINETUNES)
    ag = str(act_granularity or spec()["activations"]["default"]).strip().lower()
    if ag not in act_granularities():
        raise choices("act_granularity", act_granularity, act_granularities())
    notes = []
    if group_size is not None and per_channel:
        raise InputError("give either group_size (--group-size) or per_channel (--per-channel), not both",
                         field="group_size")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, (int, float)) or group_size != int(group_size) \
                or int(group_size) <= 0 or int(group_size) & (int(group_size) - 1):
            raise InputError(f"group_size must be a positive power of two (32, 64, 128, ...), got {group_size!r}",
                             field="group_size")
        group = int(group_size)
    elif per_channel:
        group = "per-channel"
    else:
        group = methods()[mid].get("default_group", 128)
        if methods()[mid]["class"] == "vector":
            group = "vector"
        if mid != "none":
            notes.append(f"no group size given: {group} assumed for {mid}")
    if methods()[mid]["class"] == "vector" and group != "vector":
        notes.append(f"{mid} is a vector/codebook quantizer: the group size does not apply")
        group = "vector"
    return {"family": fam, "params_b": params_b, "method": mid, "w_bits": float(w_bits), "a_bits": float(a_bits),
            "group": group, "finetune": ft, "act_granularity": ag, "notes": notes}


def _term_list(model: Fit, p: Point) -> list[dict]:
    return [{"term": k, "x": round(v, 4), "coef": round(model.beta.get(k, 0.0), 4),
             "contribution": round(model.beta.get(k, 0.0) * v, 4)}
            for k, v in features(p).items() if k in model.beta]


def estimate_accuracy(family, params_b, method, w_bits, a_bits=16, group_size=None, per_channel=False,
                      finetune="none", measured=None, act_granularity=None) -> dict:
    """Retention (5-task zero-shot average, quantized / 16-bit) and WikiText-2 ppl ratio, with an
    80% interval and the evidence behind them. `measured`: results of runs (dicts with run_id,
    metric, value, baseline, and any of the config keys that differ from the request).
    `act_granularity`: the activation scale's granularity when a_bits < 16 (per-token |
    per-tensor-dynamic | per-tensor-static; default per-token, what torchao's, ExecuTorch's and
    vLLM's dynamic int8 activations use)."""
    req = validate_request(family, params_b, method, w_bits, a_bits, group_size, per_channel, finetune,
                           act_granularity)
    notes = req.pop("notes")
    model = default_fit()
    inputs = {"family": req["family"], "params_b": req["params_b"], "method": req["method"],
              "w_bits": req["w_bits"], "a_bits": req["a_bits"], "group": req["group"], "finetune": req["finetune"],
              **({"act_granularity": req["act_granularity"]} if req["a_bits"] < 16 else {})}
    if req["method"] == "none" or (req["w_bits"] >= 16 and req["a_bits"] >= 16):
        return {"retention": 1.0, "ppl_ratio": 1.0, "low": 1.0, "high": 1.0, "ppl_low": 1.0, "ppl_high": 1.0,
                "damage_nats": 0.0, "inputs": inputs, "interval": "exact",
                "source": "definition: the 16-bit model is its own reference",
                "evidence": {"count": 0, "published": 0, "measured": 0, "sources": [], "published_sources": [],
                             "measured_runs": [], "closest": [], "terms": []},
                "notes": notes + ["16-bit weights and activations: nothing is quantized"]}
    eft = effective_finetune(req["method"], req["finetune"])
    if eft != req["finetune"]:
        notes.append(f"{req['method']} trains by itself: fine-tuning class {eft!r} used instead of {req['finetune']!r}")
    p = Point(req["method"], req["w_bits"], req["a_bits"], req["group"], req["params_b"], req["family"], eft,
              a_granularity=req["act_granularity"])
    cfg = spec()["fit"]
    y = model.predict(p)
    neigh = _neighbours(model, p)
    spread, near, basis = _prior_spread(model, p, y, neigh)

    # measured runs: each pulls the estimate toward itself, by precision, as close as it is
    runs, skipped = _measured_rows(measured, {**req, "finetune": req["finetune"]})
    if runs:
        prec = 1.0 / spread ** 2
        acc = y * prec
        for r in runs:
            w = math.exp(-_distance2(p, Point.of(r)) / 2.0) / cfg["measured_sigma"] ** 2
            y_obs = math.log(max(observed_damage(r, model.mapping), 0.0) + cfg["eps"])
            y_row = model.predict(Point.of(r))
            acc += w * (y + (y_obs - y_row))       # the run's residual, carried to the request
            prec += w
        y, spread = acc / prec, 1.0 / math.sqrt(prec)

    z = cfg["interval"]["z"]
    d, d_lo, d_hi = damage_of(y), damage_of(y - z * spread), damage_of(y + z * spread)
    # retention also carries the mapping's own error (ln damage implied by accuracy vs by ppl)
    spread_ret = spread if runs else math.hypot(spread, model.mapping.rms_ln_damage)
    r_lo, r_hi = damage_of(y - z * spread_ret), damage_of(y + z * spread_ret)
    ret = lambda dd: model.mapping.retention(dd, model.chance_ref, "zeroshot", req["params_b"])
    retention, low, high = ret(d), ret(r_hi), ret(r_lo)

    closest = []
    for w, i in neigh[:5]:
        r = model.rows[i]
        closest.append({"model": r.model, "method": r.method, "w_bits": r.w_bits, "a_bits": r.a_bits,
                        "group": r.group, "finetune": r.finetune, "metric": r.metric, "value": r.value,
                        "baseline": r.baseline, "source": r.source, "weight": round(w, 3)})
    for r in runs:
        closest.insert(0, {"model": r.model, "method": r.method, "w_bits": r.w_bits, "a_bits": r.a_bits,
                           "group": r.group, "finetune": r.finetune, "metric": r.metric, "value": r.value,
                           "baseline": r.baseline, "source": r.source, "weight": None})
    if p.method not in model.by_method:
        notes.append(f"no published rows for {p.method}: its {methods()[p.method]['class']} class average is used "
                     "and the interval widened")
    if p.family not in model.by_family:
        notes.append(f"no published rows for family {p.family}: the pooled family average is used and the "
                     "interval widened")
    if not (2 <= p.w_bits <= 8):
        notes.append(f"{p.w_bits:g}-bit weights are outside the published range (2-8 bits): extrapolated")
    m = model.mapping
    return {
        "retention": round(retention, 4), "ppl_ratio": round(math.exp(d), 4),
        "low": round(low, 4), "high": round(high, 4),
        "ppl_low": round(math.exp(d_lo), 4), "ppl_high": round(math.exp(d_hi), 4),
        "damage_nats": round(d, 4), "interval": "central 80%", "inputs": inputs,
        "source": f"model: ridge fit on {len(model.rows)} published rows (docs/accuracy.md)"
                  + (f" + {len(runs)} measured run(s)" if runs else ""),
        "formula": "ln(D + eps) = sum(terms); ppl_ratio = exp(D); "
                   "retention = c + (1 - c) exp(-k (P/7)^-kappa D)",
        "evidence": {
            "count": len(model.rows) + len(runs), "published": len(model.rows), "measured": len(runs),
            "near": round(near, 2), "same_method": model.by_method.get(p.method, 0),
            "same_family": model.by_family.get(p.family, 0),
            "sources": sorted({c["source"] for c in closest}),
            "published_sources": sorted({c["source"] for c in closest if not c["source"].startswith("run:")}),
            "measured_runs": sorted({r.source[4:] for r in runs}),
            **({"measured_skipped": skipped} if skipped else {}),
            "closest": closest, "terms": _term_list(model, p),
            "mapping": {"k": round(m.k["zeroshot"], 4), "kappa": round(m.kappa, 3), "c": round(model.chance_ref, 4),
                        "pairs": m.pairs, "rms": round(m.rms, 4)},
            "spread_ln_damage": round(spread, 4),
            "basis": basis,
        },
        "notes": notes,
    }


# ---------------------------------------------------------------------------------------
# Measured evidence: rows of finished runs (engine.advisor.measured reads them off run records)
# ---------------------------------------------------------------------------------------

def _binomial_ratio(after: float, before: float, n: int, z: float) -> tuple[float, float, float]:
    """after / before of two proportions over n rows each, with a central interval (Katz log
    method; (x + 0.5) / (n + 1) keeps 0 and 1 finite). Treats the two as independent, which is
    conservative for the same rows scored twice."""
    pa, pb = (after * n + 0.5) / (n + 1), (before * n + 0.5) / (n + 1)
    se = math.sqrt((1 - pa) / (n * pa) + (1 - pb) / (n * pb))
    r = after / before
    return r, r * math.exp(-z * se), r * math.exp(z * se)


def measured_accuracy(rows: list[dict], params_b: float | None = None) -> dict | None:
    """The accuracy a run measured, as the advisor's ``estimates.accuracy.measured`` block.

    ``rows``: measured_from_runs rows of ONE run. The headline is the first task score of
    ``measured.task_metrics`` that says something: retention = after / before with a binomial
    80% interval over the evaluated rows; a 16-bit score of 0 with a score > 0 after counts as
    full retention (nothing to lose against). Without one, retention comes from the perplexity
    ratio through the retention mapping (D = ln ratio, at least 0), with the measured-run spread
    (fit.measured_sigma) as its interval. None when the run measured neither."""
    if not rows:
        return None
    first = rows[0]
    z = spec()["measured"]["z"]
    ppl = next((r for r in rows if r["metric"] == "perplexity"), None)
    out = {k: first.get(k) for k in ("run_id", "strategy", "model", "dataset", "rows", "task", "reference",
                                     "comparable", "why")}
    out["ppl_ratio"] = round(ppl["ratio"], 6) if ppl else None
    out["perplexity"] = {"after": ppl["value"], "before": ppl["baseline"], "tokens": ppl.get("tokens")} if ppl else None
    out["scores"] = {r["metric"]: {"after": r["value"], "before": r["baseline"]} for r in rows
                     if r["metric"] != "perplexity"}
    n = int(first.get("rows") or 0)
    for r in rows:
        if r["metric"] == "perplexity" or n <= 0:
            continue
        if r["baseline"] > 0:
            ret, lo, hi = _binomial_ratio(r["value"], r["baseline"], n, z)
            basis = (f"{r['metric']} {r['value']:.3f} after vs {r['baseline']:.3f} before on {n} held-out rows "
                     f"of {first['dataset']} (80% interval: binomial, Katz log ratio)")
        elif r["value"] > 0:
            ret, lo, hi = 1.0, 1.0, 1.0
            basis = (f"{r['metric']} {r['value']:.3f} after vs 0 before on {n} held-out rows of {first['dataset']}: "
                     f"the 16-bit base cannot do the task, so no loss against it can be measured (counted as 1)")
        else:
            continue
        return {**out, "metric": r["metric"], "value": r["value"], "baseline": r["baseline"],
                "retention": round(ret, 4), "low": round(lo, 4), "high": round(hi, 4), "basis": basis}
    if ppl is None:
        return None
    model, f = default_fit(), spec()["fit"]
    pb = params_b or first.get("params_b") or 7.0
    y = math.log(max(math.log(ppl["ratio"]), 0.0) + f["eps"])
    s = f["measured_sigma"]
    ret = [model.mapping.retention(damage_of(y + t), model.chance_ref, "zeroshot", pb) for t in (0, z * s, -z * s)]
    return {**out, "metric": "perplexity", "value": ppl["value"], "baseline": ppl["baseline"],
            "retention": round(ret[0], 4), "low": round(ret[1], 4), "high": round(ret[2], 4),
            "basis": (f"perplexity {ppl['value']:.4g} after vs {ppl['baseline']:.4g} before on {n} held-out rows of "
                      f"{first['dataset']} (ratio {ppl['ratio']:.4f}); retention through the retention mapping, "
                      f"interval +-{z:g} x {s:g} in ln damage (docs/accuracy.md)")}
