"""How this project reads an image folder: which folders are classes, which files are images, and how a file
becomes an 8-bit RGB image. Both the streamed and the decoded-once (experiment/folder_cache.py) paths use it.
Imports torchvision, which takes seconds: import this module where a folder is actually read."""
import os

import numpy as np
from torchvision import datasets, transforms

from experiment.errors import first_line

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_hidden(name):
    return name.startswith(".")


def is_image(path):
    """An image by its extension, and not a hidden file (`.name`, e.g. macOS's `._photo.jpg`)."""
    return path.lower().endswith(IMAGE_EXTENSIONS) and not is_hidden(os.path.basename(path))


def walk(folder):
    """(path, file names) of `folder` and every folder below it that is read: links to folders are followed, as
    torchvision does (data._check_no_folder_read_twice refuses loops); hidden folders (`.ipynb_checkpoints`) are
    not entered."""
    for path, folders, files in os.walk(folder, followlinks=True):
        folders[:] = [f for f in folders if not is_hidden(f)]
        yield path, files


def image_files(folder):
    """The images below a class folder (see `walk`), in no particular order."""
    return (os.path.join(path, f) for path, files in walk(folder) for f in files if is_image(f))


def class_names(folder):
    """The class folders of a split, sorted; hidden folders (`.name`, e.g. `.ipynb_checkpoints`) are none."""
    return sorted(d.name for d in os.scandir(folder) if d.is_dir() and not is_hidden(d.name))


def test_view(size):
    """The evaluation transform on a PIL image, as torchvision's ImageNet references do it: the shorter side
    resized to round(size * 256 / 224) (antialiased bilinear), then the centre `size` x `size` crop. The
    streamed path applies it per batch; the decoded path once, when it decodes (experiment/folder_cache.py)."""
    return transforms.Compose([transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size)])


class ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder, reading with `read_rgb`, with no hidden folder taken for a class or entered,
    and no hidden file taken for an image."""

    def __init__(self, root, transform=None):
        super().__init__(root, transform=transform, loader=read_rgb)

    def find_classes(self, directory):
        classes = class_names(directory)
        return classes, {c: i for i, c in enumerate(classes)}

    @staticmethod
    def make_dataset(directory, class_to_idx, *args, **kwargs):
        """(path, class index) per image, in torchvision's order: class by class, folder by folder, file by file."""
        return [(path, i) for c, i in sorted(class_to_idx.items())
                for path in sorted(image_files(os.path.join(directory, c)), key=os.path.split)]


class UnreadableImage(Exception):
    """An image file that cannot be decoded; the message starts with `cannot read image <path>`."""


def read_rgb(path):
    """An image file as an 8-bit RGB PIL image. 16-bit greyscale (PNG, TIFF) is scaled to 8 bits: PIL's own
    conversion clips it, which turns nearly every pixel of a 16-bit image white."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
                values = np.asarray(im).astype(np.int64)
                if values.min() < 0 or values.max() > 65535:
                    raise ValueError(f"{im.mode} pixel values outside 0..65535 are not 16-bit")
                return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
            return im.convert("RGB")  # decodes the whole image: truncated files fail here
    except Exception as e:
        raise UnreadableImage(f"cannot read image {path} ({first_line(e, 120) or type(e).__name__})") from None
