"""Label values shared by readers, metrics and exports, so they cannot disagree."""

IGNORE = 255  # void / border pixels in a label map: never scored
MAX_CLASSES = 254  # class i is stored as i + 1 in uint8 maps and 255 means ignore
BACKGROUND = "background"  # the head's extra class: pixels and masks that are no named class
