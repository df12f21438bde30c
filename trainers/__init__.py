"""The host-independent training backend. Never imports ComfyUI."""
