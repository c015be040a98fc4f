import csv
import json

import numpy as np
import zarr

from cellbatch.write import CELL_COLUMNS, STAGING_DIR, SlideWriter, clear_staging


def _writer(tmp_path, chunk=4):
    return SlideWriter(tmp_path / "out" / "slide", out_root=tmp_path / "out",
                       arrays={"crop": (8, 8, 3), "mask": (8, 8)}, columns=CELL_COLUMNS, chunk=chunk)


def _cells(n, start=0):
    ids = range(start, start + n)
    rows = [{"source": f"c{i}.png", "frame": 0, "cx": 1.234, "cy": 2.0, "edge": i % 2 == 0} for i in ids]
    crops = np.stack([np.full((8, 8, 3), i, np.uint8) for i in range(start, start + n)])
    masks = np.stack([np.full((8, 8), i % 4, np.uint8) for i in range(start, start + n)])
    return rows, {"crop": crops, "mask": masks}


def test_slide_is_invisible_until_commit_then_complete(tmp_path):
    writer = _writer(tmp_path)
    for start in (0, 3, 9):  # uneven batches across chunk boundaries
        writer.add(*_cells(3 if start < 9 else 2, start))
    assert not (tmp_path / "out" / "slide").exists()
    final = writer.commit({"slide": "slide"})
    group = zarr.open_group(str(final / "cells.zarr"), mode="r")
    assert group["crop"].shape == (8, 8, 8, 3)
    assert [int(group["crop"][i, 0, 0, 0]) for i in range(8)] == [0, 1, 2, 3, 4, 5, 9, 10]
    rows = list(csv.DictReader(open(final / "cells.csv")))
    assert [r["cell_id"] for r in rows] == [str(i) for i in range(8)]
    assert rows[0]["cx"] == "1.23" and rows[0]["edge"] == "1"
    assert json.loads((final / "provenance.json").read_text()) == {"slide": "slide"}
    assert not any((tmp_path / "out" / STAGING_DIR).iterdir())


def test_abort_leaves_an_older_result_alone(tmp_path):
    first = _writer(tmp_path)
    first.add(*_cells(2))
    first.commit({"run": 1})
    second = _writer(tmp_path)
    second.add(*_cells(5))
    second.abort()
    assert json.loads((tmp_path / "out" / "slide" / "provenance.json").read_text()) == {"run": 1}


def test_commit_replaces_an_older_result(tmp_path):
    for run in (1, 2):
        writer = _writer(tmp_path)
        writer.add(*_cells(run))
        writer.commit({"run": run})
    group = zarr.open_group(str(tmp_path / "out" / "slide" / "cells.zarr"), mode="r")
    assert group["crop"].shape[0] == 2


def test_identical_cells_write_identical_bytes(tmp_path):
    outputs = []
    for name in ("a", "b"):
        writer = SlideWriter(tmp_path / name / "s", out_root=tmp_path / name, arrays={"crop": (8, 8, 3)},
                             columns=CELL_COLUMNS, chunk=4)
        writer.add(*[_cells(6)[0], {"crop": _cells(6)[1]["crop"]}])
        outputs.append(writer.commit({}))
    for rel in ("cells.csv", "cells.zarr/crop/zarr.json", "cells.zarr/crop/c/0/0/0/0", "cells.zarr/crop/c/1/0/0/0"):
        assert (outputs[0] / rel).read_bytes() == (outputs[1] / rel).read_bytes()


def test_clear_staging_removes_leftovers(tmp_path):
    writer = _writer(tmp_path)
    writer.add(*_cells(1))
    clear_staging(tmp_path / "out")
    assert not (tmp_path / "out" / STAGING_DIR).exists()


def test_replacing_a_slide_keeps_the_results_of_a_nested_slide(tmp_path):
    out = tmp_path / "out"
    for name, run in (("a", 1), ("a/b", 1), ("a", 2)):
        writer = SlideWriter(out / name, out_root=out, arrays={"crop": (8, 8, 3)}, columns=CELL_COLUMNS, chunk=4)
        writer.add(*[_cells(1)[0], {"crop": _cells(1)[1]["crop"]}])
        writer.commit({"slide": name, "run": run})
    assert json.loads((out / "a" / "provenance.json").read_text())["run"] == 2
    assert json.loads((out / "a" / "b" / "provenance.json").read_text()) == {"slide": "a/b", "run": 1}
