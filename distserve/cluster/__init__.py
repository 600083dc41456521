"""Starting instance processes and the typed control channel between them and the controller."""
