"""The classifier judge: a small CNN trained on real images; its score of class-conditioned samples is the
fraction it assigns to the class they were generated for (the "faces" judge tells faces from non-faces)."""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..data import (DATASET_NAMES, TORCHVISION_DATASETS, CaptionedShapes, Digits, ShapeLabels, Shapes, load_dataset,
                    random_translate)
from ..files import atomic_path, cache_dir

JUDGE_VERSION = "1"  # part of the cache key: bump when the network or its training changes
JUDGED_DATASETS = (*(name for name in DATASET_NAMES if name not in ("photos", "textures")), "captioned_shapes")
# few images (80 faces): more passes; small rotated shapes: more passes (100% on held-out ones); else 10 epochs
JUDGE_EPOCHS = {"faces": 20, "captioned_shapes": 15}


class JudgeNet(nn.Module):
    """Three stages of 3x3 conv + ReLU (widths w, 2w, 4w), max-pooling between them, then a linear
    layer on a 4x4 average pool, so any image size of at least 4 pixels works."""

    def __init__(self, channels: int, num_classes: int, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(4 * width * 16, num_classes))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))  # (B, C, H, W) -> (B, num_classes) logits


@dataclass(frozen=True)
class JudgeReport:
    """Judge accuracy on labelled images; ``per_class[k]`` is None when no image has label k."""

    accuracy: float
    per_class: list[float | None]
    count: int

    def to_dict(self) -> dict:
        return asdict(self)


def _stack(dataset: Dataset) -> tuple[Tensor, Tensor]:
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), torch.tensor(labels)


class _Tensors(Dataset):
    """Images (N, C, H, W) and labels (N,) with class names, as a dataset."""

    def __init__(self, images: Tensor, labels: Tensor, classes: list[str]):
        self.images, self.labels, self.classes = images, labels, classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])


def face_judge_set(image_size: int, split: str) -> Dataset:
    """Grayscale "face" (label 1) against "non-face" (0) images of one split (minidiff.data.real's):
    the LFW subset's faces (for training also mirrored) against its non-face patches and, per patch, three
    random crops of the photographs and one of the textures."""
    from ..data.real import Crops, Faces

    faces = Faces(image_size, channels=1, split=split).images
    if split == "train":
        faces = torch.cat([faces, faces.flip(-1)])  # a mirrored face is a face
    non_faces = Faces(image_size, channels=1, split=split, kind="non-faces").images
    crops = [Crops(image_size, kind, split, num_samples=count * len(non_faces), seed=0, channels=1)
             for kind, count in (("photos", 3), ("textures", 1))]
    negatives = torch.cat([non_faces, *(_stack(dataset)[0] for dataset in crops)])
    labels = torch.cat([torch.ones(len(faces)), torch.zeros(len(negatives))]).long()
    return _Tensors(torch.cat([faces, negatives]), labels, ["non-face", "face"])


def _splits(name: str, image_size: int, **dataset_kwargs) -> tuple[Dataset, Dataset]:
    """The real train and held-out test sets of a named dataset."""
    if name == "faces":
        return face_judge_set(image_size, "train"), face_judge_set(image_size, "test")
    if name == "digits":
        return Digits(image_size, split="train"), Digits(image_size, split="test")
    if name in Shapes.KINDS:  # another seed draws images the judge never saw
        return Shapes(image_size, 3000, seed=0, kind=name), Shapes(image_size, 600, seed=1, kind=name)
    if name == "captioned_shapes":  # the shape of every colour, held-out pairs included
        return tuple(ShapeLabels(CaptionedShapes(image_size, "all", n, seed=seed))
                     for n, seed in ((10_000, 0), (900, 1)))
    if name not in TORCHVISION_DATASETS:
        raise ValueError(f"no judge for dataset {name!r}; named ones: {JUDGED_DATASETS}; for other data use "
                         "Judge.train(train_set, test_set) with save() and load()")
    return (load_dataset(name, image_size, train=True, **dataset_kwargs),
            load_dataset(name, image_size, train=False, **dataset_kwargs))


def default_cache_dir() -> Path:
    """Where trained judges are kept: ``cache_dir("judge")`` (``$MINIDIFF_CACHE/judge`` when set)."""
    return cache_dir("judge")


class Judge:
    """A trained classifier with its class names and the image format it accepts."""

    def __init__(self, model: JudgeNet, classes: list[str], image_size: int, channels: int,
                 test_accuracy: float | None = None):
        self.model, self.classes = model.eval(), list(classes)
        self.image_size, self.channels, self.test_accuracy = image_size, channels, test_accuracy

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @classmethod
    def for_dataset(cls, name: str = "digits", image_size: int = 16, cache_dir: str | os.PathLike | None = None,
                    seed: int = 0, **dataset_kwargs) -> Judge:
        """The judge of a named dataset, loaded from the cache or trained on its train split (and
        measured on its test split) then cached. ``dataset_kwargs`` (e.g. ``root=``) reach ``load_dataset``."""
        path = Path(cache_dir or default_cache_dir()) / f"{name}-{image_size}px-seed{seed}-v{JUDGE_VERSION}.safetensors"
        if path.is_file():
            try:
                return cls.load(path)
            except ValueError as err:  # a damaged cache entry is rebuilt, not fatal
                warnings.warn(f"retraining the judge: {err}", stacklevel=2)
        train_set, test_set = _splits(name, image_size, **dataset_kwargs)
        judge = cls.train(train_set, test_set, seed=seed, epochs=JUDGE_EPOCHS.get(name, 10))
        judge.save(path)
        return judge

    @classmethod
    def train(cls, train_set: Dataset, test_set: Dataset | None = None, *, epochs: int = 10,
              batch_size: int = 128, lr: float = 5e-3, seed: int = 0) -> Judge:
        """Train on a labelled dataset (``classes`` attribute or labels 0..K-1) with Adam, a one-cycle
        learning rate (warm-up, cosine decay) and random shifts of up to 1/16 of the image.
        Deterministic from ``seed``; the caller's random state is left as it was."""
        images, labels = _stack(train_set)
        classes = getattr(train_set, "classes", None) or [str(k) for k in range(int(labels.max()) + 1)]
        channels, image_size = images.shape[1], images.shape[-1]
        max_shift = max(1, image_size // 16)
        with torch.random.fork_rng(devices=[]):  # leave the caller's random state untouched
            torch.manual_seed(seed)
            model = JudgeNet(channels, len(classes))
            optimizer = torch.optim.Adam(model.parameters(), lr=lr)
            steps = epochs * -(-len(labels) // batch_size)
            schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
            model.train()
            for _ in range(epochs):
                for batch in torch.randperm(len(labels)).split(batch_size):
                    loss = F.cross_entropy(model(random_translate(images[batch], max_shift)), labels[batch])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    schedule.step()
        judge = cls(model, classes, image_size, channels)
        if test_set is not None:
            judge.test_accuracy = judge.score(*_stack(test_set)).accuracy
        return judge

    def save(self, path: str | os.PathLike) -> None:
        """Write the weights and the image format to one safetensors file, atomically."""
        from safetensors.torch import save_file

        meta = {"classes": self.classes, "image_size": self.image_size, "channels": self.channels,
                "test_accuracy": self.test_accuracy, "version": JUDGE_VERSION}
        with atomic_path(path) as tmp:
            save_file(self.model.state_dict(), str(tmp), metadata={"judge": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Judge:
        """Read a judge written by ``save``; a corrupt or foreign file raises ValueError naming it."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as file:
                meta = json.loads((file.metadata() or {})["judge"])
                state = {key: file.get_tensor(key) for key in file.keys()}
            model = JudgeNet(meta["channels"], len(meta["classes"]))
            model.load_state_dict(state)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: file not found") from None
        except Exception as err:  # safetensors, JSON and state-dict errors all mean "not a judge file"
            raise ValueError(f"{path}: not a readable judge file ({type(err).__name__}: {err})") from None
        return cls(model, meta["classes"], meta["image_size"], meta["channels"], meta["test_accuracy"])

    def to(self, device: torch.device | str) -> Judge:
        self.model.to(device)
        return self

    def _check_images(self, images: Tensor) -> None:
        expected = (self.channels, self.image_size, self.image_size)
        if not isinstance(images, Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != expected or not len(images):
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"judge expects images of shape (B, {', '.join(map(str, expected))}), got {got}")

    @torch.no_grad()
    def features(self, images: Tensor, batch_size: int = 512) -> Tensor:
        """The network's last convolutional features, averaged over positions: (B, 4 * width)."""
        self._check_images(images)
        device = next(self.model.parameters()).device
        batches = images.float().clamp(-1, 1).split(batch_size)
        return torch.cat([self.model.features(batch.to(device)).mean((2, 3)) for batch in batches]).cpu()

    @torch.no_grad()
    def predict(self, images: Tensor, batch_size: int = 512) -> Tensor:
        """Class labels (B,) of images (B, C, H, W) in [-1, 1] (clamped), on the images' device."""
        self._check_images(images)
        device = next(self.model.parameters()).device
        batches = images.float().clamp(-1, 1).split(batch_size)
        return torch.cat([self.model(batch.to(device)).argmax(1) for batch in batches]).to(images.device)

    def score(self, images: Tensor, labels: Tensor | list[int]) -> JudgeReport:
        """Accuracy of the judge's labels against the intended ``labels``, overall and per class."""
        labels = torch.as_tensor(labels).flatten().cpu()
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
        if len(labels) != len(images):
            raise ValueError(f"got {len(images)} images but {len(labels)} labels")
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if len(bad):
            raise ValueError(f"labels must be in [0, {self.num_classes - 1}], got {bad.unique().tolist()}")
        correct = (self.predict(images).cpu() == labels).float()
        per_class = [correct[labels == k].mean().item() if (labels == k).any() else None
                     for k in range(self.num_classes)]
        return JudgeReport(accuracy=correct.mean().item(), per_class=per_class, count=len(labels))


def judge_samples(unet: nn.Module, scheduler, judge: Judge, *, samples_per_class: int = 10,
                  num_inference_steps: int = 50, guidance_scale: float = 1.0, seed: int = 0,
                  batch_size: int = 100, progress: bool = True) -> tuple[Tensor, Tensor, JudgeReport]:
    """Generate ``samples_per_class`` images of every class the judge knows (classes in order, so a grid
    with ``nrow=samples_per_class`` has one row per class) and score them: (images, labels, report)."""
    from ..sampling import sample  # keep `import minidiff.judge` light

    labels = torch.arange(judge.num_classes).repeat_interleave(samples_per_class)
    generator = torch.Generator().manual_seed(seed)
    images = torch.cat([
        sample(unet, scheduler, batch_size=len(chunk), num_inference_steps=num_inference_steps,
               generator=generator, class_labels=chunk.to(next(unet.parameters()).device),
               guidance_scale=guidance_scale, progress=progress).cpu()
        for chunk in labels.split(batch_size)])
    return images, labels, judge.score(images.clamp(-1, 1), labels)
