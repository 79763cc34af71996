"""The method: weakly supervised semantic segmentation from image-level labels. Never imports Ray."""
