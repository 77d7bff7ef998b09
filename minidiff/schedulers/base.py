"""What every scheduler shares: the frozen config of diffusers' common fields, the schedule tensors, timesteps,
the x0/eps/v conversions, the forward process and config I/O.

A scheduler holds a frozen config (diffusers' ``scheduler_config.json`` field names) and the float32
tensors ``betas``, ``alphas``, ``alphas_cumprod`` (alpha_bar), built once. Nothing changes after
construction: ``timesteps(N)`` and ``previous_timestep(t, N)`` replace diffusers' ``set_timesteps`` state,
``update(model_output, t, prev_t, sample, noise)`` is the pure step, and ``step(...)`` draws the noise
exactly when and how diffusers does (same generator, same numbers).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ..checks import check_tensor
from ..files import BOOKKEEPING_KEYS, DIFFUSERS_VERSION, PathLike, component_dir, read_json, write_json
from .schedules import make_betas

CONFIG_NAME = "scheduler_config.json"
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# Keys of diffusers scheduler configs that never change the math: bookkeeping, and keys of old versions
# (``timestep_values`` and ``tensor_format`` appear in the google/ddpm-* configs).
IGNORED_KEYS = BOOKKEEPING_KEYS | {"timestep_values", "tensor_format"}
# Options of diffusers schedulers that minidiff does not implement: a config that holds their default value
# (which changes nothing; diffusers writes every option into the files it saves) loads, any other value raises.
UNSUPPORTED_DEFAULTS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                        "use_lu_lambdas": False, "use_flow_sigmas": False, "flow_shift": 1.0,
                        "use_dynamic_shifting": False, "time_shift_type": "exponential", "solver_p": None,
                        "sigma_min": None, "sigma_max": None, "shift_terminal": None}
_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str, "tuple[int, ...]": tuple}
_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
MAX_TRAIN_TIMESTEPS = 1_000_000  # a longer chain is a broken config (diffusers' models use 1000 to 4000)

Generator = torch.Generator | Sequence[torch.Generator] | None


@dataclass(frozen=True)
class SchedulerConfig:
    """Fields shared by every scheduler, with diffusers' names and defaults."""
    num_train_timesteps: int = 1000        # T, the length of the training chain
    beta_start: float = 0.0001             # beta_1 of the linear-type schedules
    beta_end: float = 0.02                 # beta_T
    beta_schedule: str = "linear"          # see beta_schedules
    trained_betas: tuple[float, ...] | None = None  # explicit betas; overrides beta_schedule
    prediction_type: str = "epsilon"       # the model predicts eps, x0 ("sample") or v
    thresholding: bool = False             # dynamic thresholding of x0 (Saharia et al. 2022); wins over clip
    dynamic_thresholding_ratio: float = 0.995  # quantile of |x0| taken as the threshold
    sample_max_value: float = 1.0          # upper bound of that threshold
    timestep_spacing: str = "leading"      # how timesteps(N) picks N of the T steps
    steps_offset: int = 0                  # added to "leading" timesteps (Stable Diffusion uses 1)
    rescale_betas_zero_snr: bool = False   # rescale to zero terminal SNR (Lin et al. 2024, Alg. 1)

    choices: ClassVar[dict[str, tuple[str, ...]]] = {
        "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
        "prediction_type": PREDICTION_TYPES,
        "timestep_spacing": TIMESTEP_SPACINGS,
    }

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            kind = field.type.removesuffix(" | None")
            if field.name == "trained_betas":
                value = None if value is None else _betas_tuple(name, value)
            elif value is None and kind != field.type:
                pass
            elif isinstance(value, bool) != (kind == "bool") or not isinstance(value, _TYPES[kind]):
                raise TypeError(f"{name}.{field.name}={value!r}: expected {field.type}")
            elif kind == "float":
                value = float(value)
            object.__setattr__(self, field.name, value)
        for field_name, allowed in self.choices.items():
            if getattr(self, field_name) not in allowed:
                raise ValueError(f"{name}.{field_name}={getattr(self, field_name)!r} is not supported; "
                                 f"allowed: {list(allowed)}")
        if not 1 <= self.num_train_timesteps <= MAX_TRAIN_TIMESTEPS or self.steps_offset < 0:
            raise ValueError(f"{name}: num_train_timesteps must be in [1, {MAX_TRAIN_TIMESTEPS}] and steps_offset "
                             f">= 0, got {self.num_train_timesteps} and {self.steps_offset}")
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise ValueError(f"{name}.trained_betas has {len(self.trained_betas)} values but "
                             f"num_train_timesteps={self.num_train_timesteps}")
        if not 0.0 < self.dynamic_thresholding_ratio <= 1.0:
            raise ValueError(f"{name}.dynamic_thresholding_ratio={self.dynamic_thresholding_ratio} "
                             "must be in (0, 1]")
        for field_name in ("beta_start", "beta_end"):
            if not 0.0 < getattr(self, field_name) < 1.0:
                raise ValueError(f"{name}.{field_name}={getattr(self, field_name)} must be in (0, 1)")
        if self.trained_betas is not None and not all(0.0 < b < 1.0 for b in self.trained_betas):
            raise ValueError(f"{name}.trained_betas must all be in (0, 1) (finite), got min "
                             f"{min(self.trained_betas)} and max {max(self.trained_betas)}")
        self._check_positive("sample_max_value")

    def _check_positive(self, field_name: str) -> None:
        if not 0.0 < getattr(self, field_name) < math.inf:
            raise ValueError(f"{type(self).__name__}.{field_name}={getattr(self, field_name)} must be > 0 and finite")

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (trained_betas as a list)."""
        data = dataclasses.asdict(self)
        if self.trained_betas is not None:
            data["trained_betas"] = list(self.trained_betas)
        return data


def _betas_tuple(name: str, betas: Any) -> tuple[float, ...]:
    """``trained_betas`` (a list, tuple, array or 1-D tensor of numbers) as a tuple of floats."""
    if isinstance(betas, (str, bytes, Mapping)) or not hasattr(betas, "__iter__"):
        raise TypeError(f"{name}.trained_betas: expected a list of floats (one per training timestep), got "
                        f"{type(betas).__name__}")
    try:
        return tuple(float(b) for b in betas)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name}.trained_betas: expected a list of floats, got an entry that is not a number "
                        f"({err})") from None


@dataclass(frozen=True)
class ClipSampleConfig(SchedulerConfig):
    """The shared fields plus DDPM's and DDIM's clipping of the predicted x0."""
    clip_sample: bool = True               # clamp the predicted x0 to +-clip_sample_range
    clip_sample_range: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_positive("clip_sample_range")


@dataclass(frozen=True)
class SchedulerOutput:
    prev_sample: Tensor            # x_{prev_t}
    pred_original_sample: Tensor   # the (clipped) predicted x0


History = tuple[tuple[int, Tensor], ...]


@dataclass(frozen=True)
class MultistepOutput(SchedulerOutput):
    """The output of a multistep solver's step: also the history of (timestep, solver input) pairs, oldest
    first, that its next step needs. The sampling loop holds it and passes it back; the scheduler keeps none."""
    history: History = ()


def x0_and_eps(prediction_type: str, model_output: Tensor, sample: Tensor, alpha: Tensor,
               sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Unclipped x0 and eps from the model output at a noise level with x_t = alpha x0 + sigma eps
    (alpha = sqrt(alpha_bar_t), sigma = sqrt(1 - alpha_bar_t); Ho et al. 2020 eq. 4) and, for v-prediction,
    v = alpha eps - sigma x0 (Salimans & Ho 2022)."""
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha, model_output
    if prediction_type == "sample":
        return model_output, (sample - alpha * model_output) / sigma
    return alpha * sample - sigma * model_output, alpha * model_output + sigma * sample


def split_learned_variance(model_output: Tensor, sample: Tensor,
                           variance_type: str | None) -> tuple[Tensor, Tensor | None]:
    """(prediction, learned variance or None): a "learned"/"learned_range" model outputs 2 x C channels."""
    if variance_type is None or not variance_type.startswith("learned"):
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)} but the sample has "
                             f"{tuple(sample.shape)}")
        return model_output, None
    channels = sample.shape[1]
    if model_output.ndim != sample.ndim or model_output.shape[1] != 2 * channels:
        raise ValueError(f"variance_type={variance_type!r} needs a model output with 2 x {channels} channels "
                         f"(prediction, variance), got shape {tuple(model_output.shape)}")
    prediction, variance = model_output.split(channels, dim=1)
    return split_learned_variance(prediction, sample, None)[0], variance


def dynamic_threshold(x0: Tensor, ratio: float, max_value: float) -> Tensor:
    """Saharia et al. 2022 (Imagen): s = the ``ratio`` quantile of |x0| per sample, clamped to
    [1, max_value]; x0 -> clamp(x0, -s, s) / s. Computed in float32 at least."""
    if max_value == 1.0:  # s = 1 whatever the quantile: a plain clamp, without the per-sample sort
        return x0.clamp(-1.0, 1.0)
    flat = x0.reshape(x0.shape[0], -1)
    flat = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(x0.dtype)


def randn(shape: Sequence[int], *, generator: Generator = None, device: torch.device | str = "cpu",
          dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise drawn like diffusers' ``randn_tensor``: on the generator's device (a CPU
    generator gives the same numbers whatever ``device``), then moved; a list of generators draws
    one sample each, in order."""
    shape = tuple(shape)
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per sample")
        return torch.cat([randn((1, *shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, a list of them (one per sample) or None, got "
                        f"{type(generator).__name__}; e.g. torch.Generator().manual_seed(0)")
    draw_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)


def _check_noise(noise: Tensor, like: Tensor, needs: str = "it must have x0's") -> None:
    """``noise`` must be a floating-point tensor of ``like``'s shape (no broadcasting)."""
    check_tensor("noise", noise, floating=True)
    if noise.shape != like.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}; {needs} {tuple(like.shape)}")


class Scheduler:
    """Shared facade: schedule tensors, timesteps, x0 prediction, forward process, config I/O."""
    config_class: ClassVar[type[SchedulerConfig]] = SchedulerConfig
    # the config fields of every scheduler class: a key one of them knows is not an unknown key to the others
    _known_fields: ClassVar[set[str]] = set()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Scheduler._known_fields.update(f.name for f in dataclasses.fields(cls.config_class))

    def __init__(self, **fields: Any) -> None:
        self._config = self.config_class(**fields)
        self._betas = make_betas(self._config)
        self._alphas = 1.0 - self._betas
        self._alphas_cumprod = torch.cumprod(self._alphas, dim=0)

    # The schedule is shared by every call: read it, never modify it in place.
    config = property(lambda self: self._config, doc="The frozen config.")
    betas = property(lambda self: self._betas, doc="beta_t, float32 (T,).")
    alphas = property(lambda self: self._alphas, doc="alpha_t = 1 - beta_t, float32 (T,).")
    alphas_cumprod = property(lambda self: self._alphas_cumprod, doc="alpha_bar_t = prod(alpha_1..t), float32 (T,).")
    num_train_timesteps = property(lambda self: self._config.num_train_timesteps, doc="T.")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._config})"

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | SchedulerConfig) -> "Scheduler":
        """Build from a config dict (e.g. a parsed scheduler_config.json) or a config of either scheduler.
        Bookkeeping/obsolete keys (IGNORED_KEYS), unsupported diffusers options at their defaults
        (UNSUPPORTED_DEFAULTS) and the fields only other schedulers use are dropped; any other unknown key
        raises ValueError, since it could change the math."""
        if not isinstance(config, (Mapping, SchedulerConfig)):
            raise TypeError(f"{cls.__name__}.from_config: expected a config dict (a parsed scheduler_config.json) "
                            f"or a scheduler's config, got {type(config).__name__}; minidiff.load_scheduler reads "
                            "a folder")
        data = config.to_dict() if isinstance(config, SchedulerConfig) else dict(config)
        data = {k: v for k, v in data.items() if k not in UNSUPPORTED_DEFAULTS or v != UNSUPPORTED_DEFAULTS[k]}
        known = Scheduler._known_fields
        unknown = sorted(set(data) - known - IGNORED_KEYS)
        if unknown:
            raise ValueError(f"{cls.__name__}: unsupported config keys {unknown}; known fields: "
                             f"{sorted(known)}")
        own = {f.name for f in dataclasses.fields(cls.config_class)}
        return cls(**{key: value for key, value in data.items() if key in own})

    @classmethod
    def from_pretrained(cls, path: PathLike) -> "Scheduler":
        """Load ``scheduler_config.json`` from a pipeline folder's ``scheduler/`` or from ``path`` itself."""
        file = component_dir(path, "scheduler", CONFIG_NAME) / CONFIG_NAME
        data = read_json(file)
        try:
            return cls.from_config(data)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{file}: {err}") from None

    def save_pretrained(self, path: PathLike) -> None:
        """Write ``path/scheduler_config.json`` in diffusers' format (atomically)."""
        header = {"_class_name": type(self).__name__, "_diffusers_version": DIFFUSERS_VERSION}
        write_json(Path(path) / CONFIG_NAME, {**header, **self._config.to_dict()})

    def _check_steps(self, num_inference_steps: int) -> int:
        T = self.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) \
                or not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps={num_inference_steps!r} must be an int between 1 and "
                             f"num_train_timesteps={T}")
        return num_inference_steps

    def timesteps(self, num_inference_steps: int) -> Tensor:
        """The N descending timesteps of diffusers' ``set_timesteps(N)`` as a CPU LongTensor:
        leading: arange(N) * (T // N) + steps_offset; trailing: round(arange(T, 0, -T/N)) - 1;
        linspace: round(linspace(0, T - 1, N)). numpy computes them, as in diffusers, so that float
        rounding ties fall the same way."""
        n, T, spacing = self._check_steps(num_inference_steps), self.num_train_timesteps, self._config.timestep_spacing
        if spacing == "leading":
            ts = np.arange(n)[::-1] * (T // n) + self._config.steps_offset
        elif spacing == "trailing":
            ts = np.round(np.arange(T, 0, -T / n)) - 1
        else:
            ts = np.round(np.linspace(0, T - 1, n))[::-1]
        return torch.from_numpy(ts.astype(np.int64))

    def checked_timesteps(self, num_inference_steps: int) -> Tensor:
        """``timesteps(num_inference_steps)`` for a sampler to run: a ValueError if steps_offset pushed one past
        T - 1 (diffusers lists such a timestep, e.g. 1000 for N = T = 1000 with "leading" spacing and
        steps_offset 1, and fails at its step)."""
        ts = self.timesteps(num_inference_steps)
        if int(ts.max()) >= self.num_train_timesteps:
            raise ValueError(f"steps_offset={self._config.steps_offset} puts timesteps({num_inference_steps}) past "
                             f"the last training step {self.num_train_timesteps - 1} (got {int(ts.max())}); use "
                             "fewer steps or a smaller steps_offset")
        return ts

    def _split(self, model_output: Tensor, sample: Tensor) -> tuple[Tensor, Tensor | None]:
        """(prediction, learned variance or None); the prediction must have the sample's shape."""
        check_tensor("model_output", model_output, floating=True)
        check_tensor("sample", sample, floating=True)
        return split_learned_variance(model_output, sample, getattr(self._config, "variance_type", None))

    def check_timesteps(self, t: int | Tensor) -> Tensor:
        """``t`` as a LongTensor after checking that every entry is a whole training step in [0, T - 1] (a
        negative index would read alpha_bar from the end of the schedule)."""
        tensor = torch.as_tensor(t)
        if tensor.dtype == torch.bool or tensor.is_complex() or not (tensor == tensor.round()).all():
            raise ValueError(f"timestep {t!r}: expected whole training steps")
        if ((tensor < 0) | (tensor >= self.num_train_timesteps)).any():
            raise ValueError(f"timestep {tensor.tolist()} is outside [0, {self.num_train_timesteps - 1}]")
        return tensor.long()

    def timestep_index(self, t: int | Tensor) -> int:
        """One timestep (an int, or a one-element tensor) as an int, checked like ``check_timesteps``."""
        if isinstance(t, (bool, np.bool_)) or not (isinstance(t, (int, float, np.number)) or
                                                  torch.is_tensor(t) and t.numel() == 1):
            got = f"a tensor of shape {tuple(t.shape)}" if torch.is_tensor(t) else type(t).__name__
            raise TypeError(f"timestep: expected one timestep (an int or a one-element tensor), got {got}")
        if isinstance(t, (int, np.integer)) or torch.is_tensor(t) and t.dtype in _INTEGER_DTYPES:  # the fast path
            if not 0 <= int(t) < self.num_train_timesteps:
                raise ValueError(f"timestep {int(t)} is outside [0, {self.num_train_timesteps - 1}]")
            return int(t)
        return int(self.check_timesteps(t))

    def _alpha_sigma(self, t: int) -> tuple[Tensor, Tensor]:
        """sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t): x_t = alpha x0 + sigma eps."""
        a = self._alphas_cumprod[self.check_timesteps(t)]
        return a ** 0.5, (1 - a) ** 0.5

    def _x0_eps(self, model_output: Tensor, t: int, sample: Tensor) -> tuple[Tensor, Tensor]:
        """Unclipped x0 and eps from the model output at timestep t (see x0_and_eps)."""
        return x0_and_eps(self._config.prediction_type, model_output, sample, *self._alpha_sigma(t))

    def _clip(self, x0: Tensor) -> Tensor:
        """Dynamic thresholding if the config asks for it, else DDPM/DDIM's clip_sample (if any and on)."""
        cfg = self._config
        if cfg.thresholding:
            return dynamic_threshold(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        if isinstance(cfg, ClipSampleConfig) and cfg.clip_sample:
            return x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        return x0

    def predict_x0(self, model_output: Tensor, t: int | Tensor, sample: Tensor) -> Tensor:
        """The predicted x0 at timestep ``t``, clipped or thresholded as the config says (what
        ``step(...).pred_original_sample`` returns); differentiable, for guidance."""
        return self._clip(self._x0_eps(self._split(model_output, sample)[0], self.timestep_index(t), sample)[0])

    def _forward_coefficients(self, t: Tensor | int, like: Tensor) -> tuple[Tensor, Tensor]:
        """sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t) in ``like``'s dtype/device, shaped to broadcast."""
        check_tensor("x0", like, floating=True)
        alpha_bar = self._alphas_cumprod.to(device=like.device, dtype=like.dtype)
        a = alpha_bar[self.check_timesteps(t).to(like.device)].flatten()
        if a.numel() not in (1, like.shape[0]):
            raise ValueError(f"timestep: {a.numel()} timesteps for a batch of {like.shape[0]}; pass one, or one "
                             "per sample")
        a = a.reshape(-1, *(1,) * (like.ndim - 1))
        return a ** 0.5, (1 - a) ** 0.5

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """q(x_t | x0) sample: sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps (Ho et al. 2020 eq. 4)."""
        sqrt_a, sqrt_1ma = self._forward_coefficients(t, x0)
        _check_noise(noise, x0)
        return sqrt_a * x0 + sqrt_1ma * noise

    def get_velocity(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0 (Salimans & Ho 2022, sec. 4)."""
        sqrt_a, sqrt_1ma = self._forward_coefficients(t, x0)
        _check_noise(noise, x0)
        return sqrt_a * noise - sqrt_1ma * x0

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """What the model learns to output at ``t``: eps, x0 or v, following prediction_type."""
        kind = self._config.prediction_type
        return noise if kind == "epsilon" else x0 if kind == "sample" else self.get_velocity(x0, noise, t)

    @staticmethod
    def _noise(needed: bool, like: Tensor, generator: Generator, noise: Tensor | None,
               dtype: torch.dtype | None = None) -> Tensor | None:
        """The step noise: ``noise`` if given, else drawn (in ``dtype``, default the sample's) from ``generator``
        only when the step uses it, so the generator advances exactly as in diffusers."""
        check_tensor("sample", like, floating=True)
        if noise is not None and generator is not None:
            raise ValueError("pass either generator or noise to step(), not both")
        if noise is not None:
            _check_noise(noise, like, "the step needs the sample's")
        if noise is not None or not needed:
            return noise
        return randn(like.shape, generator=generator, device=like.device, dtype=dtype or like.dtype)
