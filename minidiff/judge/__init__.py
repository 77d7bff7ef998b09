"""The judges of generated images: a classifier judge of classes (digits, shapes, faces), a caption judge of
text-to-image samples (shape, colour, size), and measures against real images (memorisation, PSNR,
high-frequency energy, Fréchet distance)."""
from .captions import CaptionJudge, CaptionReport, colour_names, size_names
from .classifier import (JUDGE_EPOCHS, JUDGE_VERSION, JUDGED_DATASETS, Judge, JudgeNet, JudgeReport, default_cache_dir,
                         face_judge_set, judge_samples)
from .measures import (MemorizationReport, frechet_distance, high_frequency_energy, image_statistics, memorization,
                       nearest_neighbour_distances, psnr)

__all__ = ["JUDGED_DATASETS", "JUDGE_EPOCHS", "JUDGE_VERSION", "CaptionJudge", "CaptionReport", "Judge", "JudgeNet",
           "JudgeReport", "MemorizationReport", "colour_names", "default_cache_dir", "face_judge_set",
           "frechet_distance", "high_frequency_energy", "image_statistics", "judge_samples", "memorization",
           "nearest_neighbour_distances", "psnr", "size_names"]
