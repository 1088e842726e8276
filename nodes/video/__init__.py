"""Video input: frames from a file (PyAV) or from an upstream node, prepared for video-to-video models."""
