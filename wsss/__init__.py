"""The method: weakly supervised semantic segmentation from image-level labels.

Pure torch/numpy/scipy; never imports Ray and never talks to object storage."""
