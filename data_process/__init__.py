"""Dataset builders: MMKB raw files to the standard layout, and the embedded synthetic default."""
