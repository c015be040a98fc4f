"""OME-Zarr (OME-NGFF v0.4 and v0.5) metadata: which arrays of a store are images, and their axes.

The metadata sits in the group attributes (v0.4) or under their ``ome`` key (v0.5); the ``ome-zarr``
library tells the format version from it and validates the axes against that version of the spec
(``ome_zarr.format``, ``ome_zarr.axes``). Pixels are read by :mod:`cellbatch.read`, like every capture.

An image (``multiscales`` metadata) is one slide: its first dataset, the full resolution. A
high-content-screening plate (``plate``) or a single well (``well``) is one slide per field of view.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

OME_KEYS = ("multiscales", "plate", "well")

# Roles of an image's axes, one letter per dimension, kept in :attr:`cellbatch.read.Slide.axes`:
# y and x are the capture's rows and columns, c its colour channels, f any other axis (time, z, ...),
# whose every index is one capture (frame).
FRAME, CHANNEL = "f", "c"


@dataclass(frozen=True)
class OmeImage:
    """One field of view: its slide name inside the store, full-resolution array and axis roles."""

    name: str  # "" for an image at the group itself, "A/1/0" for plate well A/1 field 0
    array_path: str  # relative to the store root
    axes: str  # e.g. "cyx" or "fcfyx"; see FRAME and CHANNEL
    problem: str = ""  # why this image cannot be read, for a slide that fails with it


def ome_attributes(store: Path, group_path: str = "") -> dict | None:
    """The OME metadata of a group (v0.4 attributes or v0.5 ``ome`` key), or ``None`` if it has none."""
    import zarr

    try:
        attrs = zarr.open_group(str(store), path=group_path, mode="r").attrs.asdict()
    except (FileNotFoundError, KeyError, ValueError, TypeError):  # no group there, or not a group
        return None
    attrs = attrs.get("ome", attrs)
    return attrs if isinstance(attrs, dict) and any(key in attrs for key in OME_KEYS) else None


def ome_format(attrs: dict):
    """The ``ome_zarr.format`` class of metadata: its ``version`` (v0.5), else what it matches (v0.4 default)."""
    from ome_zarr.format import FormatV04, detect_format, format_from_version

    if "version" in attrs:
        return format_from_version(str(attrs["version"]))
    return detect_format(attrs, FormatV04())


def ome_images(store: Path, group_path: str = "") -> list[OmeImage]:
    """The images below an OME-Zarr group: itself (an image), each well's fields (a plate or a well).

    Raises
    ------
    ValueError
        The group has no OME metadata (check with :func:`ome_attributes` first).
    """
    attrs = ome_attributes(store, group_path)
    if attrs is None:
        raise ValueError(f"{store}/{group_path} has no OME-Zarr metadata")
    if "plate" in attrs:
        return _plate_images(store, group_path, attrs["plate"])
    if "well" in attrs:
        return _well_images(store, group_path, "", attrs["well"])
    return [_image(group_path, "", attrs)]


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def _plate_images(store: Path, group_path: str, plate: dict) -> list[OmeImage]:
    images = []
    for well in sorted(plate.get("wells", []), key=lambda w: str(w.get("path", ""))):
        path = str(well.get("path", ""))
        attrs = ome_attributes(store, _join(group_path, path)) or {}
        if "well" not in attrs:
            images.append(OmeImage(path, _join(group_path, path), "", f"plate well {path!r} has no well metadata"))
            continue
        images.extend(_well_images(store, _join(group_path, path), path, attrs["well"]))
    return images


def _well_images(store: Path, group_path: str, name: str, well: dict) -> list[OmeImage]:
    images = []
    for field in well.get("images", []):
        path = str(field.get("path", ""))
        attrs = ome_attributes(store, _join(group_path, path)) or {}
        images.append(_image(_join(group_path, path), _join(name, path), attrs))
    return images


def _image(group_path: str, name: str, attrs: dict) -> OmeImage:
    """The full-resolution array and axis roles of one image group (``multiscales`` metadata)."""
    from ome_zarr.axes import Axes

    multiscales = attrs.get("multiscales") or []
    if not multiscales or not multiscales[0].get("datasets"):
        return OmeImage(name, group_path, "", "OME-Zarr image with no multiscales datasets")
    first = multiscales[0]
    array_path = _join(group_path, str(first["datasets"][0].get("path", "")))
    try:
        axes = Axes(first.get("axes"), fmt=ome_format(attrs))
        roles = _roles(axes.axes)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return OmeImage(name, array_path, "", f"OME-Zarr axes {first.get('axes')!r} are not valid: {exc}")
    return OmeImage(name, array_path, roles)


def _roles(axes: list[dict[str, str]]) -> str:
    names = [a["name"] for a in axes]
    if "y" not in names or "x" not in names:
        raise ValueError(f"no 'y' and 'x' axes among {names}")
    roles = ""
    for axis in axes:
        if axis["name"] in ("y", "x"):
            roles += axis["name"]
        elif axis.get("type") == "channel" or axis["name"] == "c":
            roles += CHANNEL
        else:
            roles += FRAME
    return roles
