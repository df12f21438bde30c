"""Captions for datasets: editing tools (``tools``), and captioners that write them."""
