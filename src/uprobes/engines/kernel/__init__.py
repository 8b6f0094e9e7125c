"""The kernel engine: uprobe events defined in tracefs, their samples read from perf ring buffers."""
