"""What an image file must be for the detectors to read it as the annotations see it."""

from __future__ import annotations

from PIL import Image

# EXIF orientation tags that turn the stored pixels by 90 degrees for display (width and height swap).
_QUARTER_TURNS = (5, 6, 7, 8)


def unreadable_mode(image: Image.Image) -> str | None:
    """Why PIL's ``convert("RGB")`` would not give this image's content, or None if it would.

    A 16- or 32-bit image (modes ``I;16``, ``I``, ``F``) is clipped to 8 bits, not scaled: every pixel above
    255 turns white, and a detector would train on blank images.
    """
    if image.mode in ("I", "F") or image.mode.startswith("I;"):
        return (
            f"is in PIL mode {image.mode} (16 or 32 bits per pixel), which reads as clipped to 8 bits (mostly "
            "white); convert it to 8-bit RGB or grayscale first"
        )
    return None


def orientation_note(image: Image.Image, width: object, height: object) -> str:
    """Why the stored size may differ from the annotated ``width x height``: an EXIF quarter turn."""
    orientation = image.getexif().get(0x0112)
    if orientation in _QUARTER_TURNS and image.size == (height, width):
        return (
            f" Its EXIF orientation ({orientation}) turns it by 90 degrees for display, which has the annotated "
            "size: the boxes were likely drawn on the turned view. Save the images turned "
            "(PIL.ImageOps.exif_transpose) rather than correcting the size entry, which would leave the boxes "
            "on the wrong pixels."
        )
    return ""
