"""Limits on untrusted input, in a module light enough for the command line to import at start-up."""

# Pillow's own warning threshold (1024**3 // 4 // 3 pixels, ~89.5 Mpx): an image file declaring more is
# refused from its header, before decoding, unless the user raises --max-pixels. Pillow itself stops
# only past twice this.
DEFAULT_MAX_PIXELS = 89_478_485
