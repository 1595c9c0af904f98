"""Sample-quality evaluation: feature statistics, FID and precision/recall (see `fid`)."""
