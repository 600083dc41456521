"""Model architectures (one file each), paged attention and weight loading."""
