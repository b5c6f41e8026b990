"""Image folders read safely: which files are a split's classes and images, and one image read or checked.

The layout is torchvision's ImageFolder (``<split>/<class>/**/<image>``, classes in sorted order, images
in the order torchvision lists them), with rules of lrx's own where ImageFolder reads the wrong images
or none:

- a symlinked folder is followed only where it cannot change a label: a class folder may link inside its
  split folder, a folder within a class inside that class's folder, and neither to a folder that contains
  it (a loop). ``ln -s .. train/cat/up`` would give every class's images the label cat, ``ln -s . train/loop``
  would add a class of every image; both are refused naming the link. Symlinked files are images like any
  other, wherever they point; a split folder that is itself a link is read where it points;
- a file with an image extension that is not a regular file (a FIFO, a socket, a device, a broken link) is
  skipped and counted (opening a FIFO waits forever);
- a class folder without images is refused naming it;
- an image that cannot be read (empty, truncated, not an image, larger than PIL's decompression-bomb
  limit) is a :class:`lrx.base.errors.UserError` naming the file, raised by :func:`read_image` when it is
  decoded and by :func:`check_image` (its header, and for PNG and GIF its whole stream, without decoding
  the pixels) before a run starts.
"""
from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torchvision
from PIL import Image

from lrx.base.errors import UserError

__all__ = ["IMAGE_EXTENSIONS", "READ_ERRORS", "FolderIndex", "find_classes", "index_folder", "read_image",
           "check_image"]

IMAGE_EXTENSIONS = torchvision.datasets.folder.IMG_EXTENSIONS  # the files ImageFolder takes for images
# What PIL raises for a file it cannot read: unreadable or truncated data (OSError, EOFError, struct.error,
# zlib.error), malformed chunks (SyntaxError, ValueError), more pixels than Image.MAX_IMAGE_PIXELS allows.
READ_ERRORS = (OSError, EOFError, SyntaxError, ValueError, struct.error, zlib.error, Image.DecompressionBombError)


@dataclass
class FolderIndex:
    """One split folder's classes (sorted folder names) and images: ``samples`` (path, class name) in
    ImageFolder's order; ``skipped``: files with an image extension that are not regular files."""

    folder: Path
    classes: list[str]
    samples: list[tuple[str, str]]
    skipped: list[str] = field(default_factory=list)


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_link(link: str, real: Path, home: Path, chain: tuple[Path, ...], rule: str) -> None:
    """Refuse the symlinked folder ``link`` (resolved: ``real``) if it loops back to a folder on the way to it
    (``chain``, real paths from the split folder down) or leaves ``home``; ``rule`` says what is allowed."""
    if any(_is_within(folder, real) for folder in chain):
        raise UserError(f"{link} is a symlink to {real}, a folder that contains it: the images around it would be "
                        f"read again, under its label (a loop); remove the link", key="data.root")
    if not _is_within(real, home):
        raise UserError(f"{link} is a symlink to {real}, outside {home}: its images would take the label of the "
                        f"folder it is linked into; {rule}", key="data.root")


def find_classes(folder: Path) -> list[str]:
    """The class folders of split folder ``folder`` in sorted order (ImageFolder's classes), symlinks checked."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} does not exist or is not a folder; expected {folder}/<class>/<images>",
                        key="data.root")
    split = folder.resolve()
    try:
        entries = sorted((entry for entry in os.scandir(folder) if entry.is_dir()), key=lambda entry: entry.name)
    except OSError as err:
        raise UserError(f"cannot list {folder}: {err.strerror or err}", key="data.root") from None
    for entry in entries:
        if entry.is_symlink():
            _check_link(entry.path, Path(entry.path).resolve(), split, (split,),
                        "a symlinked class folder must point inside its split folder (link the whole split folder "
                        "instead, or copy the images)")
    if not entries:
        raise UserError(f"{folder} has no class folders; expected {folder}/<class>/<images>", key="data.root")
    return [entry.name for entry in entries]


def _images_of_class(folder: Path, split: Path, skipped: list[str]) -> list[str]:
    """The image files under one class folder, in ImageFolder's order (folders by path, then file names)."""
    home = folder.resolve()
    pending = [(str(folder), (split, home))]
    listed = []  # (folder as walked, [(file name, is a regular file)])
    while pending:
        root, chain = pending.pop()
        try:
            entries = list(os.scandir(root))
        except OSError as err:
            raise UserError(f"cannot list {root}: {err.strerror or err}", key="data.root") from None
        files = []
        for entry in entries:
            if entry.is_dir():  # follows a symlink
                real = Path(entry.path).resolve() if entry.is_symlink() else chain[-1] / entry.name
                if entry.is_symlink():
                    _check_link(entry.path, real, home, chain, "a symlinked folder within a class folder must "
                                "point inside that class folder (copy the images into it instead)")
                pending.append((entry.path, chain + (real,)))
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                files.append((entry.name, entry.is_file()))  # is_file follows a symlink: False for a FIFO
        listed.append((root, files))
    images = []
    for root, files in sorted(listed):
        for name, regular in sorted(files):
            (images if regular else skipped).append(os.path.join(root, name))
    return images


def index_folder(folder: Path) -> FolderIndex:
    """Split folder ``folder``'s classes and images (see the module's rules)."""
    folder = Path(folder)
    classes = find_classes(folder)
    split = folder.resolve()
    samples, skipped = [], []
    for name in classes:
        before = len(skipped)
        images = _images_of_class(folder / name, split, skipped)
        if not images:
            odd = f"; {len(skipped) - before} files that are not regular files skipped" if len(skipped) > before else ""
            raise UserError(f"class folder {folder / name} has no images (files ending in "
                            f"{', '.join(IMAGE_EXTENSIONS)}){odd}; add images or remove the folder", key="data.root")
        samples.extend((path, name) for path in images)
    return FolderIndex(folder, classes, samples, skipped)


def _unreadable(path, err: Exception) -> UserError:
    reason = " ".join(str(err).split()).rstrip(".") or type(err).__name__
    return UserError(f"cannot read image {path}: {reason}; replace or remove the file", key="data.root")


def read_image(path) -> Image.Image:
    """The image at ``path`` decoded, as RGB; a file that cannot be decoded is a UserError naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except READ_ERRORS as err:
        raise _unreadable(path, err) from None


def check_image(path) -> None:
    """Refuse, naming it, a file PIL cannot open as an image (empty, not an image, over the decompression-bomb
    limit) or, for formats PIL can verify without decoding (PNG, GIF), a truncated or corrupt one."""
    try:
        with Image.open(path) as image:
            image.verify()
    except READ_ERRORS as err:
        raise _unreadable(path, err) from None
