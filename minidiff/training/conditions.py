"""What a training image is conditioned on, and the network the loop trains: the UNet together with a text
encoder trained jointly with it.

Dataset items are an image, ``(image, condition)`` or a dict ``{"image": ..., <condition name>: ...}`` with any
of the conditions below (several at once). In a tuple the condition's type names it: a str is a prompt, a
tensor shaped like the image is a conditioning image, anything else a class label."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

CONDITIONS = ("class_labels", "conditioning_image", "prompts")
Conditions = dict[str, Any]


def split_batch(batch: Any) -> tuple[Tensor, Conditions]:
    """(images, conditions) of a dataset item or a collated batch (see the module docstring)."""
    if torch.is_tensor(batch):
        return batch, {}
    if isinstance(batch, dict):
        unknown = sorted(set(batch) - {"image", *CONDITIONS})
        if "image" not in batch or unknown or not torch.is_tensor(batch["image"]):
            raise TypeError(f"a dict dataset item needs an 'image' tensor and only the conditions {list(CONDITIONS)}; "
                            f"got keys {sorted(batch)}")
        images = batch["image"]
        return images, {k: _as_condition(k, v) for k, v in batch.items() if k != "image"}
    if isinstance(batch, (tuple, list)) and batch and torch.is_tensor(batch[0]):
        images = batch[0]
        if len(batch) == 1:
            return images, {}
        value = batch[1]
        if isinstance(value, str) or isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
            name = "prompts"
        elif torch.is_tensor(value) and value.is_floating_point() and value.ndim == images.ndim:
            name = "conditioning_image"
        else:
            name = "class_labels"
        return images, {name: _as_condition(name, value)}
    raise TypeError("dataset items must be an image tensor, (image, condition) or a dict with 'image', got "
                    f"{type(batch).__name__}")


def _as_condition(name: str, value: Any) -> Any:
    if name == "prompts":
        return [value] if isinstance(value, str) else list(value)
    return value if torch.is_tensor(value) else torch.as_tensor(value)


class ConditionedUNet(nn.Module):
    """``net(x_t, t, class_labels=, conditioning_image=, prompts=)``: the UNet, with the prompts encoded by
    ``text_encoder`` into its cross-attention context. One module, so that the optimizer, the EMA and
    DistributedDataParallel see the UNet and the encoder trained together as one model."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module | None = None):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None,
                conditioning_image: Tensor | None = None, prompts: Sequence[str] | None = None) -> Tensor:
        context = None if prompts is None else self.text_encoder(prompts)
        return self.unet(x, t, class_labels=class_labels, encoder_hidden_states=context,
                         conditioning_image=conditioning_image)

    def condition_names(self) -> tuple[str, ...]:
        """The conditions this network needs, in CONDITIONS order."""
        config = self.unet.config
        takes = {"class_labels": self.unet.takes_class_labels, "conditioning_image": config.conditioning_channels > 0,
                 "prompts": self.text_encoder is not None}
        return tuple(name for name in CONDITIONS if takes[name])


def check_conditions(net: ConditionedUNet, conditions: Conditions, cond_drop_prob: float) -> None:
    """Raise a clear error when the data and the network disagree about conditions: one is missing, the
    data gives a condition the network cannot use (class labels excepted: an unconditional model may
    train on a labelled dataset), or condition dropout has no null to drop to."""
    config, needed = net.unet.config, net.condition_names()
    for name in needed:
        if name not in conditions:
            raise ValueError(f"the model is conditioned on {name} but the dataset items give "
                             f"{sorted(conditions) or 'no condition'}")
    extra = [name for name in conditions if name not in needed and name != "class_labels"]
    if "prompts" in extra:
        raise ValueError("the dataset gives prompts but no text encoder was given: pass text_encoder= (a "
                         "minidiff.text.TextEncoder, trained with the UNet) and a UNet2DConditionModel")
    if extra:
        raise ValueError(f"the dataset gives {extra[0]} but the model does not take it (UNetConfig."
                         f"conditioning_channels={config.conditioning_channels})")
    if net.text_encoder is not None and (not config.is_conditional or
                                         net.text_encoder.width not in config.cross_attention_dims):
        raise ValueError(f"the text encoder's width {net.text_encoder.width} must be the UNet's cross_attention_dim "
                         f"(a UNet2DConditionModel); this UNet is a {config.model_class}"
                         + (f" with cross_attention_dim {config.cross_attention_dim}" if config.is_conditional else ""))
    if config.is_conditional and net.text_encoder is None and config.class_embed_type != "cross_attention":
        raise ValueError("a UNet2DConditionModel attends to a context: pass text_encoder= (prompts in the data) or "
                         "use class_embed_type='cross_attention'")
    if "conditioning_image" in needed:
        image, want = conditions["conditioning_image"], config.conditioning_channels
        if image.shape[-3] != want:
            raise ValueError(f"conditioning images have {image.shape[-3]} channels; the UNet's "
                             f"conditioning_channels is {want}")
    if cond_drop_prob > 0:
        if not needed:
            raise ValueError("cond_drop_prob > 0 needs a conditional model (class labels, a conditioning image or "
                             "a text encoder); this one takes no condition")
        if "class_labels" in needed and (config.num_class_embeds is None or
                                         config.class_embed_type not in (None, "concat", "cross_attention")):
            raise ValueError("cond_drop_prob > 0 with class labels needs a label embedding table (num_class_embeds "
                             f"set, class_embed_type None/'concat'/'cross_attention'); got {config.class_embed_type!r}")


def drop_conditions(net: ConditionedUNet, conditions: Conditions, drop: Tensor | None,
                    device: torch.device) -> Conditions:
    """The network's conditions on ``device``, each replaced by its null where ``drop`` (B, number of
    conditions; None: no condition dropout) is set: the last class row, an all-zero conditioning image, the
    empty prompt. Each condition drops independently, so that a model with two learns each one alone and
    neither (classifier-free guidance, Ho & Salimans 2022)."""
    out = {}
    for column, name in enumerate(net.condition_names()):
        value = conditions[name]
        if drop is None:
            out[name] = value if name == "prompts" else value.to(device)
            continue
        dropped = drop[:, column]
        if name == "prompts":
            out[name] = ["" if d else p for p, d in zip(value, dropped.tolist())]
            continue
        value = value.to(device)
        if name == "class_labels":
            null = net.unet.config.num_class_embeds - 1  # the last embedding row is the null class
            if int(value.max()) >= null:
                raise ValueError(f"with cond_drop_prob > 0 label {null} is the null class; dataset labels must be "
                                 f"< {null}, got {int(value.max())}")
            value = torch.where(dropped, null, value)
        elif name == "conditioning_image":
            value = torch.where(dropped[:, None, None, None], 0.0, value)
        out[name] = value
    return out
