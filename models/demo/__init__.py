"""The demo model: a small pixel-space Wan-style DiT trained on procedural videos."""
