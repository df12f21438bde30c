"""Pure tensor math (merge; later extract and resize): no file I/O, no device tricks."""
