"""astrea_vlm.processing."""
