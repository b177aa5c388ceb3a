"""astrea_vlm.eval."""
