"""astrea_vlm.train."""
