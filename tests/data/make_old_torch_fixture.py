"""Make ``generator-torch-2.4.1.pt``: a small generator exported by an older torch (run once, result committed).

The test ``test_a_file_saved_by_torch_2_4_loads_and_passes_its_self_test`` loads it with the torch of the
day: the archive, the traced graph and the self-test outputs all come from torch 2.4.1. Made with

    python3 -m venv /tmp/old && /tmp/old/bin/pip install torch==2.4.1 'numpy<2.3' jsonschema scipy \\
        scikit-image opencv-python-headless imageio tifffile click tqdm pillow
    PYTHONPATH=. /tmp/old/bin/python tests/data/make_old_torch_fixture.py

(the PyPI wheel of torch 2.4.1 for Linux is the CUDA build; it runs on the CPU here).
"""

from __future__ import annotations

from pathlib import Path

import torch

from cellbatch.export import export_generator, generator_metadata, untrained_generator


def main() -> None:
    out = Path(__file__).parent / f"generator-torch-{torch.__version__.split('+')[0]}.pt"
    net = untrained_generator(base_filters=2, seed=24)
    meta = generator_metadata(net, trained=False, seed=24, note="fixture: saved by an older torch")
    print(export_generator(net, out, metadata=meta, check_sizes=(128,), formats=("torchscript",)))


if __name__ == "__main__":
    main()
