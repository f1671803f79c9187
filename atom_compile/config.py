"""AtomConfig: every knob of the quantization, the named presets, and the size-adaptation rule.

Element formats are short strings so that they read well in graph dumps:

- ``"int2"`` .. ``"int8"``: symmetric integers in [-2^(b-1), 2^(b-1) - 1], scale = clip * absmax / qmax;
- ``"fp4"``: FP4 e2m1 (values 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives), scale = clip * absmax / 6;
- ``"fp16"``: not quantized (kept in the model's floating-point dtype); used for outliers;
- ``None`` for a tensor that is not quantized at all (weights of the fp preset, activations of W4A16).

The size-adaptation rule (``AtomConfig.resolve``), for a linear with K input channels, a requested group
size g and n outlier channels:

1. if (K - n) is a multiple of g, use (g, n) as asked;
2. else, if ``adapt_to_model``, keep the n outliers and halve g until it divides K - n, down to 32;
3. else, if ``adapt_to_model``, keep g and use fewer outliers, n' = n - (g - (K - n) mod g), so that
   K - n' fills whole groups;
4. otherwise raise ``ConfigError`` saying which numbers do not fit and what to change.

SmolLM2-135M (hidden 576, intermediate 1536) with g = n = 128: q/k/v/o/gate/up (K = 576) get 128 INT8
outliers and 7 groups of 64; down_proj (K = 1536) keeps 11 groups of 128. Keeping the outliers is the
accuracy-preserving choice: on SmolLM2 with RTN weights and a 4-bit KV cache it gave 1.46x fp
perplexity where "keep groups of 128, cut to 64 outliers" gave 1.61x (docs/accuracy.md). Llama-7B
sizes (4096, 11008) fit as asked.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

INT_FORMATS = {f"int{b}" for b in range(2, 9)}
ELEMENT_FORMATS = INT_FORMATS | {"fp4"}
OUTLIER_FORMATS = {"int8", "fp16"}
WEIGHT_METHODS = {"rtn", "gptq"}
OUTLIER_METRICS = {"hessian", "abs_mean"}
CHANNEL_ORDERS = {"score", "blocks", "chunks"}
KV_BITS = {2, 4, 8}


class ConfigError(ValueError):
    """A configuration that cannot be applied to the model as asked."""


@dataclass(frozen=True)
class LinearQuantSpec:
    """How one linear layer is quantized, after the adaptation rule has been applied to its size."""

    in_features: int
    weight_format: str | None
    act_format: str | None
    group_size: int  # width of an INT4 group along K; equals n_normal for one group per row
    n_outliers: int
    outlier_format: str  # "int8" or "fp16"
    weight_clip: float
    act_clip: float
    weight_method: str
    weight_channel_group: int
    weight_clip_search: bool = False

    @property
    def n_normal(self) -> int:
        return self.in_features - self.n_outliers

    @property
    def n_groups(self) -> int:
        return self.n_normal // self.group_size


@dataclass(frozen=True)
class AtomConfig:
    """Every knob of Atom's quantization; each one can be set on its own.

    ``group_size=None`` means one group per row (per-channel weights, per-token activations).
    """

    name: str = "custom"
    weight_format: str | None = "int4"
    act_format: str | None = "int4"
    group_size: int | None = 128
    n_outliers: int = 128
    outlier_format: str = "int8"
    outlier_metric: str = "hessian"
    # Which normal channels share a group (the outliers are the same and last in every order;
    # passes/outlier_analysis.py). "chunks" (the default): groups of aligned runs of 16 input channels, the runs
    # sorted by score (the GPU quantizer loads runs and patches the few swapped-in channels instead of gathering
    # every channel; where 16 does not divide the group size and the channel count, the score order);
    # "score": every normal channel sorted by outlier score (Atom's reorder); "blocks": each normal group one block
    # of consecutive input channels (the fastest to load, the coarsest grouping).
    channel_order: str = "chunks"
    weight_clip: float = 0.85
    act_clip: float = 0.9
    weight_method: str = "rtn"
    weight_clip_search: bool = False  # per-group clip ratio with the least squared error, instead of weight_clip
    weight_channel_group: int = 1
    gptq_percdamp: float = 0.01
    kv_bits: int | None = 4
    kv_clip: float = 1.0
    kv_rotation: bool = False  # Hadamard-rotate K (after RoPE) and V per head before the cache quantizes them
    adapt_to_model: bool = True
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ConfigError(f"AtomConfig({self.name!r}): {msg}")

        if self.weight_format is not None and self.weight_format not in ELEMENT_FORMATS:
            bad(f"weight_format {self.weight_format!r} is not one of {sorted(ELEMENT_FORMATS)} or None")
        if self.act_format is not None and self.act_format not in ELEMENT_FORMATS:
            bad(f"act_format {self.act_format!r} is not one of {sorted(ELEMENT_FORMATS)} or None")
        if self.act_format is not None and self.weight_format is None:
            bad("quantized activations need quantized weights (set weight_format)")
        if self.outlier_format not in OUTLIER_FORMATS:
            bad(f"outlier_format {self.outlier_format!r} is not one of {sorted(OUTLIER_FORMATS)}")
        if self.outlier_metric not in OUTLIER_METRICS:
            bad(f"outlier_metric {self.outlier_metric!r} is not one of {sorted(OUTLIER_METRICS)}")
        if self.channel_order not in CHANNEL_ORDERS:
            bad(f"channel_order {self.channel_order!r} is not one of {sorted(CHANNEL_ORDERS)}")
        if self.weight_method not in WEIGHT_METHODS:
            bad(f"weight_method {self.weight_method!r} is not one of {sorted(WEIGHT_METHODS)}")
        if self.group_size is not None and (self.group_size < 2 or self.group_size % 2):
            bad(f"group_size must be an even number >= 2 or None, got {self.group_size}")
        if self.n_outliers < 0:
            bad(f"n_outliers must be >= 0, got {self.n_outliers}")
        if self.n_outliers and self.weight_format is None:
            bad("outlier channels only make sense with quantized weights")
        for knob in ("weight_clip", "act_clip", "kv_clip"):
            v = getattr(self, knob)
            if not 0.0 < v <= 1.0:
                bad(f"{knob} must be in (0, 1], got {v}")
        if self.weight_channel_group < 1:
            bad(f"weight_channel_group must be >= 1, got {self.weight_channel_group}")
        if self.kv_bits is not None and self.kv_bits not in KV_BITS:
            bad(f"kv_bits must be one of {sorted(KV_BITS)} or None, got {self.kv_bits}")
        if not 0.0 <= self.gptq_percdamp < 1.0:
            bad(f"gptq_percdamp must be in [0, 1), got {self.gptq_percdamp}")

    # --------------------------------------------------------------- derived
    @property
    def quantizes_weights(self) -> bool:
        return self.weight_format is not None

    @property
    def quantizes_activations(self) -> bool:
        return self.act_format is not None

    @property
    def needs_calibration(self) -> bool:
        """Whether any pass reads calibration activations (outlier order or GPTQ Hessians)."""
        return self.quantizes_weights and (self.n_outliers > 0 or self.weight_method == "gptq")

    def replace(self, **changes) -> "AtomConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AtomConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown AtomConfig keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def resolve(self, in_features: int) -> LinearQuantSpec:
        """Apply the size-adaptation rule (module docstring) to a linear with ``in_features`` inputs."""
        K = in_features
        n = self.n_outliers
        if n >= K:
            raise ConfigError(
                f"{self.name}: {n} outlier channels do not fit a linear with {K} input channels; "
                f"use n_outliers < {K}"
            )
        g = self.group_size if self.group_size is not None else K - n
        if g > K - n:
            if not self.adapt_to_model:
                raise ConfigError(
                    f"{self.name}: group_size {g} is larger than the {K - n} normal channels "
                    f"({K} inputs - {n} outliers); use a smaller group_size or adapt_to_model=True"
                )
            g = K - n
        if (K - n) % g:
            if not self.adapt_to_model:
                raise ConfigError(
                    f"{self.name}: group_size {g} does not divide the {K - n} normal channels "
                    f"({K} inputs - {n} outliers). Choose n_outliers so that {K} - n_outliers is a "
                    f"multiple of {g}, pick another group_size, or set adapt_to_model=True"
                )
            g0 = g
            while (K - n) % g and g % 2 == 0 and g // 2 >= 32:
                g //= 2
            if (K - n) % g:
                g = g0
                n -= g - (K - n) % g  # fewer outliers, so that the normal channels fill whole groups
                if n < 0:
                    raise ConfigError(
                        f"{self.name}: no group size >= 32 fits the {K} inputs of a linear; set group_size "
                        "and n_outliers explicitly"
                    )
        return LinearQuantSpec(
            in_features=K,
            weight_format=self.weight_format,
            act_format=self.act_format,
            group_size=g,
            n_outliers=n,
            outlier_format=self.outlier_format,
            weight_clip=self.weight_clip,
            act_clip=self.act_clip,
            weight_method=self.weight_method,
            weight_channel_group=self.weight_channel_group,
            weight_clip_search=self.weight_clip_search,
        )


PRESETS: dict[str, AtomConfig] = {
    # No quantization at all: the same graphs and runtime, fp weights, activations and KV cache.
    "fp": AtomConfig(
        name="fp", weight_format=None, act_format=None, group_size=None, n_outliers=0, kv_bits=None
    ),
    # Plain round-to-nearest W4A4: per-channel weights, per-token activations, no outliers, no clipping.
    "rtn-w4a4": AtomConfig(
        name="rtn-w4a4", group_size=None, n_outliers=0, weight_clip=1.0, act_clip=1.0, kv_bits=None
    ),
    # SmoothQuant-style baseline without smoothing: per-channel INT8 weights, per-token INT8 activations.
    "w8a8": AtomConfig(
        name="w8a8", weight_format="int8", act_format="int8", group_size=None, n_outliers=0,
        weight_clip=1.0, act_clip=1.0, kv_bits=None,
    ),
    # Weight-only INT4 with groups of 128 (GPTQ/AWQ-style storage), fp activations and KV cache.
    "w4a16": AtomConfig(
        name="w4a16", act_format=None, group_size=128, n_outliers=0, weight_clip=1.0, kv_bits=None
    ),
    # Atom as in the paper: 128 INT8 outliers, groups of 128, clipping 0.85 / 0.9, 4-bit KV, GPTQ; plus one
    # step of ours: K and V rotated per head by a Hadamard matrix before the 4-bit cache (RotateKVHeads),
    # which on SmolLM2 takes the KV4 cost from +15% to +6% perplexity (docs/accuracy.md). The paper's
    # exact settings: --set kv_rotation=false.
    "atom-w4a4": AtomConfig(name="atom-w4a4", weight_method="gptq", kv_rotation=True),
    # The same with round-to-nearest weights (no calibration of the weights themselves).
    "atom-w4a4-rtn": AtomConfig(name="atom-w4a4-rtn", weight_method="rtn", kv_rotation=True),
    # The paper's W3A3 point.
    "atom-w3a3": AtomConfig(name="atom-w3a3", weight_format="int3", act_format="int3", weight_method="gptq",
                            kv_rotation=True),
    # The paper's FP4 (e2m1) variant of the element type.
    "atom-fp4": AtomConfig(name="atom-fp4", weight_format="fp4", act_format="fp4", weight_method="gptq",
                           kv_rotation=True),
}


def get_config(name_or_config: str | AtomConfig, **overrides) -> AtomConfig:
    """A preset by name (with optional knob overrides), or an AtomConfig as given."""
    if isinstance(name_or_config, AtomConfig):
        cfg = name_or_config
    else:
        if name_or_config not in PRESETS:
            raise ConfigError(f"unknown preset {name_or_config!r}; presets: {', '.join(PRESETS)}")
        cfg = PRESETS[name_or_config]
    if overrides:
        cfg = cfg.replace(**overrides)
    return cfg
