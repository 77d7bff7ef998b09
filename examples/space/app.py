"""Hugging Face Space (SDK: gradio) serving the colour-guidance demo of examples/gradio_app.py on the CPU.

A Space repository needs, next to this file and requirements.txt: ``gradio_app.py`` (copied from
examples/) and the ``minidiff/`` package folder (pure Python, with the shipped model in
minidiff/shipped/). From a minidiff checkout:

    cp -r minidiff examples/gradio_app.py examples/space/app.py examples/space/requirements.txt SPACE_REPO/

``MINIDIFF_MODEL`` picks the model selected first (default photos-32); the menu offers every shipped model.
Run locally with ``python examples/space/app.py`` (it then finds both in the repository).
"""
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# In a Space both sit next to this file; in the repository they are one and two levels up.
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parents[1])]

from gradio_app import available_models, build_demo, load_model  # noqa: E402

first = os.environ.get("MINIDIFF_MODEL", "photos-32")
models = {name: load_model(name) for name in dict.fromkeys([first, *available_models()])}
demo = build_demo(*models[first], models=models)

if __name__ == "__main__":
    demo.launch()  # 127.0.0.1 locally; a Space sets GRADIO_SERVER_NAME=0.0.0.0
