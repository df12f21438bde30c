"""Dataset layer: folder scanning, image decoding, captions, buckets, caches, batch order."""
