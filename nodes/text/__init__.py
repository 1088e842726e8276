"""Text encoders (Wan's UMT5-XXL in ``umt5``)."""
