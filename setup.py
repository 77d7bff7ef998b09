from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="minidiff",
    version="0.1.0",
    description="A small, exact, pure-PyTorch diffusion library: diffusers-compatible UNet, DDPM/DDIM, "
    "fine-tuning, guidance and conditioning.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["minidiff", "minidiff.*"]),
    package_data={"minidiff": ["shipped/*/*.json", "shipped/*/*.md", "shipped/*/*/*.json", "shipped/*/*/*.safetensors"],
                  "minidiff.kernels": ["*.cpp"]},
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "numpy",
        "einops",
        "open_clip_torch",
        "tqdm",
        "safetensors",
    ],
    extras_require={
        "digits": ["scikit-learn"],
        "data": ["scikit-image"],
        "plot": ["matplotlib"],
        "demo": ["gradio"],
        "test": [
            "pytest",
            "pytest-timeout",
            "diffusers==0.42.1",
            "transformers",
            "scikit-learn",
            "scikit-image",
            "matplotlib",
            "selenium",
            "gradio",
        ],
    },
)
